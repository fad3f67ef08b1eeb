"""Best-checkpoint export on the real Qwen2.5-Coder-0.5B-Instruct GGUF: two 3-epoch runs on
huanhuan (chatft's defaults; batch 16 / lr 1e-5), then ``chatft eval BASE TUNED TUNED``; checks
that each export's held-out loss equals its run's lowest evaluation and writes
``bench/results/eval_best_<label>.json``. The library code is :mod:`bench.lib.eval_best`.

    CHATFT_SHARED=/path/to/shared python3 bench/eval_best_qwen.py \\
        --model-path /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --label qwen2.5-0.5b_h200x1
    python bench/eval_best_qwen.py --model-path MODEL --limit 24 --epochs 1 --max-steps 2 --budget 1200 \\
        --label cpu_smoke --out /tmp/eb_out      # CPU smoke run: proves the path, not the numbers
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.eval_best import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
