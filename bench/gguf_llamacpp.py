"""llama.cpp reads chatft's GGUF export as chatft reads the Hugging Face folder: same greedy
answers (text and token ids) and logits, for the default job's SmolLM2 persona and a tiny
random Qwen2. Prints a table and a last line of JSON, writes
``bench/results/gguf_llamacpp_cpu.json``. The library code is :mod:`bench.lib.gguf_llamacpp`.

llama-cpp-python lives in its own environment, built from PyPI on this machine, e.g.:

    python3 -m venv /work/llamacpp-venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /work/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36
    python bench/gguf_llamacpp.py --llama-python /work/llamacpp-venv/bin/python \
        --smollm2-folder runs/chatft/final --build-seconds 413 --build-command "..."
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.gguf_llamacpp import main
from chatft.errors import ChatftError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ChatftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
