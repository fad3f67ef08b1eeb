"""Per-node checks that need no process group: which options may differ between nodes, and the
heartbeat's timing and messages."""

from __future__ import annotations

from chatft.config_parse import load_config
from chatft.job.heartbeat import periods
from chatft.job.preflight import config_differences
from chatft.train.distributed import rendezvous_message


def test_only_per_node_options_may_differ():
    node0 = load_config(None, ["--nnodes", "2", "--master_addr", "127.0.0.1"]).to_dict()
    node1 = load_config(None, ["--nnodes", "2", "--node_rank", "1", "--master_addr", "n0",
                               "--cache_dir", "/local/cache",
                               "--output_dir", "/mnt/shared/run"]).to_dict()
    # the output folder's path may differ (check_shared_output checks it is the same folder)
    assert config_differences(node1, node0) == []
    node1["train"]["learning_rate"] = 1e-3
    node1["launch"]["nproc"] = 4
    assert config_differences(node1, node0) == ["launch.nproc 4 (rank 0: 1)",
                                                "train.learning_rate 0.001 (rank 0: 2e-05)"]


def test_heartbeat_timing_follows_the_timeout():
    assert periods(1800) == (5.0, 900.0, 16.0)  # default: dead after 15 min of silence
    period, dead, dead_after_failure = periods(30)
    assert (period, dead) == (1.5, 15.0) and dead_after_failure < dead


def test_rendezvous_messages_name_address_port_and_who_joined():
    waited = rendezvous_message(RuntimeError("Timed out after 61 seconds waiting for clients. "
                                             "1/2 clients joined."), 0, 2, "10.0.0.1", "29500", 60)
    assert waited.startswith("waited 60 s (--ddp_timeout) at 10.0.0.1:29500 for the 2 "
                             "processes of the run: 1 of 2 processes joined")
    unreachable = rendezvous_message(ConnectionRefusedError(111, "Connection refused"), 1, 2,
                                     "127.0.0.2", "29500", 20)
    assert unreachable.startswith("could not reach the master (node 0) at 127.0.0.2:29500 "
                                  "within 20 s (--ddp_timeout)")
    busy = rendezvous_message(RuntimeError("The server socket has failed to listen on any local "
                                           "network address. port: 29500, useIpv6: 0, code: -98, "
                                           "name: EADDRINUSE, message: address already in use"),
                              0, 2, "127.0.0.1", "29500", 60)
    assert "port 29500 on 127.0.0.1 is in use" in busy
