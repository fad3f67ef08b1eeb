"""Shared fixtures: where the shared assets are, the real Qwen tokenizer, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def shared_dir() -> Path | None:
    """The folder holding data/huanhuan.json and assets/qwen.tiktoken, if present."""
    for cand in (os.environ.get("CHATFT_SHARED"), REPO.parent / "shared", REPO.parent.parent / "shared"):
        if cand and (Path(cand) / "assets" / "qwen.tiktoken").is_file():
            return Path(cand)
    return None


def _shared_file(rel: str) -> Path:
    base = shared_dir()
    if base is None:
        pytest.skip("shared assets not found (set CHATFT_SHARED to the folder with "
                    "data/huanhuan.json and assets/qwen.tiktoken)")
    return base / rel


@pytest.fixture(scope="session")
def qwen_tiktoken() -> Path:
    return _shared_file("assets/qwen.tiktoken")


@pytest.fixture(scope="session")
def huanhuan_path() -> Path:
    return _shared_file("data/huanhuan.json")


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
