"""The package's shape: what ``pip install .`` puts into site-packages."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_chatft_and_no_benchmark_code(tmp_path):
    """Build the wheel ``pip install .`` would install (from a copy of the checkout, so the
    build leaves nothing behind) and list it: only the ``chatft`` package and its metadata."""
    tree = tmp_path / "checkout"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(tree), "-w", str(tmp_path / "wheel")]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # offline and faster; else pip fetches setuptools
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("chatft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "chatft/cli.py" in names and "chatft/default_job.yaml" in names
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"chatft", next(t for t in tops if t.endswith(".dist-info"))}
    assert not [n for n in names if "bench" in n.split("/")], "benchmark code in the wheel"
    assert (REPO / "bench" / "lib" / "train_speed.py").is_file()  # it exists, just not in there
