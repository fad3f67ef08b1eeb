"""The ``chatft`` command: thin wrappers that parse arguments and call named steps.

Every step lives in the library (``chatft.data.steps``, ``chatft.train``, ``chatft.export``,
``chatft.serve``); this module only wires arguments to them. A :class:`ChatftError` becomes a
one-paragraph message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatft.config import Config, load_config, options_help
from chatft.errors import ChatftError


def _config(args: argparse.Namespace, rest: list[str], positional_data: bool = False) -> Config:
    overrides = list(rest)
    if positional_data and getattr(args, "file", None):
        overrides = ["--data.path", args.file] + overrides
    return load_config(getattr(args, "config", None), overrides)


def cmd_data(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.data import steps

    cfg = _config(args, rest, positional_data=True)
    if args.action == "inspect":
        indices = [int(i) for i in args.index.split(",")] if args.index else [0]
        colour = not args.no_colour and sys.stdout.isatty() if args.colour == "auto" else args.colour == "always"
        steps.inspect(cfg, indices, colour)
    else:
        data = steps.prepare_data(cfg, steps.tokenizer_for(cfg))
        steps.print_summary(data)
    return 0


def cmd_convert(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.model.qwen1 import convert_qwen1

    if rest:
        raise ChatftError(f"convert: unknown options: {' '.join(rest)}")
    for line in convert_qwen1(args.src, args.dst, args.dtype).lines():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatft", description="Full fine-tuning of chat models on your dialogues.",
        epilog="Options of every command that takes a config:\n\n" + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="inspect or prepare a data file",
                       description="Tokenize a data file with the model's chat template; "
                                   "config options (--system, --max_length, --skip-bad, ...) "
                                   "may follow.")
    d.add_argument("action", choices=["inspect", "prepare"])
    d.add_argument("file", help="data file (.json array or .jsonl)")
    d.add_argument("--config", help="YAML config file")
    d.add_argument("--index", help="records to show, e.g. 0,5,9 (inspect; default 0)")
    d.add_argument("--colour", "--color", choices=["auto", "always", "never"], default="auto")
    d.add_argument("--no-colour", "--no-color", action="store_true", help="plain text")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser("convert", help="convert a Qwen-1 folder to a plain Qwen2 folder",
                       description="Write a Hugging Face Qwen2 folder (config, safetensors "
                                   "shards, tokenizer, generation config) from a Qwen-1 "
                                   "folder (model_type qwen, qwen.tiktoken) without running "
                                   "its Python code; prints the files and the peak memory.")
    c.add_argument("src", help="Qwen-1 model folder (e.g. Qwen-7B-Chat from ModelScope)")
    c.add_argument("dst", help="new folder to write (must not exist or be empty)")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="weight dtype of the written folder (default: bf16)")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return args.func(args, rest)
    except ChatftError as e:
        print(f"chatft: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("chatft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
