"""``chatft train``: prepare on this node, then train here or start the workers.

The parent process resolves the model (dequantizing the embedded GGUF on first use),
tokenizes the data into this node's cache and prints the data summary, so bad input fails
fast with a clear message before any worker starts. It holds the output folder's run lock
(:mod:`chatft.job.lock`) until the run ends. Then:

* one process: it trains itself (:func:`chatft.job.run.run_job`);
* ``--nproc N`` on one node, a hostfile (DeepSpeed's pdsh launch from node 0), or per-node
  launch (``--nnodes N --node_rank R --master_addr HOST``, the same command on every node,
  DeepSpeed's runner with ``--no_ssh``): it runs DeepSpeed's runner, ``python -m
  deepspeed.launcher.runner``, which starts the workers (:mod:`chatft.job.worker`), and stays
  their parent (:mod:`chatft.job.tree`: signals forwarded once, nothing left behind);
* started by torchrun or srun as one of several processes (:mod:`chatft.job.cluster`): this
  process is a worker; the node's processes prepare the data together (one tokenizes, the
  others wait for the cache), and the node's first process holds the run lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

from chatft.config import Config, LaunchArgs
from chatft.data.steps import PreparedData, prepare_data, print_summary
from chatft.errors import ChatftError
from chatft.job import tree
from chatft.job.cluster import DEFAULT_PORT, Placement, placement
from chatft.job.lock import RunLock
from chatft.model.loading import load_tokenizer, resolve_model
from chatft.train.distributed import free_port, remove_shm_buffers
from chatft.train.plan.apply import auto_plan


def config_file(output_dir: str | Path, node_rank: int) -> Path:
    """The configuration handed to the workers of node ``node_rank``."""
    return Path(output_dir) / f"chatft_config.node{node_rank}.json"


def prepare(cfg: Config, show: bool = True) -> PreparedData:
    source = resolve_model(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg.model.tokenizer)
    data = prepare_data(cfg.data, tokenizer)
    if show:
        print_summary(data, out=sys.stderr)
    return data


def per_node(launch: LaunchArgs) -> bool:
    """Every node runs its own ``chatft train`` (no ssh): --master_addr without a hostfile."""
    return launch.master_addr is not None and launch.hostfile is None


def master_port(launch: LaunchArgs) -> int:
    """Every node must use the same port: the configured one, else torch's default across
    nodes; on one node a free one (several runs may share a machine)."""
    if launch.master_port:
        return launch.master_port
    return DEFAULT_PORT if launch.num_nodes > 1 else free_port()


def launcher_command(launch: LaunchArgs, config_json: Path, hostfile: Path | None = None,
                     port: int | None = None) -> list[str]:
    """DeepSpeed's runner invocation that starts ``chatft.job.worker`` on this node (per-node
    launch, with the generated ``hostfile`` listing the nodes) or on every host of the
    user's hostfile (pdsh)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if per_node(launch):
        cmd += ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(launch.node_rank),
                "--master_addr", str(launch.master_addr)]
    elif launch.hostfile:
        cmd += ["--hostfile", launch.hostfile, "--num_nodes", str(launch.num_nodes)]
        if launch.master_addr:
            cmd += ["--master_addr", launch.master_addr]
    if launch.nproc:
        cmd += ["--num_gpus", str(launch.nproc)]
    cmd += ["--master_port", str(port or master_port(launch))]
    return cmd + ["--module", tree.WORKER_MODULE, "--config-json", str(config_json)]


def node_hostfile(launch: LaunchArgs, folder: Path) -> Path:
    """A hostfile for DeepSpeed's runner in per-node launch: it only counts the nodes and
    their processes (``--no_ssh`` contacts none of them), so the names are placeholders."""
    path = folder / "hostfile"
    path.write_text("".join(f"node{n} slots={launch.nproc}\n" for n in range(launch.num_nodes)))
    return path


def run(cfg: Config) -> int:
    """Prepare, then train (in-process for one local process); returns the exit code."""
    place = placement(master_port=cfg.launch.master_port)
    if place is not None:
        return run_launched(cfg, place)
    with RunLock(cfg.train.output_dir, cfg.launch.node_rank):
        data = prepare(cfg)
        # --plan auto / --gradient_checkpointing auto: the memory planner sets the strategy
        # here, before the config is handed to the workers.
        auto_plan(cfg, data.train.lengths)
        if cfg.world_size == 1 and not cfg.launch.hostfile:
            return _train_here(cfg, None)
        return _start_workers(cfg)


def _train_here(cfg: Config, place: Placement | None) -> int:
    from chatft.job.run import run_job
    from chatft.train.distributed import finish_distributed

    run_job(cfg, place)  # on an error, no goodbye to the group: after a peer died it may block
    finish_distributed()
    return 0


def _start_workers(cfg: Config) -> int:
    launch = cfg.launch
    config_json = config_file(cfg.train.output_dir, launch.node_rank)
    config_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, config_json)
    port = master_port(launch)
    env = dict(os.environ)
    # Workers must import this very chatft, also when it is not installed (tests, checkouts).
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    from chatft.job.run import PREPARED_ON_ENV

    env[PREPARED_ON_ENV] = socket.gethostname()
    with tempfile.TemporaryDirectory(prefix="chatft-launch-") as scratch:
        hostfile = node_hostfile(launch, Path(scratch)) if per_node(launch) else None
        cmd = launcher_command(launch, config_json, hostfile, port)
        print("chatft: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        rc = tree.run_launcher(cmd, env, launch.stop_timeout)
    # Left by workers that died before they had removed their own.
    remove_shm_buffers(launch.master_addr if per_node(launch) else "127.0.0.1", port)
    return rc


def run_launched(cfg: Config, place: Placement) -> int:
    """This process is one of several that torchrun or srun started: join them and train."""
    os.environ.update(place.torch_env())
    tree.die_with_parent(place.where())
    la = cfg.launch
    la.nproc, la.num_nodes, la.node_rank = place.local_world_size, place.num_nodes, place.node_rank
    la.master_addr, la.master_port = place.master_addr, place.master_port
    lock = RunLock(cfg.train.output_dir, place.node_rank).acquire() if place.local_rank == 0 else None
    try:
        if place.rank == 0:
            print(f"chatft: {place.launcher} started {place.world_size} processes on "
                  f"{place.num_nodes} node(s); rendezvous at {place.master_addr}:"
                  f"{place.master_port}", file=sys.stderr, flush=True)
        data = prepare(cfg, show=place.local_rank == 0)
        auto_plan(cfg, data.train.lengths)
        return _train_here(cfg, place)
    except ChatftError as e:
        print(f"chatft: error: {place.where()}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        if lock is not None:
            lock.release()
