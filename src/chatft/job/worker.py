"""One training process, as started by DeepSpeed's launcher (see :mod:`chatft.job.launch`)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from chatft.config_parse import config_from_dict
from chatft.errors import ChatftError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chatft.job.worker")
    p.add_argument("--config-json", required=True)
    p.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args, _ = p.parse_known_args(argv)
    # Imported here: the process starts reading its arguments before torch and DeepSpeed load.
    from chatft.job import run
    from chatft.train import distributed

    try:
        with open(args.config_json, encoding="utf-8") as f:
            cfg = config_from_dict(json.load(f)).validate()
        run.run_job(cfg)
    except ChatftError as e:
        if not e.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"chatft: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        distributed.finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
