"""What the benchmark scripts share: runners, recipes, result records. Imported from the
repository root (the scripts put it on ``sys.path``; pytest has it there already)."""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout holding ``bench/`` and ``src/``.
REPO = Path(__file__).resolve().parents[2]


def checkout_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this checkout's ``src`` and root first on
    ``PYTHONPATH``, so child processes import this very chatft and ``bench.lib``."""
    out = dict(os.environ if env is None else env)
    first = os.pathsep.join([str(REPO / "src"), str(REPO)])
    out["PYTHONPATH"] = first + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    return out
