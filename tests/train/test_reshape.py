"""Resuming on another layout: the global batch is kept, the universal checkpoint is asked for
exactly when the ZeRO shards do not fit this run, and what cannot change is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.config import Config, TrainArgs
from chatft.errors import ConfigError
from chatft.train.reshape import keep_global_batch, plan_resume, saved_layout


def fake_checkpoint(folder: Path, *, engine: str, world: int, stage: int, per_device: int = 4,
                    accumulation: int = 1) -> Path:
    """A checkpoint folder as chatft writes it, with empty shard files named as DeepSpeed's."""
    cfg = Config()
    cfg.train.per_device_train_batch_size = per_device
    cfg.train.gradient_accumulation_steps = accumulation
    cfg.launch.nproc, cfg.deepspeed.zero_stage = world, stage
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "config": cfg.to_dict(), "engine": engine}))
    (folder / "COMPLETE").write_text("ok\n")
    shards = folder / "engine"
    if engine == "torch":
        (folder / "engine_state.pt").write_bytes(b"")
        return folder
    shards.mkdir()
    if stage == 3:
        for r in range(world):
            (shards / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"")
    else:
        (shards / "mp_rank_00_model_states.pt").write_bytes(b"")
    if stage > 0:
        for r in range(world):
            (shards / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    return folder


def test_keep_global_batch_prefers_the_configured_micro_batch():
    assert keep_global_batch(8, 4, 2) == (4, 1)
    assert keep_global_batch(8, 4, 1) == (4, 2)   # 1 process: accumulate
    assert keep_global_batch(8, 4, 4) == (2, 1)   # 4 processes: smaller micro-batches
    assert keep_global_batch(12, 8, 2) == (6, 1)
    assert keep_global_batch(14, 4, 2) == (1, 7)  # 7 is prime
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        keep_global_batch(8, 4, 3)


def test_saved_layout_reads_stage_and_process_count_from_the_shards(tmp_path):
    z2 = saved_layout(fake_checkpoint(tmp_path / "a", engine="deepspeed", world=2, stage=2))
    assert (z2.engine, z2.world_size, z2.zero_stage, z2.global_batch) == ("deepspeed", 2, 2, 8)
    z3 = saved_layout(fake_checkpoint(tmp_path / "b", engine="deepspeed", world=4, stage=3))
    assert (z3.world_size, z3.zero_stage) == (4, 3)
    plain = saved_layout(fake_checkpoint(tmp_path / "c", engine="torch", world=1, stage=0,
                                         per_device=8))
    assert (plain.engine, plain.world_size, plain.global_batch) == ("torch", 1, 8)


def test_another_process_count_keeps_the_global_batch_and_loads_the_universal_form(tmp_path):
    folder = fake_checkpoint(tmp_path / "s", engine="deepspeed", world=2, stage=2)
    same = TrainArgs(per_device_train_batch_size=4)
    assert not plan_resume(folder, same, True, 2, 2).universal  # same layout: the shards
    one = TrainArgs(per_device_train_batch_size=4)
    plan = plan_resume(folder, one, True, 2, 1)
    assert plan.universal and (one.per_device_train_batch_size,
                               one.gradient_accumulation_steps) == (4, 2)
    assert "keeping the checkpoint's global batch of 8 samples on 1 process(es)" in plan.notes[0]
    four = TrainArgs(per_device_train_batch_size=4)
    assert plan_resume(folder, four, True, 2, 4).universal
    assert four.per_device_train_batch_size == 2
    z3 = fake_checkpoint(tmp_path / "z3", engine="deepspeed", world=2, stage=3)
    assert plan_resume(z3, TrainArgs(per_device_train_batch_size=4), True, 3, 4).universal


def test_what_cannot_change_is_refused_naming_the_numbers(tmp_path):
    folder = fake_checkpoint(tmp_path / "s", engine="deepspeed", world=2, stage=2)
    # The user changed the batch itself: refused by the resume's settings check (which names
    # every difference, tests/train/test_train_checkpointing.py) unless --resume_force.
    assert plan_resume(folder, TrainArgs(per_device_train_batch_size=3), True, 2, 2).notes == []
    forced = plan_resume(folder, TrainArgs(per_device_train_batch_size=3, resume_force=True),
                         True, 2, 2)
    assert "global batch of 8 samples (4 per device x 1 accumulation x 2 processes)" in forced.notes[0]
    assert "this run's is 6 (3 x 1 x 2) (--resume_force)" in forced.notes[0]
    with pytest.raises(ConfigError, match="plain PyTorch engine, which cannot read DeepSpeed's"):
        plan_resume(folder, TrainArgs(per_device_train_batch_size=8), False, 0, 1)
    with pytest.raises(ConfigError, match="not to or from stage 0. Resume with --zero_stage 2"):
        plan_resume(folder, TrainArgs(per_device_train_batch_size=4), True, 0, 2)
    with pytest.raises(ConfigError, match="not across stages 1-2 <-> 3 .*--zero_stage 2"):
        plan_resume(folder, TrainArgs(per_device_train_batch_size=4), True, 3, 2)
    plain = fake_checkpoint(tmp_path / "p", engine="torch", world=1, stage=0, per_device=8)
    with pytest.raises(ConfigError, match="written by the plain PyTorch engine") as e:
        plan_resume(plain, TrainArgs(per_device_train_batch_size=4), True, 2, 2)
    assert f"chatft export {plain} -o MODEL" in str(e.value)
