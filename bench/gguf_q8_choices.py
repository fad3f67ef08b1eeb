"""Which tensors' q8_0 rounding moves the top token: the default job's export with its weights
rounded per choice (all q8_0, token embedding in f16, attention or feed-forward in f16, ...),
logits compared with the fp32 folder on the persona data, the export's probe and huanhuan.
Prints a table and a last line of JSON, writes ``bench/results/gguf_q8_choices_cpu.json``.
The library code is :mod:`bench.lib.gguf_q8_choices`.

    python bench/gguf_q8_choices.py --folder runs/chatft/final
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.gguf_q8_choices import main

if __name__ == "__main__":
    sys.exit(main())
