"""Which launcher started a process, its ranks, and node 0 (SLURM's compact node lists)."""

from __future__ import annotations

import pytest

from chatft.errors import ConfigError
from chatft.job.cluster import expand_nodelist, placement


def test_slurm_node_lists_expand_with_padding_ranges_and_products():
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("a1,b[9-11],c") == ["a1", "b9", "b10", "b11", "c"]
    assert expand_nodelist("r[1-2]-g[08-09]") == ["r1-g08", "r1-g09", "r2-g08", "r2-g09"]
    assert expand_nodelist("single") == ["single"]
    with pytest.raises(ConfigError, match="'x' is not a number or range"):
        expand_nodelist("n[1,x]")
    with pytest.raises(ConfigError, match="unbalanced"):
        expand_nodelist("n[1-2")


def test_torchrun_sets_ranks_and_node():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
           "GROUP_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29400",
           "TORCHELASTIC_RUN_ID": "x"}
    p = placement(env)
    assert (p.launcher, p.rank, p.local_rank, p.world_size, p.local_world_size) == (
        "torchrun", 5, 1, 8, 4)
    assert (p.node_rank, p.num_nodes, p.master_addr, p.master_port) == (1, 2, "n0", 29400)
    with pytest.raises(ConfigError, match="not the same number on every node"):
        placement({**env, "LOCAL_WORLD_SIZE": "3"})


def test_srun_tasks_take_the_first_host_as_master_and_a_port_from_the_job_id(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: chatft expands the list itself
    env = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "6",
           "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[07-08]"}
    p = placement(env)
    assert (p.launcher, p.rank, p.local_rank, p.world_size, p.local_world_size) == (
        "slurm", 6, 2, 8, 4)
    assert (p.node_rank, p.num_nodes, p.master_addr) == (1, 2, "gpu07")
    assert p.master_port == 15000 + 123456 % 20000
    assert placement(env, master_port=29600).master_port == 29600
    assert p.torch_env() == {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8",
                             "MASTER_ADDR": "gpu07", "MASTER_PORT": str(p.master_port)}
    # one task (e.g. `srun -n1 chatft train --nproc 8`): chatft launches its own workers
    assert placement({**env, "SLURM_STEP_NUM_TASKS": "1"}) is None
    # torchrun inside srun: torchrun's variables win
    assert placement({**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8",
                               "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
                               "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "j"}).launcher == "torchrun"


def test_a_plain_shell_is_no_launch_and_deepspeed_workers_name_their_node():
    assert placement({"HOME": "/root"}) is None
    p = placement({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                   "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                   "MASTER_PORT": "29500"})
    assert (p.launcher, p.rank, p.node_rank, p.num_nodes, p.local_world_size) == (
        "deepspeed", 3, 1, 2, 2)
    assert p.where().startswith("rank 3 (node 1, host ")
