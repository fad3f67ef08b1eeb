"""The memory planner (``chatft plan``) against peaks measured on NVIDIA H200.

Reads ``bench/results/plan_measurements_h200.json`` (chatft runs on 1 and 4 H200: the options
that define each job, its measured peak GPU and host memory, and where they were read),
rebuilds each job as ``chatft plan`` does (token budget from huanhuan with the Qwen tokenizer
when the shared folder is found), and prints predicted vs measured with the planner's committed
calibration and with one refitted on these runs, then a last line of JSON. Writes
``bench/results/plan_calibration_h200.json``. Exit status 1 when a committed prediction is off
by more than 15%.

    CHATFT_SHARED=/path/to/shared python bench/plan_calibration.py

The library side is :mod:`bench.lib.plan_calibration`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.plan_calibration import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
