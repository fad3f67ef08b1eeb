"""Every shipped config parses, validates, and names its launch command in its header."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatft.config_parse import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    names = {p.name for p in CONFIGS}
    assert {"huanhuan_qwen7b_zero2_offload.yaml", "huanhuan_qwen7b_zero3.yaml",
            "smollm2_persona.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_validates(path):
    cfg = load_config(path)
    header = [l for l in path.read_text(encoding="utf-8").splitlines() if l.startswith("#")]
    launch = [l for l in header if "chatft train " + str(path.relative_to(path.parents[1])) in l]
    assert launch, f"{path.name}: no launch command in the header comment"
    assert cfg.train.output_dir.startswith("runs/")


def test_the_tutorial_job_config_says_what_the_tutorial_did_right_and_wrong():
    cfg = load_config(CONFIGS[0].parent / "huanhuan_qwen7b_zero2_offload.yaml", ["--nproc", "4"])
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.offload_optimizer == "cpu"
    assert cfg.uses_deepspeed and cfg.data.system == "现在你要扮演皇帝身边的女人--甄嬛."
    assert cfg.data.max_length >= 4096  # the tutorial's 128 cut 127 samples
    t = cfg.train
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.world_size == 128


def test_default_job_config_equals_no_arguments():
    from chatft.cli import train_config

    shipped = load_config(CONFIGS[0].parent / "smollm2_persona.yaml").to_dict()
    assert train_config([]).to_dict() == shipped
    assert train_config(["--max_steps", "3"]).train.learning_rate == shipped["train"]["learning_rate"]


def test_bringing_your_own_model_or_data_starts_from_the_generic_defaults():
    from chatft.cli import train_config

    generic = load_config().train.learning_rate
    assert train_config(["--model", "/some/model"]).train.learning_rate == generic
    assert train_config(["--data.path", "mine.json"]).train.num_train_epochs == 3
    assert generic < train_config([]).train.learning_rate
