"""The package's shape: its layers (read from every import in ``src/chatft``), file sizes, which
modules may see the whole config, and what ``pip install .`` puts into site-packages."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "chatft"

#: chatft's layers, low to high. A module imports from its own layer or lower ones only: at the
#: top of the file, inside a function (lazy imports save start-up time, they do not lift the
#: rule) or under TYPE_CHECKING alike. ``__init__`` is the package itself (``__version__``).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "config", "config_parse"),
    ("data", "model"),
    ("checkpoint", "integrity"),
    ("export",),
    ("serve",),
    ("train",),
    ("job",),
    ("cli", "__main__"),
)
LAYER = {part: n for n, parts in enumerate(LAYERS) for part in parts}

#: The modules that may take the whole Config: they compose every section (the CLI, the job
#: step and its launcher, the planner's config adapter). Everything else takes its section.
WHOLE_CONFIG = {"config.py", "config_parse.py", "cli.py", "job/launch.py", "job/run.py", "train/plan/apply.py"}
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    """The top-level part of chatft a file belongs to: ``train/plan/cost.py`` -> ``train``."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path) -> list[tuple[int, str, str]]:
    """``(line, imported chatft part, the import as written)`` of every import of chatft."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(("chatft",) + path.relative_to(PACKAGE).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base == "chatft" else [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "chatft":
                continue
            part = parts[1] if len(parts) > 1 and parts[1] in LAYER else "__init__"
            found.append((node.lineno, part, ast.unparse(node)))
    return sorted(found)


def test_every_module_has_a_layer():
    assert {_part(p) for p in _modules()} <= set(LAYER), "a new part of chatft needs a layer here"


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{p.relative_to(PACKAGE)}:{line}: {text}  ({_part(p)} -> {part})"
              for p in _modules() for line, part, text in _imported_parts(p)
              if LAYER[part] > LAYER[_part(p)]]
    assert upward == []


def test_the_layer_reader_sees_imports_wherever_they_are(tmp_path, monkeypatch):
    """The reader itself: a lazy upward import inside a function, a relative import, and an
    import under TYPE_CHECKING are all found."""
    fake = tmp_path / "chatft"
    (fake / "export").mkdir(parents=True)
    (fake / "export" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import torch\n"
        "from chatft.errors import ChatftError\n"
        "if TYPE_CHECKING:\n    from chatft.config import Config\n"
        "def f():\n    from chatft.train import loop\n"
        "from ..serve import chat\n"
        "from chatft import checkpoint, __version__\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = [(line, part) for line, part, _ in _imported_parts(fake / "export" / "x.py")]
    assert found == [(3, "errors"), (5, "config"), (7, "train"), (8, "serve"), (9, "__init__"),
                     (9, "checkpoint")]


def test_only_the_composing_modules_take_the_whole_config():
    takers = set()
    for p in _modules():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "chatft.config" and \
                    any(a.name == "Config" for a in node.names):
                takers.add(str(p.relative_to(PACKAGE)))
    assert takers | {"config.py"} <= WHOLE_CONFIG, sorted(takers - WHOLE_CONFIG)


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("module", ["chatft.train.plan.shape", "chatft.train.plan.job",
                                    "chatft.train.plan.cost",
                                    "chatft.train.plan.report", "chatft.train.plan.hardware"])
def test_the_planners_pure_parts_know_no_config(module):
    """They take a Job (or nothing); turning a config into a Job is ``plan.apply``'s job."""
    path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
    assert "config" not in {part for _, part, _ in _imported_parts(path)}


def test_the_wheel_ships_chatft_and_no_benchmark_code(tmp_path):
    """Build the wheel ``pip install .`` would install (from a copy of the checkout, so the
    build leaves nothing behind) and list it: only the ``chatft`` package and its metadata."""
    tree = tmp_path / "checkout"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(tree), "-w",
           str(tmp_path / "wheel")]
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
