"""Checks every process makes once the group has formed: one job, one output folder.

Nodes started one by one (per-node launch, torchrun, srun) can be started with different
options, and a folder path can name a different disk on every node. Both would train
something other than what the user asked, or lose checkpoints, without any error; these
checks stop the run at its start instead, naming the node and what differs.

Why the output folder must be shared: DeepSpeed writes every process's part of a checkpoint
(its ZeRO shard) into the checkpoint folder, node 0 finalizes it (trainer state, marker, the
``latest`` pointer, rotation), and resuming on another number of processes (the universal
checkpoint conversion) and ``chatft export`` read all parts from one folder. DeepSpeed's
``use_node_local_storage`` would scatter each checkpoint over the nodes' disks, and such a
checkpoint could only resume on the very same nodes; chatft refuses that at start instead.
"""

from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from chatft.errors import ConfigError
from chatft.job.cluster import Placement

#: Fields that may differ between nodes: where a node is, how it reaches node 0, where it
#: caches tokenized data (the content is the same), and the path of the output folder (one
#: shared folder may be mounted at different paths; :func:`check_shared_output` checks that
#: every node's path shows the same folder, and names the node that sees another).
PER_NODE_FIELDS = {("launch", "node_rank"), ("launch", "master_addr"), ("data", "cache_dir"),
                   ("train", "output_dir")}
MARKERS = ".chatft-nodes"


def _flat(cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, fields in cfg.items() for k, v in fields.items()
            if (s, k) not in PER_NODE_FIELDS}


def config_differences(mine: dict[str, dict[str, Any]],
                       reference: dict[str, dict[str, Any]]) -> list[str]:
    """``['train.learning_rate 0.001 (rank 0: 0.0002)', ...]``: fields of ``mine`` that differ
    from ``reference`` (rank 0's), per-node fields aside."""
    a, b = _flat(mine), _flat(reference)
    return [f"{k} {a.get(k)!r} (rank 0: {b.get(k)!r})" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]


def check_same_config(config: dict[str, dict[str, Any]], place: Placement) -> None:
    """Every process runs the same configuration (``Config.to_dict()``) as rank 0, per-node
    fields aside."""
    every: list[Any] = [None] * place.world_size
    dist.all_gather_object(every, (place.where(), config))
    reference = every[0][1]
    found = [f"{where}: " + ", ".join(diff) for where, c in every[1:]
             if (diff := config_differences(c, reference))]
    if found:
        raise ConfigError("the processes of this run were started with different options "
                          "(every node must run `chatft train` with the same config and options, "
                          "except --node_rank and --master_addr):\n  - " + "\n  - ".join(found))


def check_shared_output(output_dir: str, place: Placement, settle_s: float = 5.0) -> None:
    """With several nodes: every node sees what every other node writes into ``output_dir``
    (each node's first process writes a marker, then looks for the others')."""
    if place.num_nodes < 2:
        return
    token = [secrets.token_hex(6) if place.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = Path(output_dir) / MARKERS
    mine = folder / f"{token[0]}.node{place.node_rank}"
    if place.local_rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        mine.write_text(socket.gethostname())
    dist.barrier()
    missing: list[int] = []
    if place.local_rank == 0:
        deadline = time.monotonic() + settle_s  # network file systems may show files late
        while True:
            missing = [n for n in range(place.num_nodes)
                       if not (folder / f"{token[0]}.node{n}").is_file()]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    every: list[Any] = [None] * place.world_size
    dist.all_gather_object(every, (place.node_rank, place.host, missing))
    dist.barrier()
    if place.local_rank == 0:
        mine.unlink(missing_ok=True)
    dist.barrier()
    if place.rank == 0:
        try:
            folder.rmdir()
        except OSError:  # another run's marker, or a node that does not share the folder
            pass
    blind = [f"node {n} (host {h}) does not see the files of node(s) {', '.join(map(str, m))}"
             for n, h, m in every if m]
    if blind:
        raise ConfigError(
            f"the output folder {output_dir} is not shared between the nodes: "
            + "; ".join(dict.fromkeys(blind)) + ". Every process writes its part of each "
            "checkpoint there, and resuming and `chatft export` read all parts from one folder: "
            "use a folder on a file system that every node mounts at the same path (NFS, "
            "Lustre, ...)")
