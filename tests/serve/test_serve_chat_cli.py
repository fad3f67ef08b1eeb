"""``chatft chat``: one-shot and interactive, as a user runs them (subprocess)."""

from __future__ import annotations

import subprocess
import sys

from chatft.serve.batch import SamplingParams
from chatft.serve.generate import reply

from .conftest import PERSONA


def _answers(out: str, n_tokens: int) -> list[str]:
    """The assistant's answers in an interactive transcript (answers may contain newlines)."""
    return [a.split("\n\nyou> ")[0].rstrip("\n").removesuffix(f" [cut at {n_tokens} tokens]")
            for a in out.split("assistant> ")[1:]]


def _chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chatft", "chat", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_one_shot_prints_the_greedy_answer(tiny_export_dir, chat_model):
    r = _chat(str(tiny_export_dir), "--prompt", "Who are you?", "--max-new-tokens", "12",
              "--device", "cpu")
    assert r.returncode == 0, r.stderr
    expected = reply(chat_model, [{"role": "user", "content": "Who are you?"}],
                     SamplingParams(max_new_tokens=12)).text
    assert expected and r.stdout == expected + "\n"


def test_interactive_commands(tiny_export_dir, chat_model):
    lines = ["Hello", "/system You are a cat.", "/system", "Meow?", "/reset", "/nonsense",
             "Again", "/exit", "never read"]
    r = _chat(str(tiny_export_dir), "--temperature", "0", "--max-new-tokens", "6",
              stdin="\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"persona: {PERSONA}" in out
    assert "(persona set; conversation cleared)" in out and "persona: You are a cat." in out
    assert "(conversation cleared)" in out and "unknown command /nonsense" in out
    answers = _answers(out, 6)
    assert len(answers) == 3  # Hello, Meow?, Again ("never read" comes after /exit)
    greedy = SamplingParams(max_new_tokens=6)
    cat = reply(chat_model, [{"role": "user", "content": "Meow?"}], greedy,
                system="You are a cat.").text
    assert answers[1] == cat
    again = reply(chat_model, [{"role": "user", "content": "Again"}], greedy,
                  system="You are a cat.").text
    assert answers[2] == again  # /reset kept the persona


def test_interactive_keeps_history(tiny_export_dir, chat_model):
    r = _chat(str(tiny_export_dir), "--temperature", "0", "--max-new-tokens", "5",
              stdin="First\nSecond\n")
    assert r.returncode == 0, r.stderr
    answers = _answers(r.stdout, 5)
    greedy = SamplingParams(max_new_tokens=5)
    first = reply(chat_model, [{"role": "user", "content": "First"}], greedy).text
    second = reply(chat_model, [{"role": "user", "content": "First"},
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "Second"}], greedy).text
    assert answers == [first, second]


def test_not_a_model_folder(tmp_path):
    r = _chat(str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("chatft: error:") and "config.json" in r.stderr
    assert "Traceback" not in r.stderr
