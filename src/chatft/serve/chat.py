"""``chatft chat``: talk to a model folder in the terminal.

One-shot (``--prompt``) prints the answer and returns; greedy unless a temperature is given,
so the same prompt gives the same answer. Interactive mode keeps the conversation, streams
each answer as it is generated, and understands ``/reset``, ``/system TEXT`` and ``/exit``;
it samples with the model's defaults (generation_config.json, else temperature 0.7,
top-p 0.9) unless told otherwise.
"""

from __future__ import annotations

import sys
from typing import TextIO

from chatft.errors import ChatftError
from chatft.serve import limits
from chatft.serve.batch import SamplingParams
from chatft.serve.generate import ChatModel, stream_reply

HELP = ("commands: /reset (new conversation), /system TEXT (new persona, new conversation), "
        "/system (show the persona), /exit")


def check_options(max_new_tokens: int, temperature: float | None, top_p: float | None,
                  top_k: int, repetition_penalty: float, seed: int | None,
                  max_context: int | None = None) -> None:
    """The command line's generation options, with the ranges the server applies to the
    same fields (:mod:`chatft.serve.limits`); every problem is reported together.
    ``max_context``: the loaded model's context, which bounds ``max_new_tokens``."""
    checks = [("--max-new-tokens", max_new_tokens, limits.MAX_TOKENS),
              ("--temperature", temperature, limits.TEMPERATURE),
              ("--top-p", top_p, limits.TOP_P), ("--top-k", top_k, limits.TOP_K),
              ("--repetition-penalty", repetition_penalty, limits.REPETITION_PENALTY),
              ("--seed", seed, limits.SEED)]
    problems = [f"{flag} {problem}" for flag, value, limit in checks
                if value is not None and (problem := limit.problem(value))]
    if max_context is not None and not problems and max_new_tokens > max_context:
        problems.append(f"--max-new-tokens {max_new_tokens} is more than the model's whole "
                        f"context ({max_context} tokens)")
    if problems:
        raise ChatftError("chat: " + "; ".join(problems))


def _answer(cm: ChatModel, messages: list[dict], system: str | None, params: SamplingParams,
            out: TextIO) -> tuple[str, str]:
    """Stream one answer to ``out``; returns (text, finish_reason)."""
    parts: list[str] = []
    finish = "stop"
    for ev in stream_reply(cm, messages, params, system):
        if ev.text:
            parts.append(ev.text)
            out.write(ev.text)
            out.flush()
        if ev.finish_reason:
            finish = ev.finish_reason
    return "".join(parts), finish


def one_shot(cm: ChatModel, prompt: str, system: str | None = None, max_new_tokens: int = 512,
             temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, top_k: int = 0, repetition_penalty: float = 1.0,
             out: TextIO = sys.stdout) -> str:
    """Answer ``prompt`` once, streaming to ``out``; greedy unless ``temperature`` > 0."""
    params = SamplingParams(max_new_tokens=max_new_tokens,
                            temperature=temperature or 0.0,
                            top_p=1.0 if top_p is None else top_p, seed=seed, top_k=top_k,
                            repetition_penalty=repetition_penalty)
    text, _ = _answer(cm, [{"role": "user", "content": prompt}], system, params, out)
    out.write("\n")
    out.flush()
    return text


def interactive(cm: ChatModel, system: str | None = None, max_new_tokens: int = 512,
                temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, top_k: int = 0, repetition_penalty: float = 1.0,
                inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """The chat loop; returns on /exit or end of input."""
    params = cm.sampling(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         seed=seed, top_k=top_k, repetition_penalty=repetition_penalty)
    persona = system if system is not None else cm.system_prompt
    history: list[dict] = []
    out.write(f"chatft chat: {cm.name}\npersona: {persona if persona else '(template default)'}\n"
              f"{HELP}\n")
    while True:
        out.write("\nyou> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return
        if not line:  # end of input
            out.write("\n")
            return
        line = line.rstrip("\n")
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/exit", "/quit"):
            return
        if cmd == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if cmd == "/system":
            if arg.strip():
                persona = arg.strip()
                history.clear()
                out.write(f"(persona set; conversation cleared)\npersona: {persona}\n")
            else:
                out.write(f"persona: {persona if persona else '(template default)'}\n")
            continue
        if cmd.startswith("/") and cmd not in ("/",):
            out.write(f"unknown command {cmd}; {HELP}\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        out.flush()
        try:
            text, finish = _answer(cm, history, persona, params, out)
        except KeyboardInterrupt:
            history.pop()
            out.write("\n(interrupted; that turn was dropped)\n")
            continue
        except ChatftError as e:
            history.pop()
            out.write(f"\nchatft: {e}; /reset starts a new conversation\n")
            continue
        if finish == "length":
            out.write(f" [cut at {params.max_new_tokens} tokens]")
        out.write("\n")
        history.append({"role": "assistant", "content": text})
