"""The ``chatft`` command: thin wrappers that parse arguments and call named steps.

Every step lives in the library (``chatft.data.steps``, ``chatft.job``, ``chatft.train.plan``,
``chatft.export``, ``chatft.serve``); this module only wires arguments to them. A
:class:`ChatftError` becomes a one-paragraph message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatft.config import Config
from chatft.config_parse import load_config, options_help
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
        try:
            indices = [int(i) for i in args.index.split(",")] if args.index else [0]
        except ValueError:
            raise ChatftError(f"--index {args.index!r}: expected record numbers such as "
                              "0,5,9") from None
        colour = not args.no_colour and sys.stdout.isatty() if args.colour == "auto" else args.colour == "always"
        steps.inspect(cfg.data, steps.tokenizer_for(cfg.model), indices, colour)
    else:
        data = steps.prepare_data(cfg.data, steps.tokenizer_for(cfg.model))
        steps.print_summary(data)
    return 0


def cmd_convert(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.model.qwen1 import convert_qwen1

    _no_extra("convert", rest)
    for line in convert_qwen1(args.src, args.dst, args.dtype).lines():
        print(line)
    return 0


def _no_extra(command: str, rest: list[str]) -> None:
    if rest:
        raise ChatftError(f"{command}: unknown options: {' '.join(rest)}")


def cmd_chat(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.serve import chat
    from chatft.serve.generate import load_chat_model

    _no_extra("chat", rest)
    knobs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                 repetition_penalty=args.repetition_penalty)
    chat.check_options(**knobs)  # before the (slow) model load
    cm = load_chat_model(args.model_dir, device=args.device, dtype=args.dtype)
    chat.check_options(**knobs, max_context=cm.max_context)
    opts = dict(system=args.system, **knobs)
    if args.prompt is not None:
        chat.one_shot(cm, args.prompt, **opts)
    else:
        chat.interactive(cm, **opts)
    return 0


def cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.serve.generate import load_chat_model
    from chatft.serve.server import serve

    _no_extra("serve", rest)
    if not 0 <= args.port <= 65535:
        raise ChatftError(f"--port {args.port}: expected 0..65535")
    if args.max_batch_size < 1:
        raise ChatftError(f"--max-batch-size {args.max_batch_size}: expected at least 1")
    cm = load_chat_model(args.model_dir, device=args.device, dtype=args.dtype)
    serve(cm, host=args.host, port=args.port, api_key=args.api_key or None,
          max_batch_size=args.max_batch_size, allowed_hosts=args.allowed_hosts)
    return 0


def _add_model_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("model_dir", metavar="MODEL",
                   help="exported model folder, or anything `chatft train --model` takes: a "
                        "Hugging Face folder, a .gguf file, a Qwen-1 folder, "
                        "smollm2-135m-instruct")
    a.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")


def _leading_config(rest: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] --key value ...``: argparse cannot tell a leading positional from the
    value of an unknown option, so the optional config file is taken here."""
    if rest and not rest[0].startswith("--"):
        return rest[0], rest[1:]
    return None, rest


def train_config(rest: list[str]) -> Config:
    """``chatft train`` arguments -> Config. Without a config file, --model or --data, the
    base is the embedded default job (``chatft/default_job.yaml``) instead of the generic
    defaults."""
    from importlib import resources

    from chatft.config_parse import mentions

    config, overrides = _leading_config(rest)
    if config is None and not mentions(overrides, "model.name_or_path", "data.path"):
        config = str(resources.files("chatft") / "default_job.yaml")
    return load_config(config, overrides)


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.job.launch import run

    return run(train_config(rest))


def cmd_plan(args: argparse.Namespace, rest: list[str]) -> int:
    from chatft.train.plan.apply import plan_command

    config, overrides = _leading_config(rest)
    return plan_command(load_config(config, overrides), gpus=args.gpus, gpu_mem=args.gpu_mem,
                        cpu_mem=args.cpu_mem, tokens=args.tokens, as_json=args.json)


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    _no_extra("export", rest)
    if args.format == "gguf":
        from chatft.export.gguf import describe, export_gguf, resolve_source

        folder = resolve_source(args.checkpoint, args.dtype)
        print(describe(export_gguf(folder, args.output, args.quant or "f16")))
        return 0
    from chatft.export.hf import export_checkpoint

    if args.quant:
        raise ChatftError("export: --quant is for --format gguf")
    export_checkpoint(args.checkpoint, args.output, args.dtype)
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from chatft.job.evaluate import evaluate_models
    from chatft.job.report import write_report

    cfg = load_config(args.config, rest)
    report = evaluate_models(args.models, cfg.model, cfg.data, cfg.train, args.ask or [],
                             max_new_tokens=args.max_new_tokens)
    print(f"chatft: wrote {write_report(report, Path(args.out))}", file=sys.stderr)
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

    t = sub.add_parser("train", help="fine-tune (no arguments: the embedded default job)",
                       usage="chatft train [CONFIG.yaml] [--key value ...]",
                       description="Fine-tune a chat model. Options: --key value for any config "
                                   "field (see `chatft --help`), e.g. --learning_rate 2e-5 "
                                   "--nproc 4.")
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="predict GPU and host memory per strategy; recommend one",
                        usage="chatft plan [CONFIG.yaml] [--gpus N] [--gpu-mem 24GiB] "
                              "[--cpu-mem 64GiB] [--tokens T] [--json] [--key value ...]",
                        description="Predict peak GPU memory (per GPU) and host memory for "
                                    "every training strategy (plain, ZeRO-1/2/3, CPU offload, "
                                    "activation recomputation) of this config, say which fit, "
                                    "and recommend the fastest that does. Needs only the "
                                    "model's config.json, no weights. `chatft train --plan "
                                    "auto` applies the recommendation.")
    pl.add_argument("--gpus", type=int, help="GPUs (processes) to plan for (default: the "
                                             "config's nproc x num_nodes)")
    pl.add_argument("--gpu-mem", help="memory per GPU, e.g. 24GiB (default: this machine's "
                                      "GPU, or 80GiB without one)")
    pl.add_argument("--cpu-mem", help="host memory, e.g. 128GiB (default: this machine's RAM, "
                                      "or 64GiB without a GPU)")
    pl.add_argument("--tokens", type=int, help="tokens of the largest micro-batch per GPU "
                                               "(default: from the data, else the config's bound)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("export", help="checkpoint -> Hugging Face model folder, or -> GGUF",
                       usage="chatft export RUN_OR_FOLDER [--format hf|gguf] [--quant "
                             "f16|bf16|q8_0] [--out PATH] [--dtype bf16|fp16|fp32]",
                       description="Consolidate a DeepSpeed (ZeRO 0-3) or single-process "
                                   "checkpoint into one Hugging Face model folder, and check it "
                                   "by reloading it. --format gguf writes one GGUF file for "
                                   "llama.cpp / Ollama (Qwen2 and Llama/SmolLM2 models) with an "
                                   "Ollama Modelfile beside it, checked by reading it back.")
    e.add_argument("checkpoint", metavar="RUN_OR_FOLDER",
                   help="checkpoint folder, or a run's output_dir (its latest checkpoint); with "
                        "--format gguf also an exported model folder such as runs/x/final")
    e.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: Hugging Face folder (default); gguf: one .gguf file")
    e.add_argument("--quant", choices=["f16", "bf16", "q8_0"],
                   help="GGUF weight format (default f16; norms stay f32)")
    e.add_argument("--output", "--out", "-o", help="model folder (hf; default "
                                                   "<output_dir>/export-step-N) or .gguf file "
                                                   "(gguf; default <folder>-<quant>.gguf next "
                                                   "to the model folder)")
    e.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weight dtype of the "
                                                                     "Hugging Face folder "
                                                                     "(default: the run's "
                                                                     "export_dtype)")
    e.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="held-out loss and answers of models, side by side",
                        usage="chatft eval MODEL [MODEL ...] --data FILE [--eval_ratio R | "
                              "--eval_file F] [--system S] [--ask QUESTION ...] [--out "
                              "report.md] [--key value ...]",
                        description="For each MODEL (anything `chatft train --model` takes, or "
                                    "an export): the held-out loss exactly as training computes "
                                    "it (same split, template, labels, mean NLL per trained "
                                    "token) and greedy answers to the questions; written as a "
                                    "Markdown report with a loss-curves PNG and a JSON file "
                                    "beside it. Config options (--per_device_train_batch_size, "
                                    "--precision, --max_length, ...) apply as in training.")
    ev.add_argument("models", nargs="+", metavar="MODEL")
    ev.add_argument("--ask", action="append", metavar="QUESTION",
                    help="a question to answer (repeatable; default: the built-in data's)")
    ev.add_argument("--out", default="eval_report.md", help="report file (default eval_report.md)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit")
    ev.add_argument("--config", help="YAML config file")
    ev.set_defaults(func=cmd_eval)

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

    ch = sub.add_parser("chat", help="chat with a model in the terminal",
                        description="Interactive chat (commands /reset, /system TEXT, /exit) "
                                    "or one answer with --prompt. Prompts are formatted as "
                                    "training did (chat template, persona from chatft.json).")
    _add_model_options(ch)
    ch.add_argument("--prompt", help="answer this one message and exit (greedy by default)")
    ch.add_argument("--system", help="persona (system prompt); default: the folder's chatft.json")
    ch.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    ch.add_argument("--temperature", type=float,
                    help="0 = greedy; default: greedy with --prompt, else the model's defaults")
    ch.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    ch.add_argument("--top-k", type=int, default=0,
                    help="sample among the k most likely tokens only (0 or -1 = no limit)")
    ch.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="> 1 discourages tokens already in the conversation (1 = off; "
                         "applies to greedy answers too)")
    ch.add_argument("--seed", type=int, help="seed for sampling")
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible API and web chat page for a model",
                        description="Serve POST /v1/chat/completions (streaming or not), "
                                    "GET /v1/models, GET /health, and a chat page at /.")
    _add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default loopback; other hosts should set --api-key)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (0: pick a free one)")
    sv.add_argument("--api-key", default=os.environ.get("CHATFT_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $CHATFT_API_KEY)")
    sv.add_argument("--max-batch-size", type=int, default=32,
                    help="most requests generated together (default 32)")
    sv.add_argument("--allowed-hosts", default=os.environ.get("CHATFT_ALLOWED_HOSTS"),
                    help="without --api-key, only requests addressed to localhost, 127.0.0.1, "
                         "[::1] or --host are answered (against DNS rebinding); these "
                         "comma-separated names are answered too, e.g. myhost.lan,10.0.0.5; "
                         "'*' answers any (default: $CHATFT_ALLOWED_HOSTS)")
    sv.set_defaults(func=cmd_serve)
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
    except BrokenPipeError:  # `chatft data inspect ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
