"""Export: a Hugging Face model folder -> one GGUF file (llama.cpp, Ollama, LM Studio).

Written with the ``gguf`` package's ``GGUFWriter``: llama.cpp's architecture metadata for
``qwen2`` and ``llama`` (SmolLM2), tensors under the names the ``gguf`` package's own tensor map
gives them, the tokenizer (:mod:`chatft.export.gguf_vocab`), the chat template, and chatft's
persona under ``chatft.system_prompt``. Weights are f16, bf16 or q8_0 (2-D tensors; norms stay
f32, as llama.cpp's converter keeps them). Beside the file, an Ollama Modelfile
(:mod:`chatft.export.ollama`).

Everything that could make the file wrong is decided before a byte is written (:func:`plan`):
an architecture, rope variant, tensor or tokenizer it does not map is refused with a
:class:`GGUFExportError`. Tensors are then converted and written one at a time, so memory
holds one tensor, not the model. Like the Hugging Face export, the GGUF export checks itself
before putting the file in place: transformers reads the file back (``gguf_file=``), its
tokenizer must encode the probe texts to the folder tokenizer's ids, and its logits on a
probe conversation must match the folder's.

Llama's attention weights are stored permuted: llama.cpp's ``llama`` graph rotates adjacent
pairs of each head's query/key dimensions (``x[2i], x[2i+1]``), Hugging Face's Llama the two
halves (``x[i], x[i + d/2]``), so each head's rows are interleaved here. Qwen2's graph rotates
halves, like Hugging Face: no permutation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from chatft.export.gguf_vocab import (GGUFExportError, GGUFVocab, add_vocab, require_byte_level_bpe,
                                      vocab_from_tokenizer)
from chatft.export.metadata import ChatMeta, read_meta

QUANTS = ("f16", "bf16", "q8_0")
ARCHS = ("qwen2", "llama")
#: Self-check limits on the probe conversation's logits (a wrong mapping differs by ~100%):
#: max |diff| / max |logit|, and for q8_0 (8-bit weights, whose rounding can flip near-ties)
#: the share of positions whose top token agrees.
MAX_REL_DIFF = {"f16": 1e-2, "bf16": 1e-2, "q8_0": 0.25}
MIN_TOP1 = {"f16": 0.0, "bf16": 0.0, "q8_0": 0.9}


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: tuple[int, ...]  # torch order; the writer reverses it into ggml's
    qtype: int  # gguf.GGMLQuantizationType
    rope_heads: int = 0  # > 0: interleave each of this many heads' rows (llama q/k)


@dataclass
class GGUFPlan:
    folder: Path
    arch: str
    config: object
    vocab: GGUFVocab
    tensors: list[TensorPlan]
    meta: ChatMeta | None
    quant: str
    notes: list[str] = field(default_factory=list)


def _qtypes(quant: str):
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}[quant]


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{folder}: no *.safetensors weights (GGUF export reads a model "
                              "folder as chatft export writes it)")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({name: f for name in sf.keys()})
    return out


def _rope(config) -> tuple[float, str]:
    """(rope theta, rope type): transformers 5 keeps both in ``rope_parameters``."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0), kind


def _check_config(config, folder: Path) -> None:
    """Refuse what the GGUF (or llama.cpp's graph for the architecture) cannot express."""
    arch = getattr(config, "model_type", None)
    where = f"{folder}/config.json"
    if arch not in ARCHS:
        raise GGUFExportError(f"{where}: model_type {arch!r}: GGUF export maps "
                              f"{' and '.join(ARCHS)} (Qwen2, SmolLM2/Llama) only")
    _, rope_type = _rope(config)
    if rope_type != "default":
        raise GGUFExportError(f"{where}: rope type {rope_type!r}: GGUF export writes plain "
                              "rotary embeddings only")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"{where}: hidden_act {config.hidden_act!r}: llama.cpp's "
                              f"{arch} graph uses SiLU")
    if getattr(config, "mlp_bias", False):
        raise GGUFExportError(f"{where}: mlp_bias true: not mapped to GGUF")
    if getattr(config, "use_sliding_window", False):
        raise GGUFExportError(f"{where}: use_sliding_window true: llama.cpp's qwen2 graph has "
                              "no sliding window")


def _hidden(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def _tensor_plans(folder: Path, config, arch: str, quant: str) -> tuple[list[TensorPlan], list[str]]:
    import gguf
    from safetensors import safe_open

    model_arch = {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[arch]
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    allowed = set(gguf.MODEL_TENSORS[model_arch])
    heads, kv, _ = _hidden(config)
    wanted, _ = _qtypes(quant)
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    files = _weight_files(folder)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans, notes, seen = [], [], set()
    for hf_name in sorted(files):
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise GGUFExportError(f"{folder}: tensor {hf_name} has no place in llama.cpp's "
                                  f"{arch} model")
        kind, gguf_name = found
        with safe_open(str(files[hf_name]), framework="pt") as sf:
            shape = tuple(sf.get_slice(hf_name).get_shape())
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else wanted
        if len(shape) == 2 and shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
            notes.append(f"{gguf_name}: rows of {shape[-1]} do not split into {quant} blocks "
                         f"of {block}; stored as f16")
        rope_heads = 0
        if arch == "llama" and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
            rope_heads = heads if kind == gguf.MODEL_TENSOR.ATTN_Q else kv
        plans.append(TensorPlan(hf_name, gguf_name, files[hf_name], shape, int(qtype), rope_heads))
        seen.add(gguf_name)
    needed = {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    if needed - seen:
        raise GGUFExportError(f"{folder}: the weights lack {sorted(needed - seen)} (from "
                              f"{'embed_tokens, norm' if tied else 'embed_tokens, norm, lm_head'})")
    return plans, notes


def plan(folder: str | Path, quant: str = "f16") -> GGUFPlan:
    """Read and check everything the GGUF needs; raises GGUFExportError before any writing."""
    from transformers import AutoConfig, AutoTokenizer

    from chatft.data.render import chat_format
    from chatft.export.hf import PROBE

    folder = Path(folder)
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder}: no config.json; not a model folder")
    config = AutoConfig.from_pretrained(folder)
    _check_config(config, folder)
    tensors, tensor_notes = _tensor_plans(folder, config, config.model_type, quant)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    require_byte_level_bpe(tokenizer, str(folder))
    meta = read_meta(folder)
    fmt = chat_format(tokenizer)
    msgs = ([{"role": "system", "content": meta.system_prompt}] if meta and meta.system_prompt
            else []) + PROBE
    vocab = vocab_from_tokenizer(tokenizer, config.vocab_size, fmt.eot_id,
                                 extra_texts=[fmt.text(msgs)], where=str(folder))
    return GGUFPlan(folder, config.model_type, config, vocab, tensors, meta, quant,
                    tensor_notes + vocab.notes)


def _encode(tensor: torch.Tensor, t: TensorPlan) -> np.ndarray:
    """One tensor in its GGUF type: ``[rows, cols]`` (or ``[n]``) as the writer takes it."""
    import gguf

    data = tensor.float()
    if t.rope_heads:  # [heads * d, ...] -> each head's rows (h0..h_{d/2-1}, g0..) interleaved
        h = t.rope_heads
        data = data.reshape(h, 2, data.shape[0] // h // 2, *data.shape[1:]).transpose(1, 2)
        data = data.reshape(t.shape)
    array = data.contiguous().numpy()
    q = gguf.GGMLQuantizationType(t.qtype)
    if q == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if q == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, q)


def _nbytes(t: TensorPlan) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.qtype)]
    return int(np.prod(t.shape)) // block * size


def _add_metadata(writer, p: GGUFPlan, name: str) -> None:
    import gguf

    from chatft import __version__

    c = p.config
    heads, kv, head_dim = _hidden(c)
    theta, _ = _rope(c)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != c.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(c.vocab_size))
    writer.add_file_type(int(_qtypes(p.quant)[1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, p.vocab)
    meta = p.meta
    if meta is not None and meta.system_prompt:
        writer.add_string("chatft.system_prompt", meta.system_prompt)
    writer.add_string("chatft.eot_token", p.vocab.tokens[p.vocab.eot_id])
    if meta is not None and meta.base_model:
        writer.add_string("chatft.base_model", meta.base_model)
    writer.add_string("chatft.version", __version__)


def write_gguf(p: GGUFPlan, path: Path, name: str) -> None:
    """Write the planned file at ``path``: header and metadata, then tensor by tensor."""
    import gguf
    from safetensors import safe_open

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[
        {"qwen2": gguf.MODEL_ARCH.QWEN2, "llama": gguf.MODEL_ARCH.LLAMA}[p.arch]])
    _add_metadata(writer, p, name)
    for t in p.tensors:
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), _nbytes(t),
                               raw_dtype=gguf.GGMLQuantizationType(t.qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    handles: dict[Path, object] = {}
    try:
        for t in p.tensors:
            if t.file not in handles:
                handles[t.file] = safe_open(str(t.file), framework="pt")
            writer.write_tensor_data(_encode(handles[t.file].get_tensor(t.hf_name), t))
    finally:
        handles.clear()
        writer.close()


class _QuietProgress:
    """Turns transformers' progress bars off for a block (and back on if they were)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was:
            hf_logging.enable_progress_bar()


def _probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()[0]  # [T, vocab]


def check_gguf(folder: Path, path: Path, quant: str, system: str | None) -> dict:
    """transformers reads the GGUF back: same ids on the probe texts and the probe
    conversation, and logits within the quantization's limits; GGUFExportError otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatft.export.gguf_vocab import PROBE_TEXTS
    from chatft.export.hf import probe_ids

    tok = AutoTokenizer.from_pretrained(folder)
    tok_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    quiet = _QuietProgress()  # transformers' per-tensor progress bars, twice per check
    ids = probe_ids(tok, system)  # [1, T]
    if not torch.equal(probe_ids(tok_gguf, system), ids):
        raise GGUFExportError(f"GGUF check: the file's tokenizer or chat template renders the "
                              f"probe conversation to other ids than {folder}")
    for text in PROBE_TEXTS:
        if tok_gguf(text, add_special_tokens=False)["input_ids"] != \
                tok(text, add_special_tokens=False)["input_ids"]:
            raise GGUFExportError(f"GGUF check: the file's tokenizer encodes {text[:40]!r} "
                                  f"differently from {folder}")
    with quiet:
        ref = _probe_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids)
        got = _probe_logits(AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval(), ids)
    rel = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    report = {"max_rel_diff": rel, "top1_agreement": top1, "probe_tokens": int(ids.shape[1])}
    if not (rel <= MAX_REL_DIFF[quant] and top1 >= MIN_TOP1[quant]):
        raise GGUFExportError(f"GGUF check: logits read back from the {quant} file differ from "
                              f"{folder}'s (max relative difference {rel:.3g}, limit "
                              f"{MAX_REL_DIFF[quant]:g}; top-1 agreement {top1:.1%}, at least "
                              f"{MIN_TOP1[quant]:.0%}); the file was not written")
    return report


@dataclass
class GGUFResult:
    path: Path
    modelfile: Path
    quant: str
    check: dict | None
    notes: list[str]


def default_path(folder: Path, quant: str) -> Path:
    """``runs/x/final`` -> ``runs/x/final-f16.gguf``."""
    return folder.parent / f"{folder.name}-{quant}.gguf"


def export_gguf(folder: str | Path, out: str | Path | None = None, quant: str = "f16",
                check: bool = True) -> GGUFResult:
    """Model folder -> ``out`` (a .gguf) and its Modelfile, checked before being put in place."""
    from chatft.export.ollama import write_modelfile

    folder = Path(folder)
    p = plan(folder, quant)
    path = Path(out) if out else default_path(folder, quant)
    if path.suffix != ".gguf":
        raise GGUFExportError(f"--out {path}: expected a file name ending in .gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.gguf")
    system = p.meta.system_prompt if p.meta else None
    try:
        write_gguf(p, tmp, path.stem)
        report = check_gguf(folder, tmp, quant, system) if check else None
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    from transformers import AutoTokenizer

    modelfile = write_modelfile(path, AutoTokenizer.from_pretrained(folder), system,
                                p.vocab.tokens[p.vocab.eot_id])
    return GGUFResult(path, modelfile, quant, report, p.notes)


def describe(result: GGUFResult) -> str:
    size = result.path.stat().st_size / 2**20
    line = f"chatft: wrote {result.path} ({result.quant}, {size:,.1f} MiB) and {result.modelfile}"
    if result.check:
        line += (f"; read-back check: max relative logit difference "
                 f"{result.check['max_rel_diff']:.2e}, top-1 agreement "
                 f"{result.check['top1_agreement']:.0%}")
    return "\n".join([line] + [f"chatft: note: {n}" for n in result.notes])


def resolve_source(source: str | Path, dtype: str | None) -> Path:
    """``chatft export X --format gguf``: X as a model folder (``runs/x/final``), or a
    checkpoint / run folder, first exported to a Hugging Face folder as ``--format hf`` does
    (a run folder without checkpoints but with ``final/`` means that folder)."""
    from chatft.export.hf import export_checkpoint
    from chatft import checkpoint as ckpt

    folder = Path(source)
    if not folder.is_dir():
        raise GGUFExportError(f"{source}: no such folder (expected an exported model folder "
                              "such as runs/x/final, a checkpoint folder or a run's output_dir)")
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if not ckpt.is_checkpoint(folder) and ckpt.latest_checkpoint(folder) is None and \
            (folder / "final" / "config.json").is_file():
        return folder / "final"
    return export_checkpoint(folder, None, dtype)


def export_after_training(export_dir: Path, export_format: str, quant: str) -> Path:
    """End of ``chatft train`` (process 0): the GGUF of the exported folder next to it; with
    ``export_format`` "gguf" the folder is then removed, leaving the GGUF and its Modelfile."""
    result = export_gguf(export_dir, None, quant)
    print(describe(result), flush=True)
    if export_format == "gguf":
        shutil.rmtree(export_dir)
        print(f"chatft: removed {export_dir} (export_format gguf keeps only the GGUF)", flush=True)
    return result.path
