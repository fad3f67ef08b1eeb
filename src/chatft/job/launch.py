"""``chatft train``: prepare once, then train in this process or through DeepSpeed's launcher.

The parent process resolves the model (dequantizing the embedded GGUF on first use),
tokenizes the data into the cache and prints the data summary, so bad input fails fast with
a clear message before any worker starts. With ``--nproc N`` (or a hostfile) it then runs
DeepSpeed's own launcher, ``python -m deepspeed.launcher.runner``, which starts the workers
(:mod:`chatft.job.worker`) on this machine or on every host of the hostfile; on a machine
without GPUs the same command starts N CPU processes. Either way every training process runs
:func:`chatft.job.run.run_job`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chatft.config import Config, LaunchArgs
from chatft.data.steps import PreparedData, prepare_data, print_summary
from chatft.model.loading import load_tokenizer, resolve_model
from chatft.train.distributed import free_port
from chatft.train.plan.apply import auto_plan

CONFIG_FILE = "chatft_config.json"


def prepare(cfg: Config) -> PreparedData:
    source = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg.model.tokenizer)
    data = prepare_data(cfg.data, tokenizer)
    print_summary(data, out=sys.stderr)
    return data


def launcher_command(launch: LaunchArgs, config_json: Path) -> list[str]:
    """The DeepSpeed launcher invocation that runs ``chatft.job.worker`` everywhere."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile, "--num_nodes", str(launch.num_nodes)]
    if launch.nproc:
        cmd += ["--num_gpus", str(launch.nproc)]
    cmd += ["--master_port", str(launch.master_port or free_port())]
    return cmd + ["--module", "chatft.job.worker", "--config-json", str(config_json)]


def run(cfg: Config) -> int:
    """Prepare, then train (in-process for one local process); returns the exit code."""
    data = prepare(cfg)
    # --plan auto / --gradient_checkpointing auto: the memory planner sets the strategy here,
    # before the config is handed to the workers.
    auto_plan(cfg, data.train.lengths)
    if cfg.world_size == 1 and not cfg.launch.hostfile:
        from chatft.job.run import run_job
        from chatft.train.distributed import finish_distributed

        try:
            run_job(cfg)
        finally:
            finish_distributed()
        return 0
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_json = out / CONFIG_FILE
    config_json.write_text(json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    cmd = launcher_command(cfg.launch, config_json)
    print("chatft: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ)
    # Workers must import this very chatft, also when it is not installed (tests, checkouts).
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)
