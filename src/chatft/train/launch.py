"""``chatft train``: prepare once, then train in this process or through DeepSpeed's launcher.

The parent process resolves the model (dequantizing the embedded GGUF on first use),
tokenizes the data into the cache and prints the data summary, so bad input fails fast with
a clear message before any worker starts. With ``--nproc N`` (or a hostfile) it then runs
DeepSpeed's own launcher, ``python -m deepspeed.launcher.runner``, which starts the workers
(``chatft.train.worker``) on this machine or on every host of the hostfile; on a machine
without GPUs the same command starts N CPU processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from chatft.config import Config
from chatft.data.steps import PreparedData, prepare_data, print_summary
from chatft.model.loading import load_tokenizer, resolve_model
from chatft.train.plan.apply import auto_plan

CONFIG_FILE = "chatft_config.json"


def prepare(cfg: Config) -> PreparedData:
    source = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg.model.tokenizer)
    data = prepare_data(cfg, tokenizer)
    print_summary(data, out=sys.stderr)
    return data


def launcher_command(cfg: Config, config_json: Path) -> list[str]:
    """The DeepSpeed launcher invocation that runs ``chatft.train.worker`` everywhere."""
    la = cfg.launch
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if la.hostfile:
        cmd += ["--hostfile", la.hostfile, "--num_nodes", str(la.num_nodes)]
    if la.nproc:
        cmd += ["--num_gpus", str(la.nproc)]
    if la.master_port:
        cmd += ["--master_port", str(la.master_port)]
    else:
        from chatft.train.loop import _free_port

        cmd += ["--master_port", str(_free_port())]
    return cmd + ["--module", "chatft.train.worker", "--config-json", str(config_json)]


def run(cfg: Config) -> int:
    """Prepare, then train (in-process for one local process); returns the exit code."""
    data = prepare(cfg)
    # --plan auto / --gradient_checkpointing auto: the memory planner sets the strategy here,
    # before the config is handed to the workers.
    auto_plan(cfg, data.train.lengths)
    if cfg.world_size == 1 and not cfg.launch.hostfile:
        from chatft.train.loop import finish_distributed, train

        try:
            train(cfg)
        finally:
            finish_distributed()
        return 0
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_json = out / CONFIG_FILE
    config_json.write_text(json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    cmd = launcher_command(cfg, config_json)
    print("chatft: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ)
    # Workers must import this very chatft, also when it is not installed (tests, checkouts).
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)
