"""Finding models and tokenizers from what is on disk (``--model``, ``--tokenizer``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.config import DEFAULT_MODEL
from chatft.errors import ChatftError
from chatft.model import loading
from chatft.model.loading import (ModelSource, load_tokenizer, materialize_gguf, model_config,
                                  models_cache, resolve_model)


def folder_with(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for fname, text in files.items():
        (folder / fname).write_text(text)
    return folder


def test_hf_folder(tmp_path):
    folder = folder_with(tmp_path, "m", {"config.json": json.dumps({"model_type": "llama"})})
    assert resolve_model(str(folder)) == ModelSource("hf", folder)
    tok_only = folder_with(tmp_path, "t", {"tokenizer.json": "{}"})
    assert resolve_model(str(tok_only)).kind == "hf"


def test_qwen1_folder_is_recognized_by_model_type(tmp_path):
    folder = folder_with(tmp_path, "q", {"config.json": json.dumps({"model_type": "qwen"}),
                                         "qwen.tiktoken": ""})
    assert resolve_model(str(folder)) == ModelSource("qwen1", folder)


def test_gguf_file(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_model(str(gguf))
    assert src == ModelSource("gguf", tmp_path, "m.Q4.gguf")
    assert src.label == str(gguf)


def test_bad_model_paths(tmp_path):
    with pytest.raises(ChatftError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert str(e.value) == (f"model not found: {tmp_path / 'nope'} (expected a model folder, a "
                            f".gguf file or '{DEFAULT_MODEL}')")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ChatftError, match="expected a model folder or a .gguf file"):
        resolve_model(str(weights))
    empty = folder_with(tmp_path, "empty", {"README.md": "hi"})
    with pytest.raises(ChatftError, match="no config.json, tokenizer.json or qwen.tiktoken; "
                                          "not a model folder"):
        resolve_model(str(empty))
    broken = folder_with(tmp_path, "broken", {"config.json": "{not json"})
    with pytest.raises(ChatftError, match=r"config\.json: not valid JSON"):
        resolve_model(str(broken))


def test_models_cache_follows_chatft_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path))
    assert models_cache() == tmp_path / "models"


def test_materialized_gguf_is_reused_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """The stamp (size and mtime of the GGUF) decides; a match returns the folder without
    loading anything."""
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    target = tmp_path / "cache" / "models" / "m"
    target.mkdir(parents=True)
    st = gguf.stat()
    (target / "chatft-source.txt").write_text(f"{st.st_size}-{int(st.st_mtime)}")
    assert materialize_gguf(gguf, "m") == target


def test_embedded_default_model_resolves_to_a_plain_folder():
    try:
        src = resolve_model(DEFAULT_MODEL)
    except ChatftError as e:
        pytest.skip(f"embedded model not available: {e}")
    assert src.kind == "hf" and src.gguf_file is None
    assert src.folder == models_cache() / DEFAULT_MODEL
    for name in ("config.json", "tokenizer.json", "chatft-source.txt"):
        assert (src.folder / name).is_file(), name
    assert loading.smollm2_gguf().name == loading.SMOLLM2_GGUF
    cfg = model_config(src)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 576, 30)


def test_tokenizer_from_a_folder_with_only_qwen_tiktoken(tmp_path, qwen_tiktoken):
    """A Qwen-1 folder has qwen.tiktoken and no tokenizer.json: the Qwen tokenizer is built."""
    folder = tmp_path / "qwen-1"
    folder.mkdir()
    (folder / "qwen.tiktoken").symlink_to(qwen_tiktoken)
    tok = load_tokenizer(resolve_model(str(folder)))
    assert tok("你好，世界！", add_special_tokens=False)["input_ids"] == [108386, 3837, 99489, 6313]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645


def test_explicit_tokenizer_overrides_the_model(tmp_path, qwen_tokenizer_dir, monkeypatch):
    model = folder_with(tmp_path, "m", {"config.json": "{}"})
    tok = load_tokenizer(resolve_model(str(model)), str(qwen_tokenizer_dir))
    assert tok("你好，世界！", add_special_tokens=False)["input_ids"] == [108386, 3837, 99489, 6313]
    # a .tiktoken file is built into the Qwen tokenizer (the builder itself is tested elsewhere)
    import chatft.model.qwen_tokenizer as qt

    calls = []
    monkeypatch.setattr(qt, "build_qwen_tokenizer", lambda path: calls.append(Path(path)) or "tok")
    assert load_tokenizer(resolve_model(str(model)), str(tmp_path / "x.tiktoken")) == "tok"
    assert calls == [tmp_path / "x.tiktoken"]
