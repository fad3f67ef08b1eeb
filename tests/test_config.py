"""Config: YAML, --dotted.key and bare-name overrides, types, one error for every problem."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from chatft.config import SECTIONS, Config, DataArgs
from chatft.config_parse import config_from_dict, field_docs, load_config, options_help, parse_overrides
from chatft.errors import ConfigError


def yaml_file(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(*args, **kw) -> list[str]:
    """The bullet lines of the ConfigError that loading raises."""
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kw)
    head, *bullets = str(e.value).split("\n")
    assert head == "invalid configuration:"
    assert all(b.startswith("  - ") for b in bullets)
    return [b[4:] for b in bullets]


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == Config() and cfg.problems() == []
    assert cfg.data.max_length == 4096 and cfg.data.train_on == "assistant"
    assert cfg.data.overlong == "drop" and cfg.data.verify_labels is True


def test_yaml_values_are_typed(tmp_path):
    path = yaml_file(tmp_path, """
        model:
          name_or_path: /models/qwen
          liger_kernel: off        # YAML reads a bare off as false; the field wants 'off'
        data:
          path: data.jsonl
          system: 现在你要扮演皇帝身边的女人--甄嬛.
          max_length: 512
          skip_bad: yes
          train_on: last
        train:
          learning_rate: 2e-5
          num_train_epochs: 1
          max_grad_norm: 0
        launch:
          master_port: 29500
    """)
    cfg = load_config(path)
    assert cfg.model.name_or_path == "/models/qwen" and cfg.model.liger_kernel == "off"
    assert cfg.data.system == "现在你要扮演皇帝身边的女人--甄嬛."
    assert (cfg.data.max_length, cfg.data.skip_bad, cfg.data.train_on) == (512, True, "last")
    assert cfg.train.learning_rate == 2e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.num_train_epochs == 1.0 and isinstance(cfg.train.num_train_epochs, float)
    assert cfg.launch.master_port == 29500


def test_overrides_beat_yaml_dotted_and_bare(tmp_path):
    path = yaml_file(tmp_path, """
        data:
          max_length: 512
          system: from yaml
        train:
          seed: 1
    """)
    cfg = load_config(path, ["--data.max_length", "100", "--system=from cli", "--seed", "7",
                             "--train.learning_rate=3e-4", "--per-device-train-batch-size", "2"])
    assert cfg.data.max_length == 100 and cfg.data.system == "from cli"
    assert cfg.train.seed == 7 and cfg.train.learning_rate == 3e-4
    assert cfg.train.per_device_train_batch_size == 2  # dashes read as underscores


def test_aliases():
    cfg = load_config(None, ["--model", "/m", "--data", "d.json"])
    assert (cfg.model.name_or_path, cfg.data.path) == ("/m", "d.json")


def test_bare_boolean_flags():
    assert load_config(None, ["--skip-bad"]).data.skip_bad is True
    cfg = load_config(None, ["--skip-bad", "--max_length", "12", "--compile"])
    assert (cfg.data.skip_bad, cfg.data.max_length, cfg.model.compile) == (True, 12, True)
    assert load_config(None, ["--packing", "false"]).data.packing is False
    assert load_config(None, ["--data.verify_labels=no"]).data.verify_labels is False
    assert load_config(None, ["--skip_bad", "0"]).data.skip_bad is False


def test_optional_values_and_integers():
    cfg = load_config(None, ["--system", "null", "--eval_file", "none", "--max_length", "010"])
    assert cfg.data.system is None and cfg.data.eval_file is None
    assert cfg.data.max_length == 10  # base 10, not an octal puzzle
    assert load_config(None, ["--master_port", "29501"]).launch.master_port == 29501


def test_type_errors():
    assert problems_of(None, ["--max_length", "abc"]) == ["data.max_length: 'abc' is not an integer"]
    assert problems_of(None, ["--max_length", "1.5"]) == ["data.max_length: '1.5' is not an integer"]
    assert problems_of(None, ["--learning_rate", "fast"]) == [
        "train.learning_rate: 'fast' is not a number"]
    assert problems_of(None, ["--skip-bad", "maybe"]) == [
        "data.skip_bad: 'maybe' is not a boolean (true/false)"]
    assert problems_of(None, ["--train_on", "everything"]) == [
        "data.train_on: 'everything' is not one of assistant, last, all"]


def test_yaml_type_errors(tmp_path):
    path = yaml_file(tmp_path, """
        data:
          max_length: [1]
          system: {a: 1}
          skip_bad: 3
        train:
          seed: true
    """)
    assert problems_of(path) == ["data.max_length: [1] is not an integer",
                                 "data.system: expected a string, got dict",
                                 "data.skip_bad: 3 is not a boolean (true/false)",
                                 "train.seed: True is not a number"]


def test_unknown_keys(tmp_path):
    assert problems_of(None, ["--lr", "1", "--data.bogus", "3", "--nosection.x", "1"]) == [
        "unknown option --lr", "unknown option --data.bogus", "unknown option --nosection.x"]
    path = yaml_file(tmp_path, """
        data:
          bogus: 1
        trainer:
          seed: 1
    """)
    assert problems_of(path) == [f"{path}: unknown key data.bogus",
                                 f"{path}: unknown section 'trainer' (sections: model, data, "
                                 "train, deepspeed, launch)"]


def test_malformed_command_lines():
    assert problems_of(None, ["--max_length"]) == ["option --max_length needs a value"]
    assert problems_of(None, ["stray", "--seed", "1"]) == [
        "unexpected argument 'stray' (options look like --key value)"]


def test_every_problem_is_reported_in_one_error(tmp_path):
    path = yaml_file(tmp_path, """
        data:
          bogus: 1
          eval_ratio: 1.5
        train:
          learning_rate: fast
    """)
    found = problems_of(path, ["--max_length", "0", "--seed", "x", "--nope", "1",
                               "--per_device_train_batch_size", "0", "--zero_stage", "5"])
    assert found == [
        f"{path}: unknown key data.bogus",
        "unknown option --nope",
        "train.learning_rate: 'fast' is not a number",
        "train.seed: 'x' is not an integer",
        "train.per_device_train_batch_size must be >= 1 (got 0)",
        "data.max_length must be >= 1 (got 0)",
        "data.eval_ratio must be in [0, 1) (got 1.5)",
        "deepspeed.zero_stage must be 0, 1, 2 or 3 (got 5)",
    ]


def test_range_and_consistency_checks():
    assert problems_of(None, ["--learning_rate", "-1", "--warmup_ratio", "1",
                              "--offload_param", "cpu", "--num_nodes", "2"]) == [
        "train.learning_rate must be > 0 (got -1.0)",
        "train.warmup_ratio must be in [0, 1) (got 1.0)",
        "deepspeed.offload_param needs deepspeed.zero_stage 3 (only stage 3 partitions parameters)",
        "launch.num_nodes > 1 needs launch.hostfile",
    ]
    assert problems_of(None, ["--micro_batch_tokens", "100"]) == [
        "train.micro_batch_tokens (100) must be >= data.max_length (4096) so every sample fits "
        "a micro-batch"]


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="c.yaml: the top level must be a mapping of sections"):
        load_config(yaml_file(tmp_path, "- a\n"))
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(yaml_file(tmp_path, "data: {max_length: 1\n"))
    assert problems_of(yaml_file(tmp_path, "data: [1]\n")) == [
        f"{tmp_path / 'c.yaml'}: section 'data' must be a mapping"]
    assert load_config(yaml_file(tmp_path, "")) == Config()  # an empty file is all defaults


def test_parse_overrides_shape():
    problems: list[str] = []
    assert parse_overrides(["--max_length", "5", "--train.seed=3", "--skip-bad"], problems) == {
        "data": {"max_length": "5", "skip_bad": "true"}, "train": {"seed": "3"}}
    assert problems == []


def test_field_docs_cover_every_field():
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        assert sorted(docs) == sorted(names), section
        assert all(len(docs[n]) > 10 for n in names), section
    assert field_docs(DataArgs)["skip_bad"] == (
        "Skip malformed records, and records the chat template cannot train exactly (e.g. an "
        "answer starting with a newline), counted and reported, instead of stopping at the first.")
    help_text = options_help()
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f"  --{f.name} (default " in help_text, f.name


def test_round_trip_through_a_dict():
    cfg = load_config(None, ["--system", "S", "--max_length", "64", "--zero_stage", "2",
                             "--nproc", "2"])
    saved = cfg.to_dict()
    saved["data"]["removed_in_a_later_version"] = 1  # unknown saved keys are ignored
    assert config_from_dict(saved) == cfg


def test_engine_choice():
    assert not load_config().uses_deepspeed
    assert load_config(None, ["--nproc", "2"]).uses_deepspeed
    assert load_config(None, ["--zero_stage", "1"]).uses_deepspeed
    assert load_config(None, ["--backend", "deepspeed"]).uses_deepspeed
    assert load_config(None, ["--nproc", "2", "--num_nodes", "2", "--hostfile", "h"]).world_size == 4


def test_evaluation_and_saving_defaults_follow_the_held_out_data():
    """Hugging Face's names; with held-out data: evaluate and save every epoch and export the
    best checkpoint; without: neither (as before), and save_steps alone means steps."""
    from chatft.config import Schedule

    def schedule(*args: str) -> Schedule:
        cfg = load_config(None, list(args))
        return Schedule.of(cfg.train, cfg.data.eval_ratio > 0 or cfg.data.eval_file is not None)

    assert schedule() == Schedule("no", 0, "no", 0, False)
    assert schedule("--save_steps", "5") == Schedule("no", 0, "steps", 5, False)
    assert schedule("--eval_ratio", "0.1") == Schedule("epoch", 0, "epoch", 0, True)
    # eval_steps alone means steps, and the saves follow it
    assert schedule("--eval_ratio", "0.1", "--eval_steps", "3") == Schedule("steps", 3, "steps", 3, True)
    assert schedule("--eval_ratio", "0.1", "--eval_steps", "3", "--save_steps", "6") == \
        Schedule("steps", 3, "steps", 6, True)
    # saving explicitly off: no best-model export unless asked for (then it is an error)
    assert schedule("--eval_file", "x.json", "--save_strategy", "no") == \
        Schedule("epoch", 0, "no", 0, False)
    assert schedule("--eval_ratio", "0.1", "--eval_strategy", "no") == Schedule("no", 0, "no", 0, False)
    assert schedule("--eval_ratio", "0.1", "--load_best_model_at_end", "false").load_best is False


def test_evaluation_options_that_cannot_work_are_refused_together():
    problems = problems_of(None, ["--eval_strategy", "epoch", "--metric_for_best_model", "accuracy",
                                  "--early_stopping_patience", "2"])
    assert problems == ["eval_strategy epoch needs eval_ratio or eval_file",
                        "train.metric_for_best_model 'accuracy': chatft computes only eval_loss"]
    assert problems_of(None, ["--eval_ratio", "0.1", "--save_strategy", "steps", "--save_steps", "4",
                              "--load_best_model_at_end", "true"]) == [
        "train.load_best_model_at_end needs an eval_strategy and the same save_strategy (got epoch "
        "and steps)"]
    assert problems_of(None, ["--eval_ratio", "0.1", "--eval_steps", "3", "--save_steps", "4"]) == [
        "train.load_best_model_at_end needs save_steps a multiple of eval_steps"]
    assert problems_of(None, ["--load_best_model_at_end", "true", "--early_stopping_patience", "1"]) == [
        "train.load_best_model_at_end needs an eval_strategy and the same save_strategy (got no and no)",
        "early_stopping_patience needs evaluation"]
    assert problems_of(None, ["--eval_ratio", "0.1", "--eval_strategy", "steps"]) == [
        "eval_strategy steps needs eval_steps >= 1", "save_strategy steps needs save_steps >= 1"]
    assert "train.early_stopping_threshold must be >= 0 (got -0.1)" in problems_of(
        None, ["--early_stopping_threshold", "-0.1"])
    # the same with the best-model export turned off is a valid plan
    load_config(None, ["--eval_ratio", "0.1", "--eval_steps", "3", "--save_steps", "4",
                       "--load_best_model_at_end", "false"])


def test_gguf_export_needs_the_export():
    assert problems_of(None, ["--export_format", "gguf", "--export", "false"]) == [
        "train.export_format gguf needs train.export true"]
    cfg = load_config(None, ["--export_format", "both", "--gguf_quant", "q8_0"])
    assert (cfg.train.export_format, cfg.train.gguf_quant) == ("both", "q8_0")
