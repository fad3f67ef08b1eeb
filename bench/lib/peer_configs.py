"""What each peer tool runs: the shared data files, LLaMA-Factory's YAML, ms-swift's arguments,
the DeepSpeed JSON, and the numbers that make the jobs equal (pure functions, no training).

Every tool gets the *same two files*: huanhuan with the tutorial's system prompt written as
OpenAI-style ``messages`` (system, user, assistant), records whose index ``i`` has
``i % 10 == 9`` in the held-out file, the others in the training file. chatft, LLaMA-Factory
(``formatting: sharegpt`` with OpenAI role tags) and ms-swift (its native format) all read it.

Equal jobs:

* speed: 128 samples per optimizer step. Unpacked, that is per-device batch x accumulation.
  Packed, a tool counts packed rows, so the row length (``cutoff_len`` / ``max_length``) is
  chosen so that :data:`PACKED_ROWS_PER_STEP` rows hold 128 mean-length samples' tokens
  (:func:`packed_row_length`); the recorder counts the samples each step really held.
* quality: global batch 16 samples (no packing), lr 1e-5, 3 epochs, cosine with 3% warmup,
  bf16, weights saved at each epoch end.

Lengths are never cut: huanhuan's longest sample is 250 tokens with Qwen's tokenizer and
the system prompt, and every unpacked cutoff here is 1,024.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: The tutorial's system prompt; every record gets it, and the questions are asked with it.
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛."
#: Samples per optimizer step in the speed rows (chatft's recommended global batch).
SPEED_SAMPLES_PER_STEP = 128
#: Packed rows per optimizer step (per-device batch of packed rows, no accumulation).
PACKED_ROWS_PER_STEP = 2
#: Cutoff for unpacked runs: longer than any huanhuan sample (250 tokens), so nothing is cut.
UNPACKED_CUTOFF = 1024
#: Quality runs: the hyperparameters chatft's quality row used.
QUALITY = {"global_batch": 16, "learning_rate": 1e-5, "epochs": 3, "lr_scheduler_type": "cosine",
           "warmup_ratio": 0.03, "seed": 42}
TRAIN_FILE, EVAL_FILE = "huanhuan_train.jsonl", "huanhuan_eval.jsonl"
#: LLaMA-Factory's names for the two files in its ``dataset_info.json``.
LF_TRAIN, LF_EVAL = "huanhuan_train", "huanhuan_eval"


# --------------------------------------------------------------------------- data files


def is_held_out(index: int) -> bool:
    """chatft's ``--eval_ratio 0.1`` split: records 9, 19, 29, ... are held out."""
    return index % 10 == 9


def to_messages(record: dict[str, Any], system: str = SYSTEM_PROMPT) -> dict[str, Any]:
    """One Alpaca record as OpenAI ``messages``; ``input`` follows the instruction directly, as
    the tutorial's ``process_func`` joins them (huanhuan's inputs are all empty)."""
    user = record["instruction"] + (record.get("input") or "")
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": record["output"]}]}


def write_split(records: list[dict[str, Any]], out_dir: Path, system: str = SYSTEM_PROMPT,
                hold_out: bool = True) -> dict[str, Any]:
    """Write the training and held-out files (JSON Lines) and LLaMA-Factory's
    ``dataset_info.json`` into ``out_dir``; returns paths and counts. ``hold_out`` False puts
    every record into the training file (speed rows train on the whole file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = out_dir / TRAIN_FILE, out_dir / EVAL_FILE
    n_train = n_held = 0
    with train.open("w", encoding="utf-8") as ft, held.open("w", encoding="utf-8") as fe:
        for i, rec in enumerate(records):
            line = json.dumps(to_messages(rec, system), ensure_ascii=False) + "\n"
            if hold_out and is_held_out(i):
                fe.write(line)
                n_held += 1
            else:
                ft.write(line)
                n_train += 1
    (out_dir / "dataset_info.json").write_text(json.dumps(lf_dataset_info(), indent=1) + "\n")
    return {"dir": str(out_dir), "train": str(train), "eval": str(held),
            "train_samples": n_train, "eval_samples": n_held, "records": len(records)}


def lf_dataset_info() -> dict[str, Any]:
    """LLaMA-Factory's registration of the two files: ShareGPT layout with OpenAI role tags."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
            "assistant_tag": "assistant", "system_tag": "system"}
    return {name: {"file_name": file, "formatting": "sharegpt",
                   "columns": {"messages": "messages"}, "tags": tags}
            for name, file in ((LF_TRAIN, TRAIN_FILE), (LF_EVAL, EVAL_FILE))}


# --------------------------------------------------------------------------- equal steps


def packed_row_length(mean_sample_tokens: float, samples: int = SPEED_SAMPLES_PER_STEP,
                      rows: int = PACKED_ROWS_PER_STEP) -> int:
    """Row length that makes ``rows`` packed rows hold ``samples`` mean-length samples.

    >>> packed_row_length(68.23)   # 128 x 68.23 = 8,733 tokens in 2 rows
    4367
    """
    return math.ceil(samples * mean_sample_tokens / rows)


def unpacked_batch(samples: int = SPEED_SAMPLES_PER_STEP, per_device: int = 32) -> tuple[int, int]:
    """(per-device batch, accumulation) whose product is ``samples``.

    >>> unpacked_batch(128, 32)
    (32, 4)
    """
    if samples % per_device:
        raise ValueError(f"{samples} samples per step is not a multiple of {per_device}")
    return per_device, samples // per_device


# --------------------------------------------------------------------------- DeepSpeed

def zero2_config() -> dict[str, Any]:
    """ZeRO-2 for Hugging Face Trainer (``"auto"`` values filled from the training arguments),
    the settings of LLaMA-Factory's shipped ``ds_z2_config.json``, written out here."""
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000,
                 "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "allgather_partitions": True,
                              "allgather_bucket_size": 5e8, "overlap_comm": False,
                              "reduce_scatter": True, "reduce_bucket_size": 5e8,
                              "contiguous_gradients": True, "round_robin_gradients": True},
    }


# --------------------------------------------------------------------------- LLaMA-Factory


def lf_config(*, model: Path, data_dir: Path, out: Path, per_device: int, accumulation: int,
              cutoff_len: int, packing: str, gpu: bool, epochs: float,
              learning_rate: float, gradient_checkpointing: bool = True,
              deepspeed: Path | None = None, eval_each_epoch: bool = False,
              save_each_epoch: bool = False, seed: int = 42, liger: bool = True
              ) -> dict[str, Any]:
    """LLaMA-Factory's training YAML (``llamafactory-cli train FILE``) as a dict.

    ``packing``: ``"neat"`` (``neat_packing``: packed rows, attention kept inside each sample),
    ``"plain"`` (``packing``: packed rows, attention across samples) or ``"none"``. ``gpu``
    False turns off what only a GPU has (bf16, Liger); ``liger`` False turns Liger off on a GPU
    too (a row that tells its kernels apart from the rest of the tool). Attention: ``sdpa`` (LLaMA-Factory's
    ``flash_attn: fa2`` needs the ``flash-attn`` package, which the GPU machine lacks; ``auto``
    would pick sdpa too); with ``neat_packing`` it builds a block-diagonal 4D mask per row.
    """
    if packing not in ("neat", "plain", "none"):
        raise ValueError(f"packing: {packing!r}")
    cfg: dict[str, Any] = {
        "model_name_or_path": str(model), "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": LF_TRAIN, "dataset_dir": str(data_dir), "template": "qwen",
        "cutoff_len": cutoff_len, "overwrite_cache": True, "preprocessing_num_workers": 8,
        "output_dir": str(out), "logging_steps": 1,
        "report_to": "none", "plot_loss": False,
        "per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
        "learning_rate": learning_rate, "num_train_epochs": epochs,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "seed": seed,
        "bf16": gpu, "enable_liger_kernel": gpu and liger, "flash_attn": "sdpa",
        "disable_gradient_checkpointing": not gradient_checkpointing,
        "dataloader_num_workers": 2, "ddp_timeout": 1800,
    }
    if packing == "neat":
        cfg["neat_packing"] = True
    cfg["packing"] = packing != "none"
    if deepspeed is not None:
        cfg["deepspeed"] = str(deepspeed)
    if save_each_epoch:
        cfg.update(save_strategy="epoch", save_only_model=True)
    else:
        cfg["save_strategy"] = "no"
    if eval_each_epoch:
        cfg.update(eval_dataset=LF_EVAL, eval_strategy="epoch", per_device_eval_batch_size=16)
    return cfg


def yaml_text(cfg: dict[str, Any]) -> str:
    """A flat YAML mapping (what LLaMA-Factory reads), one ``key: value`` per line; strings
    JSON-quoted so that no value is misread (``no`` as false, a path with ``:``)."""
    lines = []
    for k, v in cfg.items():
        if isinstance(v, bool):
            val = "true" if v else "false"
        elif isinstance(v, (int, float)):
            val = repr(v)
            mantissa, e, exp = val.partition("e")
            if e and "." not in mantissa:  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
                val = f"{mantissa}.0e{exp}"
        else:
            val = json.dumps(str(v), ensure_ascii=False)
        lines.append(f"{k}: {val}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- ms-swift


def swift_args(*, model: Path, train: Path, out: Path, per_device: int, accumulation: int,
               max_length: int, packing: bool, gpu: bool, epochs: float, learning_rate: float,
               attn_impl: str, gradient_checkpointing: bool = True, eval_file: Path | None = None,
               save_each_epoch: bool = False, torch_dtype: str | None = None,
               seed: int = 42) -> list[str]:
    """``swift sft`` arguments (after ``sft``).

    ``packing`` adds ``--packing true --padding_free true``, which ms-swift accepts only with a
    flash-attention ``attn_impl`` (``flash_attn``, ``flash_attention_2/3/4``); without packing
    ``sdpa`` runs. ``torch_dtype`` None: bf16 on a GPU (ms-swift's documented choice: the
    weights themselves in bf16), fp32 on the CPU.
    """
    dtype = torch_dtype or ("bfloat16" if gpu else "float32")
    args = [
        "--model", str(model), "--model_type", "qwen2", "--template", "qwen",
        "--tuner_type", "full", "--dataset", str(train), "--split_dataset_ratio", "0",
        "--max_length", str(max_length), "--truncation_strategy", "delete",
        "--per_device_train_batch_size", str(per_device),
        "--gradient_accumulation_steps", str(accumulation),
        "--learning_rate", f"{learning_rate:g}", "--num_train_epochs", f"{epochs:g}",
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--seed", str(seed),
        "--torch_dtype", dtype, "--bf16", "true" if gpu else "false",
        "--attn_impl", attn_impl, "--use_liger_kernel", "true" if gpu else "false",
        "--gradient_checkpointing", "true" if gradient_checkpointing else "false",
        "--output_dir", str(out), "--add_version", "false", "--logging_steps", "1",
        "--report_to", "none", "--dataset_num_proc", "8", "--dataloader_num_workers", "2",
    ]
    if packing:
        args += ["--packing", "true", "--padding_free", "true"]
    if save_each_epoch:
        args += ["--save_strategy", "epoch", "--save_only_model", "true"]
    else:
        args += ["--save_strategy", "no"]
    if eval_file is not None:
        args += ["--val_dataset", str(eval_file), "--eval_strategy", "epoch",
                 "--per_device_eval_batch_size", "16"]
    else:
        args += ["--eval_strategy", "no"]
    return args
