"""Pure pieces of the trainer: lr schedules, DeepSpeed config filling, the bf16 master-weight
optimizer, leaving the process group."""

from __future__ import annotations

import math

import pytest
import torch

from chatft.config_parse import load_config
from chatft.errors import ConfigError
from chatft.train.ds_config import fill_auto, generated_config
from chatft.train.optim import MasterWeightAdamW, param_groups
from chatft.train.schedule import lr_at, warmup_steps_for

# The shape of the tutorial's ds_config.json: ZeRO-2, optimizer and parameters offloaded to
# the CPU, fp16 "auto", AdamW and WarmupDecayLR with "auto" parameters, batch sizes "auto".
TUTORIAL_DS = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
             "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto",
                                                      "total_num_steps": "auto"}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True},
                          "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10,
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def test_lr_schedules_by_hand():
    # warmup 2 of 6 steps, peak 1: 0.5, 1, then decay over the remaining 4 (progress 0, 1/3, 2/3, 1)
    lin = [lr_at(s, peak=1.0, total_steps=6, warmup=2, kind="linear") for s in range(6)]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0])
    cos = [lr_at(s, peak=1.0, total_steps=6, warmup=2, kind="cosine") for s in range(6)]
    assert cos == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.25, 0.0])
    assert [lr_at(s, peak=2.0, total_steps=3, warmup=0, kind="constant") for s in range(3)] == [2.0] * 3
    assert warmup_steps_for(100, 0, 0.03) == 3 and warmup_steps_for(100, 7, 0.5) == 7


def test_tutorial_ds_config_autos_are_filled_from_chatft_config():
    cfg = load_config(None, ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
                             "--nproc", "2", "--learning_rate", "3e-5", "--max_grad_norm", "0.5",
                             "--weight_decay", "0.1"])
    ds, warnings = fill_auto(TUTORIAL_DS, cfg.train, cfg.world_size, precision="bf16",
                             total_steps=100, warmup_steps=0, hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"] == {"lr": 3e-5, "betas": [0.9, 0.95], "eps": 1e-8,
                                         "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-5,
                                         "warmup_num_steps": 1, "total_num_steps": 100}
    # bf16 chosen: fp16 "auto" turns off, bf16 is switched on
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is True
    # offload_param has no effect at stage 2: dropped, with a warning saying so
    assert "offload_param" not in ds["zero_optimization"]
    assert any("offload_param" in w and "stage 2" in w for w in warnings)
    assert any("warmup" in w for w in warnings)
    assert TUTORIAL_DS["fp16"]["enabled"] == "auto"  # the user's dict is not modified


def test_contradicting_explicit_values_and_unknown_autos_are_reported_together():
    cfg = load_config(None, ["--per_device_train_batch_size", "4"])
    bad = dict(TUTORIAL_DS, train_micro_batch_size_per_gpu=2, mystery={"knob": "auto"})
    with pytest.raises(ConfigError) as e:
        fill_auto(bad, cfg.train, cfg.world_size, precision="fp32", total_steps=10, warmup_steps=1,
                  hidden_size=None)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu is 2" in msg and "mystery.knob" in msg


def test_generated_config_has_no_auto_left_after_filling():
    cfg = load_config(None, ["--zero_stage", "3", "--offload_optimizer", "cpu", "--offload_param", "cpu"])
    ds, warnings = fill_auto(generated_config(cfg.deepspeed, "fp32"), cfg.train, cfg.world_size,
                             precision="fp32", total_steps=5, warmup_steps=0, hidden_size=32)
    assert warnings == []
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "auto" not in str(ds)


def test_master_weight_adamw_tracks_fp32_adamw_and_rounds_into_bf16():
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    low = torch.nn.Linear(8, 4).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(low.weight.float())
        ref.bias.copy_(low.bias.float())
    opt_ref = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt = MasterWeightAdamW(param_groups(low, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                            device=torch.device("cpu"), chunk_numel=16)  # several chunks
    assert len(opt.chunks) >= 2
    for step in range(5):
        g = torch.randn(4, 8)
        ref.weight.grad, ref.bias.grad = g.clone(), g[:, 0].clone()
        low.weight.grad, low.bias.grad = g.to(torch.bfloat16), g[:, 0].to(torch.bfloat16)
        opt_ref.step()
        opt.step()
    masters = opt.master_state()
    # masters follow fp32 AdamW up to the bf16 rounding of the gradients
    torch.testing.assert_close(masters[id(low.weight)], ref.weight.detach(), rtol=0, atol=2e-4)
    # the model's bf16 weights are the masters rounded
    assert torch.equal(low.weight.detach(), masters[id(low.weight)].to(torch.bfloat16))


def test_param_groups_do_not_decay_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert math.isclose(sum(p.numel() for g in groups for p in g["params"]), 4 * 4 + 4 + 4 + 4)


def test_finish_distributed_leaves_the_process_group(monkeypatch):
    import torch.distributed as dist

    from chatft.train.distributed import finish_distributed

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    finish_distributed()
    assert not dist.is_initialized()
    finish_distributed()  # nothing to leave: no error


def test_worker_leaves_the_process_group_also_after_an_error(monkeypatch, tmp_path):
    import json

    from chatft.errors import DataError
    from chatft.job import run, worker
    from chatft.train import distributed

    calls = []

    def failing_job(cfg):
        raise DataError("no sample survived preparation", file="d.json")

    monkeypatch.setattr(run, "run_job", failing_job)
    monkeypatch.setattr(distributed, "finish_distributed", lambda: calls.append("finished"))
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(load_config(None, []).to_dict()))
    assert worker.main(["--config-json", str(config_json)]) == 2
    assert calls == ["finished"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_length_by_hand():
    from chatft.config import TrainArgs
    from chatft.train.schedule import RunLength, run_length

    # 10 samples, 4 per device x 2 processes: 8 per step, 2 steps per epoch; 1.5 epochs -> 3
    # steps, warmup ceil(0.03 x 3) = 1
    assert run_length(TrainArgs(num_train_epochs=1.5, per_device_train_batch_size=4), 10, 2) == \
        RunLength(global_batch=8, steps_per_epoch=2, total_steps=3, warmup_steps=1)
    # max_steps wins; accumulation multiplies the global batch
    assert run_length(TrainArgs(max_steps=7, per_device_train_batch_size=2,
                                gradient_accumulation_steps=3, warmup_steps=2), 100, 1) == \
        RunLength(global_batch=6, steps_per_epoch=17, total_steps=7, warmup_steps=2)


def _protocol_members() -> set[str]:
    from chatft.train.engine import Engine

    members = set()
    # Engine and the protocols it extends (TrainedWeights for export, Forward for evaluation).
    for proto in (c for c in Engine.__mro__ if c.__module__.startswith("chatft.")):
        members |= set(proto.__annotations__)
        members |= {k for k, v in vars(proto).items() if callable(v) and not k.startswith("_")}
    return members


def test_the_loop_uses_only_the_engine_protocol():
    """The loop never asks which engine it has: no isinstance/getattr/hasattr, and every
    ``engine.X`` it touches is a member of the Engine protocol."""
    import ast
    import inspect

    from chatft.train import loop

    tree = ast.parse(inspect.getsource(loop))
    asked = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "getattr", "hasattr")}
    assert asked == set()
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "engine"}
    members = _protocol_members()
    assert {"forward", "backward", "step", "save", "load", "eval_mode", "writes_checkpoint"} <= used
    assert used <= members, used - members


def test_the_plain_engine_has_every_call_of_the_protocol_and_an_eval_mode():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from chatft.config import TrainArgs
    from chatft.train.batching import pack
    from chatft.train.engine import DeepSpeedEngine, TorchEngine

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         vocab_size=50, attention_dropout=0.5))
    engine = TorchEngine(TrainArgs(), model, "fp32", torch.device("cpu"), "chunked")
    missing = {m for m in _protocol_members() if not hasattr(engine, m)}
    assert missing == set()
    # the DeepSpeed engine defines the same calls (its attributes are set when it starts)
    assert {m for m in _protocol_members() if callable(getattr(TorchEngine, m, None))} <= \
        {m for m in dir(DeepSpeedEngine) if callable(getattr(DeepSpeedEngine, m))}
    assert (engine.description, engine.kind, engine.rank, engine.world_size) == ("PyTorch", "torch", 0, 1)
    import numpy as np

    batch = pack([(np.arange(1, 9), np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=bool))])
    with engine.eval_mode():
        assert not model.training and not torch.is_grad_enabled()
        a, n = engine.forward(batch)
        b, _ = engine.forward(batch)
        assert torch.equal(a, b) and int(n) == 5  # no dropout; the 5 trained tokens are targets
        assert not a.requires_grad
    assert model.training and torch.is_grad_enabled()
