"""Shared fixtures: where the shared assets are, the real Qwen tokenizer, a chat dataset."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import sys

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed's compiled ops are built once per environment into the venv's own folder (inherited
# by every process a test starts): checkouts with other venvs would otherwise rebuild them into
# the one shared ~/.cache folder in turn, and a build killed there blocks the others.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def pytest_sessionstart(session):
    from chatft.train.op_builds import clear_stale_locks

    clear_stale_locks()
HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def shared_file(rel: str) -> Path | None:
    """``rel`` (e.g. ``data/huanhuan.json``) in the shared folder: ``$CHATFT_SHARED``, else
    ``../shared`` next to the checkout (or one level further up); None where none has it."""
    for cand in (os.environ.get("CHATFT_SHARED"), REPO.parent / "shared", REPO.parent.parent / "shared"):
        if cand and (Path(cand) / rel).is_file():
            return Path(cand) / rel
    return None


def dashscope_tiktoken() -> Path | None:
    """``qwen.tiktoken`` as PyPI's ``dashscope`` package ships it (Apache-2.0; the test command
    installs it with --no-deps), found without importing the package."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    """Qwen's BPE ranks: the shared folder's copy, else dashscope's (the same ranks)."""
    path = shared_file("assets/qwen.tiktoken") or dashscope_tiktoken()
    if path is None:
        pytest.skip("qwen.tiktoken not found: pip install --no-deps dashscope, or set "
                    "CHATFT_SHARED to a folder with assets/qwen.tiktoken")
    return path


@pytest.fixture(scope="session")
def huanhuan_path() -> Path:
    """The tutorial's dataset itself, for the tests about its own numbers; tests that need some
    chat data take :func:`chat_alpaca`."""
    path = shared_file("data/huanhuan.json")
    if path is None:
        pytest.skip("huanhuan.json not found (a test of the tutorial's dataset itself): set "
                    "CHATFT_SHARED to the folder with data/huanhuan.json")
    return path


def persona_alpaca_records() -> list[dict]:
    """The built-in persona's 205 conversations as single-turn Alpaca records (each one's first
    question and answer): real dialogue that ships with chatft, in the tutorial's format."""
    from chatft.data.prepare import resolve_data_path

    out = []
    for line in resolve_data_path("builtin:persona").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        question = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
        out.append({"instruction": question, "input": "", "output": answer})
    return out


@pytest.fixture(scope="session")
def chat_alpaca(tmp_path_factory) -> Path:
    """An Alpaca JSON file of 205 records (:func:`persona_alpaca_records`), for tests that need
    some chat dataset."""
    path = tmp_path_factory.mktemp("chat-data") / "persona_alpaca.json"
    path.write_text(json.dumps(persona_alpaca_records(), ensure_ascii=False, indent=1),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tiktoken):
    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer(qwen_tiktoken)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A folder holding only the Qwen tokenizer files (tokenizer.json, chat template)."""
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    qwen_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """Put an ``nvidia-smi`` first on PATH that prints ``stdout`` and exits with ``rc``."""
    def install(stdout: str, rc: int = 0) -> Path:
        script = tmp_path / "bin" / "nvidia-smi"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n"
                          f"printf '{stdout}'\nexit {rc}\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
        return tmp_path / "args"
    return install


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session caches tokenized data in its own folder, never in ~/.cache —
    except the dequantized embedded model, which is expensive and content-addressed."""
    monkeypatch.setenv("CHATFT_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "data-cache"))
