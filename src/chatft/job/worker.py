"""One training process, as started by DeepSpeed's launcher (see :mod:`chatft.job.launch`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from chatft.config_parse import config_from_dict
from chatft.errors import ChatftError, DistributedError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chatft.job.worker")
    p.add_argument("--config-json", required=True)
    p.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args, _ = p.parse_known_args(argv)
    from chatft.job import cluster, tree

    place = cluster.placement()
    where = place.where() if place is not None else "rank 0"
    tree.die_with_parent(where)
    # Imported here: the process starts reading its arguments before torch and DeepSpeed load.
    from chatft.job import run
    from chatft.train import distributed

    try:
        try:
            with open(args.config_json, encoding="utf-8") as f:
                cfg = config_from_dict(json.load(f)).validate()
        except (OSError, ValueError) as e:
            raise ChatftError(f"cannot read the run's configuration {args.config_json}: {e}. "
                              "`chatft train` writes it into the output folder before it starts "
                              "the workers; on several nodes that folder must be shared") from None
        run.run_job(cfg, place)
    except ChatftError as e:
        if not e.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"chatft: error: {where}: {e}", file=sys.stderr, flush=True)
        # Leave the group after an error every process met (bad data, a bad config); not after
        # a peer died or a rendezvous failed: NCCL's teardown may then block.
        if not isinstance(e, DistributedError):
            distributed.finish_distributed()
        return e.exit_code
    distributed.finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
