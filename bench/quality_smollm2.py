"""Quality of chatft fine-tunes: SmolLM2-135M-Instruct on huanhuan, per hyperparameter variant.

Trains each variant with ``chatft train`` (3 epochs, records with index % 10 == 9 held out),
reports held-out loss before/after, training time and tokens/s, and the exported model's
greedy answers to four identity questions with a persona check; prints a table, the answers
and a last line of JSON, and writes ``bench/results/quality_smollm2_<label>.json``.
The library code is :mod:`chatft.bench.quality`.

    python bench/quality_smollm2.py --model-path SmolLM2-135M-Instruct.Q4_1.gguf --label h200
    python bench/quality_smollm2.py --limit 60 --epochs 1 --variants recommended,tutorial_hp \
        --out /tmp/q
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if SRC.is_dir():
    sys.path.insert(0, str(SRC))  # this checkout's chatft, installed or not

from chatft.bench.quality import main
from chatft.errors import ChatftError

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ChatftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
