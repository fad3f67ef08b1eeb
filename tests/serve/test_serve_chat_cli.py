"""``chatft chat``: one-shot and interactive, as a user runs them (subprocess); the range
checks of its options (in-process ``main``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from chatft.serve.batch import SamplingParams
from chatft.serve.generate import reply

from .conftest import CONTEXT, PERSONA


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


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--top-p", "0"], "--top-p must be > 0 and <= 1, got 0.0"),
    (["--repetition-penalty", "-1"], "--repetition-penalty must be > 0 and <= 10"),
    (["--top-k", "-2"], "--top-k must be -1 or 0"),
    (["--seed", str(2 ** 70)], "--seed must be between -2**63 and 2**64-1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
])
def test_chat_cli_refuses_bad_numbers_before_loading(argv, message, tmp_path, capsys):
    from chatft.cli import main

    # The folder does not exist: the options are checked first, without the slow load.
    assert main(["chat", str(tmp_path / "missing"), "--prompt", "hi", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatft: error: chat: ") and message in err, err


def test_chat_cli_reports_every_problem_and_the_context_bound(tiny_export_dir, capsys):
    from chatft.cli import main

    assert main(["chat", "nowhere", "--temperature", "nan", "--top-p", "nan"]) == 2
    err = capsys.readouterr().err
    assert "--temperature" in err and "--top-p" in err
    assert main(["chat", str(tiny_export_dir), "--prompt", "hi", "--device", "cpu",
                 "--max-new-tokens", str(CONTEXT + 1)]) == 2
    assert f"more than the model's whole context ({CONTEXT} tokens)" in capsys.readouterr().err
