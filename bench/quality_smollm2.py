"""Quality of chatft fine-tunes: SmolLM2-135M-Instruct on huanhuan, per hyperparameter variant.

Trains each variant with ``chatft train`` (3 epochs, records with index % 10 == 9 held out),
reports held-out loss before/after, training time and tokens/s, and the exported model's
greedy answers to four identity questions with a persona check; prints a table, the answers
and a last line of JSON, and writes ``bench/results/quality_smollm2_<label>.json``.
The library code is :mod:`bench.lib.quality`.

    python bench/quality_smollm2.py --model-path SmolLM2-135M-Instruct.Q4_1.gguf --label h200
    python bench/quality_smollm2.py --limit 60 --epochs 1 --variants recommended,tutorial_hp \
        --out /tmp/q
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

from bench.lib.quality import main  # noqa: E402
from chatft.errors import ChatftError  # noqa: E402

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ChatftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
