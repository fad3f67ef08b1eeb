"""Where this process sits in the job: which launcher started it, its ranks, and node 0.

Three launchers start training processes:

* ``chatft train`` itself, through DeepSpeed's launcher (one node, a hostfile over pdsh, or
  per-node launch with ``--node_rank`` and ``--master_addr``): the workers find ``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and DeepSpeed's
  ``CROSS_RANK`` (node rank) in their environment;
* ``torchrun`` (or a Kubernetes PyTorchJob, which sets the same variables) runs ``chatft
  train`` once per GPU: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK`` (node rank), ``MASTER_ADDR``, ``MASTER_PORT``;
* SLURM's ``srun`` runs ``chatft train`` once per task: ``SLURM_PROCID``, ``SLURM_LOCALID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_NODEID``, and the step's nodes in the compact syntax
  ``gpu[01-03,07]``, whose first host is node 0.

:func:`placement` reads any of them; it finds none in a plain ``chatft train``, which then
launches its own workers (or trains in its own process).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from chatft.errors import ConfigError

#: torch's default rendezvous port, used across nodes when none is given (every node must
#: agree on it, so it cannot be a free port picked on one of them).
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Placement:
    """One training process's place in the job."""

    launcher: str  # "deepspeed" (chatft train's workers), "torchrun", "slurm" or "env"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int  # processes on this node
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    @property
    def host(self) -> str:
        return socket.gethostname()

    def where(self) -> str:
        """``rank 3 (node 1, host gpu02)``: how messages name this process."""
        return f"rank {self.rank} (node {self.node_rank}, host {self.host})"

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's ``env://`` rendezvous and DeepSpeed read."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


#: What torchrun (and a Kubernetes PyTorchJob) set for every process.
_TORCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names, in order.

    >>> expand_nodelist("gpu[01-03,07],login1")
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']
    >>> expand_nodelist("rack[1-2]-n[8-9]")
    ['rack1-n8', 'rack1-n9', 'rack2-n8', 'rack2-n9']
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_one(item, nodelist)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [it for it in items if it]


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ConfigError(f"SLURM node list {whole!r}: unbalanced brackets in {item!r}")
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        r = _RANGE.match(part.strip())
        if r is None:
            raise ConfigError(f"SLURM node list {whole!r}: {part!r} is not a number or range")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        width = len(lo)  # zero padding: 01-03 -> 01 02 03
        out += [f"{head}{n:0{width}d}" for n in range(int(lo), int(hi) + 1)]
    return [h + rest for h in out for rest in _expand_one(tail, whole)]


def slurm_hosts(nodelist: str) -> list[str]:
    """The step's hosts: ``scontrol show hostnames`` where SLURM's tools are installed (it
    knows every syntax), else :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from None


def placement(env: Mapping[str, str] | None = None,
              master_port: int | None = None) -> Placement | None:
    """This process's placement as its launcher described it in the environment (DeepSpeed's
    launcher, torchrun, a PyTorchJob, srun); None when none did, i.e. ``chatft train`` was
    started by hand and launches its own workers (or trains in this process).

    ``master_port`` (the config's) is used for SLURM, which has no rendezvous port; without
    it the port is derived from the job id, so two jobs sharing a node do not collide."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in _TORCH_KEYS):
        # DeepSpeed's launcher says LOCAL_SIZE and CROSS_RANK; a PyTorchJob without torchrun
        # runs one process per pod and says neither.
        world = _int(env, "WORLD_SIZE")
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", 1)))
        if world % local_world:
            raise ConfigError(f"{world} processes are not the same number on every node "
                              f"({local_world} here); chatft needs equal nodes")
        rank = _int(env, "RANK")
        node = env.get("GROUP_RANK", env.get("CROSS_RANK"))
        launcher = ("torchrun" if "TORCHELASTIC_RUN_ID" in env
                    else "deepspeed" if "CROSS_RANK" in env else "env")
        return Placement(launcher, rank, _int(env, "LOCAL_RANK"), world, local_world,
                         int(node) if node is not None else rank // local_world,
                         world // local_world, env["MASTER_ADDR"], _int(env, "MASTER_PORT"))
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks and int(tasks) > 1 and "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else 1
        if world % nodes:
            raise ConfigError(f"srun: {world} tasks on {nodes} nodes are not the same number "
                              "per node; use --ntasks-per-node")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        hosts = slurm_hosts(nodelist) if nodelist else [socket.gethostname()]
        port = master_port or (15000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env
                               else DEFAULT_PORT)
        return Placement("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID"), world,
                         world // nodes, _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0,
                         nodes, env.get("MASTER_ADDR") or hosts[0], port)
    return None
