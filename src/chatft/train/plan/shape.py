"""The shape of a decoder-only Llama/Qwen-style model as the memory planner sees it: every
parameter tensor and its size, read from the model's config alone (no weights)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chatft.errors import ChatftError
from chatft.train.optim import MASTER_CHUNK_NUMEL


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a decoder-only Llama/Qwen-style model."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = 0  # 0: hidden_size // num_heads
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False  # Llama with attention_bias: every projection does
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over q and k heads (2*hd weights)
    model_type: str = ""

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        """From a transformers config object or its dict (``config.json``)."""
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            config = config.to_dict()
        text = _get(config, "text_config")
        if text is not None and _get(config, "hidden_size") is None:
            config = text if isinstance(text, Mapping) else text.to_dict()
        for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
            if _get(config, moe):
                raise ChatftError(f"chatft plan models dense decoders; this config has {moe}="
                                  f"{_get(config, moe)} (mixture of experts)")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if _get(config, k) is None]
        if missing:
            raise ChatftError(f"the model config lacks {', '.join(missing)}: chatft plan needs a "
                              "Llama/Qwen-style decoder config")
        model_type = str(_get(config, "model_type", "") or "")
        heads = int(_get(config, "num_attention_heads"))
        hidden = int(_get(config, "hidden_size"))
        attention_bias = bool(_get(config, "attention_bias", False))
        return cls(
            hidden_size=hidden,
            intermediate_size=int(_get(config, "intermediate_size")),
            num_layers=int(_get(config, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_get(config, "num_key_value_heads") or heads),
            vocab_size=int(_get(config, "vocab_size")),
            tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)),
            head_dim=int(_get(config, "head_dim") or hidden // heads),
            # Qwen2's attention always has q/k/v biases (its config has no switch for it).
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(_get(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            model_type=model_type,
        )

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def parameters(self) -> list[tuple[str, int, int]]:
        """``(name, numel, ndim)`` of every parameter, in ``named_parameters()`` order of the
        transformers ``*ForCausalLM`` (tied ``lm_head`` counted once, as the embedding)."""
        h, i, qd, kvd = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        out: list[tuple[str, int, int]] = [("model.embed_tokens.weight", self.vocab_size * h, 2)]
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            for name, rows, bias in (("q_proj", qd, self.qkv_bias), ("k_proj", kvd, self.qkv_bias),
                                     ("v_proj", kvd, self.qkv_bias)):
                out.append((f"{p}self_attn.{name}.weight", rows * h, 2))
                if bias:
                    out.append((f"{p}self_attn.{name}.bias", rows, 1))
            out.append((f"{p}self_attn.o_proj.weight", h * qd, 2))
            if self.o_bias:
                out.append((f"{p}self_attn.o_proj.bias", h, 1))
            if self.qk_norm:
                out += [(f"{p}self_attn.q_norm.weight", self.hd, 1),
                        (f"{p}self_attn.k_norm.weight", self.hd, 1)]
            for name, rows, cols in (("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)):
                out.append((f"{p}mlp.{name}.weight", rows * cols, 2))
                if self.mlp_bias:
                    out.append((f"{p}mlp.{name}.bias", rows, 1))
            out += [(f"{p}input_layernorm.weight", h, 1),
                    (f"{p}post_attention_layernorm.weight", h, 1)]
        out.append(("model.norm.weight", h, 1))
        if not self.tie_word_embeddings:
            out.append(("lm_head.weight", self.vocab_size * h, 2))
        return out

    def gradient_order(self) -> list[int]:
        """Element counts of the parameters in the order the backward pass finishes their
        gradients (what an optimizer step in backward sees): ``lm_head``, the final norm, then
        each layer from the last (down, up, gate, post-attention norm, o, q/k norms, v, k, q
        each with its bias, input norm), the embeddings last. A tied ``lm_head`` is the
        embedding: its gradient is complete only after the embedding's part, so it comes last."""
        h, i, qd, kvd = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        mb, ob, qb = int(self.mlp_bias), int(self.o_bias), int(self.qkv_bias)
        layer = [h * i] + [h] * mb + ([i * h] + [i] * mb) * 2 + [h]  # down, up, gate, norm
        layer += [h * qd] + [h] * ob + [self.hd, self.hd] * int(self.qk_norm)
        for rows in (kvd, kvd, qd):  # v, k, q
            layer += [rows * h] + [rows] * qb
        layer.append(h)  # input norm
        head = [] if self.tie_word_embeddings else [self.vocab_size * h]
        return head + [h] + layer * self.num_layers + [self.vocab_size * h]

    @functools.cached_property
    def n_params(self) -> int:
        return sum(n for _, n, _ in self.parameters())

    @functools.cached_property
    def layer_params(self) -> int:
        return sum(n for name, n, _ in self.parameters() if name.startswith("model.layers.0."))

    @functools.cached_property
    def largest_param(self) -> int:
        return max(n for _, n, _ in self.parameters())

    def master_chunk_numel(self, chunk_numel: int = MASTER_CHUNK_NUMEL) -> int:
        """Largest group MasterWeightAdamW steps at once: parameters split into decay (>= 2-D)
        and no-decay groups, each cut into runs that close once they reach ``chunk_numel``."""
        largest = 0
        for group in ([n for _, n, d in self.parameters() if d >= 2],
                      [n for _, n, d in self.parameters() if d < 2]):
            size = 0
            for n in group:
                size += n
                if size >= chunk_numel:
                    largest, size = max(largest, size), 0
            largest = max(largest, size)
        return largest

    def describe(self) -> str:
        kind = self.model_type or "decoder"
        return (f"{kind} {self.n_params / 1e9:.2f}B params (hidden {self.hidden_size}, "
                f"{self.num_layers} layers, {self.num_heads}/{self.num_kv_heads} heads, "
                f"vocab {self.vocab_size})")
