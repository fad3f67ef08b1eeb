"""``chatft data prepare|inspect`` end to end, as a user runs it: ``python -m chatft ...``.

Each run is a fresh interpreter, so independent runs are started together (a thread pool of
subprocesses) and each test then checks its own run. Bad-input runs use a tiny word-level
ChatML tokenizer (a data error does not depend on the model; the tiny one loads instantly);
runs that tokenize use the real Qwen tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."
# chatft.data.inspect's two alternating shades of trained tokens
TRAINED_PIECE = re.compile(r"\x1b\[1;(?:32;48;5;22|92;48;5;28)m(.*?)\x1b\[0m", re.S)


def run_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CHATFT_DATA_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "chatft", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def save_tiny_chatml_tokenizer(folder: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from chatft.model.qwen_tokenizer import CHATML_TEMPLATE

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|im_start|>", "<|im_end|>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def _msgs(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# name -> (file name, content, expected stderr after "chatft: error: ")
BAD_INPUTS = {
    "malformed": ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
                  "bad.json: malformed JSON at line 3, column 22: Expecting ',' delimiter"),
    "malformed-jsonl": ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": }\n',
                        "bad.jsonl: record 1: malformed JSON on line 2, column 17: Expecting value "
                        "(JSONL: one record per line)"),
    "not-a-list": ("obj.json", '{\n "instruction": "a",\n "output": "b"\n}',
                   "obj.json: the top level must be a list of records, found a JSON object"),
    "wrong-type": ("type.json", [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": 42}],
                   "type.json: record 1: field 'output': expected a string, got number"),
    "missing-field": ("missing.json", [{"instruction": "q"}],
                      "missing.json: record 0: field 'output': missing"),
    "empty-field": ("emptyfield.json", [{"instruction": " ", "output": "a"}],
                    "emptyfield.json: record 0: field 'instruction': empty"),
    "unknown-role": ("role.json", [{"conversations": [{"from": "human", "value": "hi"},
                                                      {"from": "bot", "value": "x"}]}],
                     "role.json: record 0: field 'conversations[1].from': unknown role 'bot' "
                     "(expected one of assistant, gpt, human, system, user)"),
    "no-final-answer": ("open.json", [_msgs(("user", "hi"), ("assistant", "yo"), ("user", "more"))],
                        "open.json: record 0: field 'messages[2]': the conversation must end with "
                        "an assistant turn"),
    "empty-file": ("empty.json", "", "empty.json: the file is empty"),
    "not-utf8": ("latin1.json", '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"),
                 "latin1.json: not UTF-8 text: invalid byte 0xe9 at byte offset 21 (line 1); "
                 "re-save the file as UTF-8"),
    "no-such-file": (None, None, "nope.json: file not found"),
}


def _write(folder: Path, name: str, content) -> None:
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    elif isinstance(content, str):
        (folder / name).write_text(content, encoding="utf-8")
    else:
        (folder / name).write_text(json.dumps(content), encoding="utf-8")


SKIP_BAD_RECORDS = [{"instruction": "hi", "output": "yes"}, {"instruction": "hi"},
                    {"instruction": "hi", "output": "yes yes"}, {"instruction": "hi", "output": 3}]
SMALL_RECORDS = [{"instruction": "hi", "output": "yes yes"},
                 {"system": "S", "instruction": "Bye", "output": "ok"}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, qwen_tokenizer_dir, chat_alpaca):
    """Every independent CLI run of this module, started together; name -> CompletedProcess."""
    work = tmp_path_factory.mktemp("cli")
    tiny = save_tiny_chatml_tokenizer(work / "tiny-tokenizer")
    qwen = str(qwen_tokenizer_dir)
    jobs: dict[str, list[str]] = {}
    for name, (fname, content, _) in BAD_INPUTS.items():
        if fname is not None:
            _write(work, fname, content)
        jobs[name] = ["data", "prepare", fname or "nope.json", "--model", str(tiny)]
    _write(work, "skip.json", SKIP_BAD_RECORDS)
    jobs["skip-bad"] = ["data", "prepare", "skip.json", "--model", qwen, "--system", "S", "--skip-bad"]
    jobs["config-error"] = ["data", "prepare", "skip.json", "--model", str(tiny),
                            "--max_length", "abc", "--bogus", "1", "--train_on", "some"]
    _write(work, "small.json", SMALL_RECORDS)
    jobs["inspect-plain"] = ["data", "inspect", "small.json", "--model", qwen, "--system", "Sys",
                             "--index", "0,1,5", "--no-colour"]
    jobs["inspect-colour"] = ["data", "inspect", str(chat_alpaca), "--model", qwen,
                              "--system", HUANHUAN_SYSTEM, "--colour", "always"]
    jobs["inspect-bad-index"] = ["data", "inspect", "small.json", "--model", str(tiny),
                                 "--index", "first"]

    def one(item):
        name, args = item
        return name, run_cli(args, work, work / f"cache-{name}")

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(one, jobs.items()))


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_paragraph_exit_2(runs, name):
    r = runs[name]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr == f"chatft: error: {BAD_INPUTS[name][2]}\n"
    assert r.stdout == ""


def test_skip_bad_turns_record_errors_into_counted_skips(runs):
    r = runs["skip-bad"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:2] == ["data:      skip.json (alpaca)",
                         "samples:   4 read, 2 kept, 2 dropped (bad_record 2), 0 truncated"]
    # "S" system, "hi", answers "yes" and "yes yes": 18 + 19 tokens, 2 + 3 trained
    assert lines[2] == "tokens:    37 total, 5 trained (13.5%)"
    assert lines[4:6] == ["skipped:   skip.json: record 1: field 'output': missing",
                          "skipped:   skip.json: record 3: field 'output': expected a string, got number"]


def test_config_problems_are_reported_together(runs):
    r = runs["config-error"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == ("chatft: error: invalid configuration:\n"
                        "  - unknown option --bogus\n"
                        "  - data.max_length: 'abc' is not an integer\n"
                        "  - data.train_on: 'some' is not one of assistant, last, all\n")


def test_inspect_plain_marks_trained_tokens(runs):
    r = runs["inspect-plain"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("legend: [trained tokens] in brackets\n")
    # record 0 gets --system; record 1 keeps its own system prompt
    assert ("\n--- record 0: 19 tokens, 3 trained\n"
            "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
            "<|im_start|>assistant\n[yes][ yes][<|im_end|>]\n") in out
    assert ("\n--- record 1: 19 tokens, 2 trained\n"
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nBy" in out)
    assert "assistant\n[ok][<|im_end|>]\n" in out
    assert "\n--- record 5: not available (out of range or skipped as bad)\n" in out
    assert "samples:   2 read, 2 kept, 0 dropped (none), 0 truncated\n" in out
    assert "\x1b[" not in out


def test_inspect_colours_roles_and_trained_tokens(runs, chat_alpaca):
    r = runs["inspect-colour"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    first = json.loads(chat_alpaca.read_text(encoding="utf-8"))[0]
    assert out.startswith("legend: ")
    block = out.split("\n--- record 0: ")[1].split("\n\n")[0]
    # trained pieces, in order, are exactly the answer and <|im_end|>
    assert "".join(TRAINED_PIECE.findall(block)) == first["output"] + "<|im_end|>"
    assert "\x1b[35m" in block and "\x1b[36m" in block  # system (magenta), user (cyan) text
    assert "samples:   205 read, 205 kept, 0 dropped (none), 0 truncated\n" in out


def test_inspect_bad_index(runs):
    r = runs["inspect-bad-index"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "chatft: error: --index 'first': expected record numbers such as 0,5,9\n"


def test_prepare_prints_the_readme_numbers_of_huanhuan(tmp_path, qwen_tokenizer_dir,
                                                      huanhuan_path):
    r = run_cli(["data", "prepare", str(huanhuan_path), "--model", str(qwen_tokenizer_dir),
                 "--system", HUANHUAN_SYSTEM], tmp_path, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:4] == [
        "samples:   3729 read, 3729 kept, 0 dropped (none), 0 truncated",
        "tokens:    254,427 total, 81,364 trained (32.0%)",
        "length:    min 29, mean 68.2, p50 63, p95 120, max 250"]


def test_prepare_reuses_the_cache_and_never_serves_it_stale(tmp_path, qwen_tokenizer_dir,
                                                           chat_alpaca):
    data = tmp_path / "chat.json"
    data.write_bytes(chat_alpaca.read_bytes())
    cache = tmp_path / "cache"

    def prepare(*extra: str) -> list[str]:
        r = run_cli(["data", "prepare", "chat.json", "--model", str(qwen_tokenizer_dir),
                     "--system", HUANHUAN_SYSTEM, *extra], tmp_path, cache)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    first = prepare()
    assert first[:2] == ["data:      chat.json (alpaca)",
                         "samples:   205 read, 205 kept, 0 dropped (none), 0 truncated"]
    assert first[2].startswith("tokens:    ") and first[3].startswith("length:    min ")
    assert first[4].startswith(f"cache:     {cache}/") and not first[4].endswith("(reused)")

    again = prepare()
    assert again[:4] == first[:4] and again[4] == first[4] + " (reused)"

    # one byte of the first answer: "Quiet." -> "Quiez."
    raw = data.read_bytes()
    edited = raw.replace(b"Quiet.", b"Quiez.", 1)
    assert sum(a != b for a, b in zip(raw, edited)) == 1
    data.write_bytes(edited)
    changed = prepare()
    assert not changed[4].endswith("(reused)") and changed[4] != first[4]

    # (the library tests change max_length and the template too, one at a time)
    other_system = prepare("--system", "现在你要扮演甄嬛.")
    assert not other_system[4].endswith("(reused)")
    assert other_system[2] != changed[2]  # a shorter system prompt: fewer tokens
