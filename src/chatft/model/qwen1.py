"""Qwen-1 folders (``model_type: qwen``) on the native Qwen2 architecture, without remote code.

A Qwen-7B-Chat folder as users download it holds ``config.json`` (``model_type: qwen``),
``qwen.tiktoken``, weight shards (``model-0000x-of-0000y.safetensors`` or
``pytorch_model-*.bin``, usually with an index json) and Python files
(``modeling_qwen.py``, ``tokenization_qwen.py``, ``qwen_generation_utils.py``) that current
transformers no longer runs reliably. Qwen-1's decoder is, within its trained context,
exactly the network transformers ships as Qwen2 with one key/value head per query head, so
chatft renames and splits the tensors and never imports the folder's code.

The network (from Qwen's published ``modeling_qwen.py``), per layer, ``H`` = hidden size:

* ``ln_1`` / ``ln_2`` / ``ln_f``: RMSNorm, eps = ``layer_norm_epsilon``, computed in fp32.
* ``attn.c_attn``: one Linear ``H -> 3H`` with bias; its output splits into q, k, v in that
  order. Its weight ``[3H, H]`` and bias ``[3H]`` split along dim 0 into three ``H`` chunks
  -> ``q_proj``, ``k_proj``, ``v_proj`` (Qwen2 has biases on exactly these three).
* Rotary embedding on all of each head's dims (``rotary_pct`` 1), inverse frequencies
  ``rotary_emb_base ** (-2i/d)``, the two halves of a head rotated against each other
  (``rotate_half``) — the same layout as Qwen2's rotary embedding.
* Causal softmax attention scaled by ``1/sqrt(head_dim)``; ``attn.c_proj`` (no bias) ->
  ``o_proj``.
* MLP: ``c_proj(w1(x) * silu(w2(x)))``. ``w2`` is the one through SiLU, so ``w2`` ->
  ``gate_proj``, ``w1`` -> ``up_proj``, ``c_proj`` -> ``down_proj``. Qwen-1's config stores
  ``intermediate_size`` doubled (each of w1/w2 has ``intermediate_size // 2`` outputs).
* ``transformer.wte`` -> ``model.embed_tokens``; ``lm_head`` stays (not tied to the
  embeddings).

Features that only act past the trained context. Qwen-7B-Chat ships ``use_logn_attn`` and
``use_dynamic_ntk`` switched on; both are inference-time tricks for prompts longer than
``seq_length`` (2048 for the first Qwen-7B release, 8192 for the later one):

* ``use_logn_attn`` multiplies the query at (1-based) position ``p`` by
  ``log(p) / log(seq_length)`` when ``p > seq_length``; for ``p <= seq_length`` the factor
  is exactly 1.
* ``use_dynamic_ntk`` raises the rotary base to
  ``base * alpha ** (d / (d - 2))`` with ``alpha = 2 ** ceil(log2(L / seq_length) + 1) - 1``
  for a sequence of length ``L``; for ``L <= seq_length`` this gives ``alpha = 1``, the
  trained base.

Both are off in Qwen-1's training mode. Within ``seq_length`` tokens they change nothing,
so the conversion reproduces Qwen-1's outputs exactly there (the tests compare logits to an
independent implementation of Qwen-1's forward pass). chatft applies neither beyond
``seq_length``: the converted config's ``max_position_embeddings`` is ``seq_length``, and
:func:`load_qwen1_model` warns when training asks for a ``max_length`` above it.

Chat format: Qwen-1's ``model.chat`` renders ChatML (``make_context`` with
``chat_format="chatml"``), which chatft reproduces with the template of
:func:`chatft.model.qwen_tokenizer.build_qwen_tokenizer`. Qwen-1 tokenizes the role, the
newline after it and the content separately, chatft tokenizes the rendered text at once;
the ids are equal unless a message starts with a newline (Qwen-1's pieces keep the role's
``\\n`` a token of its own, whole-text tokenization merges it with the content's leading
newlines).
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from chatft.errors import ChatftError
from chatft.model.weights import check_weights

log = logging.getLogger("chatft")

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

#: Qwen's special token ids (see :mod:`chatft.model.qwen_tokenizer`).
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645

#: Output dtypes of :func:`convert_qwen1`, by their command-line names.
DTYPES = ("bf16", "fp16", "fp32")

#: Output shard size of :func:`convert_qwen1`: each shard is written as soon as it is
#: full, so host memory holds at most one output shard plus the tensor being converted.
DEFAULT_SHARD_BYTES = 2 * 1024**3

#: Qwen-1 keys under an older and a newer name (the first Qwen-7B release used GPT-2 style
#: names); the newer name wins when both are present.
_KEY_ALIASES = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "seq_length": ("seq_length", "max_position_embeddings", "n_positions"),
    "vocab_size": ("vocab_size", "padded_vocab_size"),
}

#: Buffers that some Qwen-1 versions saved with the weights; they are recomputed, not learned.
_BUFFER_RE = re.compile(r"transformer\.(?:h\.\d+\.attn\.)?"
                        r"(?:rotary_emb\.inv_freq|bias|masked_bias|logn_tensor)")
_LAYER_RE = re.compile(r"transformer\.h\.(\d+)\.(.+)$")
#: Qwen-1 layer tensor -> Qwen2 layer tensor (the fused c_attn is handled apart).
_LAYER_MAP = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",  # w1(x) is the linear factor
    "mlp.w2.weight": "mlp.gate_proj.weight",  # silu(w2(x)) is the gate
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _config_value(cfg: dict, key: str):
    for name in _KEY_ALIASES.get(key, (key,)):
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def _unsupported(cfg: dict) -> list[str]:
    """Every way ``cfg`` differs from the Qwen-1 variants chatft converts exactly."""
    problems = []
    if cfg.get("model_type") != "qwen":
        problems.append(f"model_type is {cfg.get('model_type')!r}, not 'qwen'")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "vocab_size", "seq_length"):
        value = _config_value(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key} is {value!r}, expected a positive integer")
    if problems:
        return problems
    hidden, heads = _config_value(cfg, "hidden_size"), _config_value(cfg, "num_attention_heads")
    if hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    kv_channels = cfg.get("kv_channels", hidden // heads)
    if kv_channels * heads != hidden:
        problems.append(f"kv_channels * num_attention_heads = {kv_channels} * {heads} is not "
                        f"hidden_size {hidden} (Qwen2 needs head_dim * heads == hidden_size)")
    if _config_value(cfg, "intermediate_size") % 2:
        problems.append("intermediate_size is odd; Qwen-1 stores twice the MLP width")
    if float(cfg.get("rotary_pct", 1.0)) != 1.0:
        problems.append(f"rotary_pct is {cfg['rotary_pct']}; only full-width rotary "
                        "embeddings (1.0) convert to Qwen2")
    if cfg.get("pos_emb", "rotary") != "rotary":
        problems.append(f"pos_emb is {cfg['pos_emb']!r}; only rotary embeddings convert")
    if cfg.get("no_bias", True) is not True:
        problems.append("no_bias is false: attn.c_proj and the MLP carry biases, which "
                        "Qwen2 has no place for")
    if cfg.get("apply_residual_connection_post_layernorm"):
        problems.append("apply_residual_connection_post_layernorm is true; Qwen2 adds the "
                        "residual before the norm")
    if cfg.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings is true; Qwen-1 chat models keep a separate "
                        "lm_head and only that layout is converted")
    if cfg.get("quantization_config"):
        problems.append("the weights are quantized (quantization_config); convert the "
                        "full-precision Qwen-1 checkpoint instead")
    for key in ("visual", "audio"):
        if cfg.get(key):
            problems.append(f"the config has a '{key}' tower (Qwen-VL / Qwen-Audio); only "
                            "the text-only Qwen-1 chat models are supported")
    return problems


def qwen2_config_from_qwen1(cfg: dict) -> "Qwen2Config":
    """The Qwen2 config equal to Qwen-1's ``config.json`` ``cfg``, within its trained context.

    Raises :class:`ChatftError` listing every unsupported setting rather than converting a
    variant whose forward pass Qwen2 would compute differently.
    """
    from transformers import Qwen2Config

    problems = _unsupported(cfg)
    if problems:
        raise ChatftError("this Qwen-1 checkpoint cannot be converted exactly: "
                          + "; ".join(problems))
    heads = _config_value(cfg, "num_attention_heads")
    seq_length = _config_value(cfg, "seq_length")
    return Qwen2Config(
        vocab_size=_config_value(cfg, "vocab_size"),
        hidden_size=_config_value(cfg, "hidden_size"),
        intermediate_size=_config_value(cfg, "intermediate_size") // 2,
        num_hidden_layers=_config_value(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=heads,  # Qwen-1 is plain multi-head attention
        hidden_act="silu",
        # The trained context: logn scaling and dynamic NTK only act beyond it (see above).
        max_position_embeddings=seq_length,
        initializer_range=cfg.get("initializer_range", 0.02),
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        use_cache=True,
        tie_word_embeddings=False,
        rope_theta=float(cfg.get("rotary_emb_base", 10000)),
        use_sliding_window=False,
        attention_dropout=float(cfg.get("attn_dropout_prob", cfg.get("attn_pdrop", 0.0)) or 0.0),
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID,  # a chat model's turn ends with <|im_end|>
        pad_token_id=ENDOFTEXT_ID,  # Qwen-1 has no pad token; <|endoftext|> never appears in chats
        architectures=["Qwen2ForCausalLM"],
    )


def generation_config_for(folder: str | Path) -> "GenerationConfig":
    """Stop on ``<|im_end|>`` and ``<|endoftext|>``, pad with ``<|endoftext|>``; sampling
    settings (``top_p``, ``repetition_penalty``, ...) are kept from the folder's own
    ``generation_config.json`` when it has one."""
    from transformers import GenerationConfig

    kept = {}
    path = Path(folder) / "generation_config.json"
    if path.is_file():
        try:
            src = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ChatftError(f"{path}: not valid JSON") from None
        kept = {k: src[k] for k in ("do_sample", "temperature", "top_k", "top_p",
                                    "repetition_penalty", "max_new_tokens") if k in src}
    return GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
                            pad_token_id=ENDOFTEXT_ID, **kept)


def read_qwen1_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ChatftError(f"{folder}: no config.json; not a Qwen-1 model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ChatftError(f"{path}: not valid JSON") from None
    if cfg.get("model_type") != "qwen":
        raise ChatftError(f"{path}: model_type is {cfg.get('model_type')!r}, not 'qwen'")
    return cfg


def _read_shard(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """The tensors of one shard, one at a time. safetensors reads each tensor on request;
    ``.bin`` shards are memory-mapped, so only the tensor being used is paged in."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ChatftError(f"{path}: cannot read the weights: {e}") from None
        # A legacy (pre zip format) file cannot be mapped; it is read whole, one shard.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files
        raise ChatftError(f"{path}: cannot read the weights: {e}") from None
    if not isinstance(state, dict):
        raise ChatftError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name in list(state):
        yield name, state.pop(name)  # dropping our reference frees it once the caller is done
    del state


def expected_shapes(config: "Qwen2Config") -> dict[str, tuple[int, ...]]:
    """Every Qwen2 tensor the converted checkpoint must hold, with its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i)})
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
            shapes[p + f"self_attn.{proj}.bias"] = (h,)
    return shapes


def _convert_one(name: str, tensor: "torch.Tensor", hidden: int
                 ) -> list[tuple[str, "torch.Tensor"]] | None:
    """Qwen2 ``(name, tensor)`` pairs for one Qwen-1 tensor; ``[]`` for a saved buffer;
    ``None`` for a name that is not part of Qwen-1."""
    if name in _TOP_MAP:
        return [(_TOP_MAP[name], tensor)]
    if _BUFFER_RE.fullmatch(name):
        return []
    m = _LAYER_RE.match(name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    prefix = f"model.layers.{layer}."
    if rest in _LAYER_MAP:
        return [(prefix + _LAYER_MAP[rest], tensor)]
    if rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
        kind = rest.rsplit(".", 1)[1]
        if tensor.shape[0] != 3 * hidden:
            raise ChatftError(f"{name} has shape {tuple(tensor.shape)}; expected "
                              f"{3 * hidden} rows (q, k, v of hidden size {hidden})")
        # [3H, H] weight / [3H] bias: rows [0, H) make q, [H, 2H) k, [2H, 3H) v, the order
        # in which Qwen-1 splits c_attn's output.
        q, k, v = tensor.split(hidden, dim=0)
        return [(prefix + f"self_attn.{proj}.{kind}", part)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))]
    return None


def iter_converted_tensors(folder: str | Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Qwen2 ``(name, tensor)`` pairs of a Qwen-1 folder, read shard by shard.

    Tensors keep the checkpoint's dtype and may be views of the shard being read (the
    q/k/v parts of ``c_attn``, memory-mapped ``.bin`` tensors): copy what you keep. Checks
    every shape and, at the end, that every Qwen2 tensor was produced exactly once.
    """
    folder = Path(folder)
    config = qwen2_config_from_qwen1(read_qwen1_config(folder))
    shapes = expected_shapes(config)
    seen: set[str] = set()
    for path in check_weights(folder):
        for name, tensor in _read_shard(path):
            converted = _convert_one(name, tensor, config.hidden_size)
            if converted is None:
                raise ChatftError(f"{path}: tensor {name!r} is not part of the Qwen-1 "
                                  "architecture chatft converts (a fine-tuned variant with "
                                  "extra modules, or not a Qwen-1 checkpoint?)")
            for new_name, part in converted:
                want = shapes.get(new_name)
                if want is None:
                    raise ChatftError(f"{path}: tensor {name!r} maps to {new_name}, which the "
                                      f"config ({config.num_hidden_layers} layers) does not have")
                if tuple(part.shape) != want:
                    raise ChatftError(f"{path}: tensor {name!r} has shape "
                                      f"{tuple(tensor.shape)}, but config.json implies {want} "
                                      f"for {new_name}")
                if new_name in seen:
                    raise ChatftError(f"{path}: tensor {name!r} appears in more than one shard")
                seen.add(new_name)
                yield new_name, part
    missing = sorted(set(shapes) - seen)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ChatftError(f"{folder}: the weights are incomplete; missing after conversion: "
                          f"{shown}")


def context_warning(folder: str | Path, max_length: int) -> str | None:
    """The warning for training ``max_length`` tokens on a Qwen-1 model, if it exceeds the
    trained context (``seq_length``), else ``None``."""
    cfg = read_qwen1_config(folder)
    seq_length = _config_value(cfg, "seq_length")
    if not isinstance(seq_length, int) or max_length <= seq_length:
        return None
    tricks = [k for k in ("use_logn_attn", "use_dynamic_ntk") if cfg.get(k)]
    extra = (f"; Qwen-1's {' and '.join(tricks)} (its inference-time context extension) is "
             "not applied by chatft" if tricks else "")
    return (f"max_length {max_length} exceeds this Qwen-1 model's trained context "
            f"(seq_length {seq_length}): positions beyond it were never trained{extra}")


def load_qwen1_model(folder: str | Path, dtype: "torch.dtype | None" = None, *,
                     attn_implementation: str | None = None,
                     max_length: int | None = None) -> "Qwen2ForCausalLM":
    """A ``Qwen2ForCausalLM`` holding a Qwen-1 folder's weights, built in memory.

    The model is created with empty (meta) parameters and each converted tensor is put in
    place as its shard is read, so host memory holds the model once plus one tensor.
    ``dtype`` defaults to fp32. With ``max_length`` above the trained context a warning is
    logged (see :func:`context_warning`). Returned in eval mode, like ``from_pretrained``.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen2ForCausalLM

    dtype = dtype or torch.float32
    folder = Path(folder)
    config = qwen2_config_from_qwen1(read_qwen1_config(folder))
    config.dtype = dtype
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    if max_length is not None and (message := context_warning(folder, max_length)):
        log.warning(message)
    with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) real
        model = Qwen2ForCausalLM(config)
    for name, tensor in iter_converted_tensors(folder):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        # copy=True: the tensor may be a view of a memory-mapped shard or of c_attn.
        module._parameters[leaf] = torch.nn.Parameter(tensor.to(dtype, copy=True))
    model.generation_config = generation_config_for(folder)
    model.eval()
    return model


@dataclass
class ConvertResult:
    """What :func:`convert_qwen1` wrote."""

    folder: Path
    weight_files: list[str]
    tokenizer_files: list[str]
    n_tensors: int
    weight_bytes: int
    dtype: str
    peak_rss_bytes: int  # peak resident memory of this process so far (ru_maxrss)
    other_files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        gib = 1024**3
        return [
            f"wrote:     {self.folder}",
            f"weights:   {len(self.weight_files)} shard(s), {self.n_tensors} tensors, "
            f"{self.weight_bytes / gib:.2f} GiB {self.dtype} ({', '.join(self.weight_files)})",
            f"tokenizer: {', '.join(self.tokenizer_files)}",
            f"also:      {', '.join(self.other_files)}",
            f"peak RSS:  {self.peak_rss_bytes / gib:.2f} GiB",
        ]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _write_shard(tensors: dict[str, "torch.Tensor"], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _default_permissions(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain ``mkdir``/``open`` would (the
    temporary folder is created private, and safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def convert_qwen1(src: str | Path, dst: str | Path, dtype: str = "bf16", *,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ConvertResult:
    """Write a plain Hugging Face Qwen2 folder from a Qwen-1 folder.

    ``dst`` gets ``config.json``, ``model-XXXXX-of-YYYYY.safetensors`` shards (each written
    as soon as it reaches ``max_shard_bytes``) with ``model.safetensors.index.json``, the
    tokenizer built from ``qwen.tiktoken`` and a ``generation_config.json`` that stops on
    ``<|im_end|>`` and ``<|endoftext|>``. The folder appears only when complete.
    """
    import torch

    from chatft.model.qwen_tokenizer import build_qwen_tokenizer

    if dtype not in DTYPES:
        raise ChatftError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    src, dst = Path(src), Path(dst)
    config = qwen2_config_from_qwen1(read_qwen1_config(src))
    tiktoken_file = src / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        raise ChatftError(f"{src}: no qwen.tiktoken; the tokenizer cannot be built")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ChatftError(f"{dst} already exists and is not an empty folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.tmp-"))
    try:
        shards: list[tuple[Path, list[str]]] = []
        buffer: dict[str, torch.Tensor] = {}
        buffered = total = n_tensors = 0

        def flush() -> None:
            nonlocal buffer, buffered
            path = tmp / f"model-{len(shards) + 1:05d}.safetensors"
            _write_shard(buffer, path)
            shards.append((path, list(buffer)))
            buffer, buffered = {}, 0

        for name, tensor in iter_converted_tensors(src):
            # copy=True: a fresh contiguous tensor, never a view of the source shard.
            out = tensor.to(torch_dtype, copy=True).contiguous()
            size = out.numel() * out.element_size()
            if buffer and buffered + size > max_shard_bytes:
                flush()
            buffer[name] = out
            buffered += size
            total += size
            n_tensors += 1
        flush()

        # Final names need the shard count, known only now.
        weight_map: dict[str, str] = {}
        names = []
        for i, (path, tensor_names) in enumerate(shards, start=1):
            final = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                     else "model.safetensors")
            os.replace(path, tmp / final)
            names.append(final)
            weight_map.update({t: final for t in tensor_names})
        other = ["config.json", "generation_config.json"]
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            other.append("model.safetensors.index.json")
        config.dtype = torch_dtype
        config.save_pretrained(tmp)
        generation_config_for(src).save_pretrained(tmp)
        before = set(os.listdir(tmp))
        build_qwen_tokenizer(tiktoken_file).save_pretrained(tmp)
        tokenizer_files = sorted(set(os.listdir(tmp)) - before)
        _default_permissions(tmp)
        if dst.exists():
            dst.rmdir()  # checked empty above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConvertResult(dst, names, tokenizer_files, n_tensors, total, dtype,
                         peak_rss_bytes(), other)
