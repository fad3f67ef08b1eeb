"""Qwen-7B-Chat as users download it (a Qwen-1 folder), end to end on one GPU.

Writes a random Qwen-1 folder of Qwen-7B-Chat's exact shape (bf16 shards, the real
qwen.tiktoken), converts it with ``chatft convert``, runs the tutorial's job on the Qwen-1 folder
itself with ``chatft train`` (one-GPU recommended settings, a few steps, export), reloads the
export and answers "你是谁"; prints a table and a last line of JSON, and writes
``bench/results/qwen1_7b_<label>.json`` with the command, versions and hardware.

    python bench/qwen1_7b.py --label h200                     # one H200
    python bench/qwen1_7b.py --shape tiny --out /tmp/q1       # CPU smoke run

The library side is :mod:`bench.lib.qwen1`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.qwen1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
