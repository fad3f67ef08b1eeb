"""In-process training of a tiny Qwen2 on the plain engine with any optimizer choice, for the
optimizer tests (tests/train/test_optim_choice.py, test_in_backward.py).

The model (2 layers, width 64, 4 heads, 4 key-value heads, MLP width 64, 512-token
vocabulary) has two tensor shapes torchao quantizes -- ``[512, 64]`` (embeddings, ``lm_head``)
and ``[64, 64]`` (every projection: 4096 elements, a multiple of both block sizes) -- and
``[64]`` biases and norm weights it leaves in fp32, so each optimizer compiles its update for
three shapes only. The data: 4 fixed micro-batches of 4 sequences of 32 tokens following
``x[k+1] = 3 x[k] + 7 mod 512``: learnable, so the loss falls from ~6.3.
"""

from __future__ import annotations

import torch

from chatft.config import Config
from chatft.train.batching import Batch
from chatft.train.engine import TorchEngine

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
             max_position_embeddings=64)


def tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(dtype)


def batches() -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        start = torch.randint(0, 512, (4,), generator=g)
        seq = [start]
        for _ in range(32):
            seq.append((seq[-1] * 3 + 7) % 512)
        seq = torch.stack(seq, 1)  # [4, 33]
        out.append(Batch(seq[:, :-1].reshape(1, -1), torch.arange(32).repeat(4)[None],
                         seq[:, 1:].reshape(1, -1), None))
    return out


def make_engine(precision: str, lr: float, device: str = "cpu", **train) -> TorchEngine:
    cfg = Config()
    cfg.train.precision = precision
    cfg.train.learning_rate = lr
    cfg.train.weight_decay = 0.01
    cfg.train.max_grad_norm = 0.0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    cfg.validate()
    model = tiny_model(torch.bfloat16 if precision == "bf16" else torch.float32)
    return TorchEngine(cfg.train, model, precision, torch.device(device), "chunked")


def train_steps(engine: TorchEngine, steps: range, lr: float, decay: float = 0.0) -> list[float]:
    """One micro-batch per step, seeded per step like chatft's loop; the per-step losses. The
    learning rate of step ``s`` is ``lr * (1 - decay * s)``."""
    data, losses = batches(), []
    for step in steps:
        torch.manual_seed(100 + step)  # stochastic rounding draws from it
        rate = lr * (1 - decay * step)
        engine.begin_step(rate)
        loss_sum, n = engine.forward(data[step % len(data)])
        engine.backward(loss_sum / n, True)
        engine.step(rate)
        losses.append(float(loss_sum.detach() / n))
    return losses


def weights(engine: TorchEngine) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in engine.full_state_dict().items()}


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                      start: dict[str, torch.Tensor]) -> float:
    """|a - b| / |b - start| over all weights: how far ``a``'s training moved from ``b``'s,
    relative to how far ``b`` moved."""
    num = sum(float((a[k] - b[k]).square().sum()) for k in b)
    den = sum(float((b[k] - start[k]).square().sum()) for k in b)
    return (num / den) ** 0.5
