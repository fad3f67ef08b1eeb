"""The DeepSpeed JSON: generated from chatft's config, or the user's own with "auto" filled.

A user's file (for example the tutorial's ``ds_config.json``, which says "auto" for the batch
sizes, optimizer and scheduler parameters, and fp16) works unchanged: every "auto" is replaced
by the value chatft's config implies, exactly as Hugging Face's Trainer does. Explicit values
that contradict chatft's config are reported, not silently overridden.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from chatft.config import DeepSpeedArgs, TrainArgs
from chatft.errors import ConfigError

AUTO = "auto"


def generated_config(ds: DeepSpeedArgs, precision: str) -> dict[str, Any]:
    """DeepSpeed config for chatft's own options (its "auto" values are filled by
    :func:`fill_auto`)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": ds.zero_stage > 0,
                            "contiguous_gradients": True}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        # The export step gathers the full weights itself; no 16-bit copy at every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "train_batch_size": AUTO,
        "gradient_clipping": AUTO,
        "zero_optimization": zero,
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def load_user_config(path: str) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object")
    return raw


def fill_auto(ds: dict[str, Any], t: TrainArgs, world_size: int, *, precision: str,
              total_steps: int, warmup_steps: int,
              hidden_size: int | None) -> tuple[dict[str, Any], list[str]]:
    """Replace every "auto" in ``ds`` with what ``t`` on ``world_size`` processes implies;
    returns ``(config, warnings)``.

    Raises ConfigError listing explicit values that contradict chatft's config and any
    "auto" chatft does not know how to fill.
    """
    ds = copy.deepcopy(ds)
    warnings: list[str] = []
    problems: list[str] = []
    world = world_size
    values = {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in values.items():
        if ds.get(key, AUTO) == AUTO:
            ds[key] = value
        elif ds[key] != value:
            problems.append(f"{key} is {ds[key]} in the DeepSpeed JSON but {value} from chatft's "
                            f"config; set it to \"auto\" or pass the same value")

    # Precision: bf16 and fp16 sections; "auto" follows chatft's precision.
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        if section.get("enabled", AUTO) == AUTO:
            section["enabled"] = precision == name
        elif section["enabled"] and precision != name:
            problems.append(f"the DeepSpeed JSON enables {name} but training runs in {precision}")

    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage != 3 and zero.get("offload_param", {}).get("device", "none") not in ("none", None):
        warnings.append(f"the DeepSpeed JSON sets offload_param at ZeRO stage {stage}: it has no "
                        "effect below stage 3 (only stage 3 partitions parameters), ignoring it")
        zero.pop("offload_param")
    if hidden_size:
        zero_autos = {"reduce_bucket_size": hidden_size * hidden_size,
                      "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                      "stage3_param_persistence_threshold": 10 * hidden_size}
        for key, value in zero_autos.items():
            if zero.get(key) == AUTO:
                zero[key] = value

    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        for key, value in {"lr": t.learning_rate, "betas": [t.adam_beta1, t.adam_beta2],
                           "eps": t.adam_epsilon, "weight_decay": t.weight_decay}.items():
            if params.get(key) == AUTO:
                params[key] = value
    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        if warmup_steps == 0 and params.get("warmup_num_steps") == AUTO:
            warnings.append("the DeepSpeed scheduler needs at least one warmup step; using 1")
        for key, value in {"warmup_min_lr": 0.0, "warmup_max_lr": t.learning_rate,
                           "warmup_num_steps": max(1, warmup_steps),
                           "total_num_steps": total_steps, "warmup_min_ratio": 0.0,
                           "cos_min_ratio": 0.0}.items():
            if params.get(key) == AUTO:
                params[key] = value

    left = sorted(_auto_paths(ds))
    if left:
        problems.append(f"chatft cannot fill these \"auto\" values: {', '.join(left)}")
    if problems:
        raise ConfigError("DeepSpeed config:\n  - " + "\n  - ".join(problems))
    return ds, warnings


def _auto_paths(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if obj == AUTO else []


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
