"""Every input format becomes list[Message]; every bad input is a located DataError.

Files are tiny and hand-written into tmp_path, so each expectation can be checked by eye.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatft.data.formats import detect_format, json_type, load_conversations, read_records
from chatft.data.messages import Message, check_conversation
from chatft.errors import DataError


def write(folder: Path, name: str, content) -> Path:
    """Write ``content`` (bytes, text, or a JSON value dumped as an array) to folder/name."""
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def messages(path: Path, **kw) -> list[list[tuple[str, str]]]:
    data = load_conversations(path, **kw)
    return [[(m.role, m.content) for m in c.messages] for c in data.conversations]


# --------------------------------------------------------------------------- formats


def test_alpaca_instruction_output(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "娘娘。", "input": "", "output": "你放心。"}])
    data = load_conversations(path)
    assert data.format == "alpaca" and data.records == 1 and data.skipped == []
    assert data.conversations[0].messages == (Message("user", "娘娘。"),
                                              Message("assistant", "你放心。"))
    assert data.conversations[0].index == 0


def test_alpaca_input_is_appended_after_a_newline(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "Translate:", "input": "hello", "output": "你好"}])
    assert messages(path) == [[("user", "Translate:\nhello"), ("assistant", "你好")]]


def test_alpaca_system_and_history(tmp_path):
    rec = {"system": "Be brief.", "history": [["q1", "a1"], ["q2", "a2"]],
           "instruction": "q3", "output": "a3"}
    path = write(tmp_path, "a.json", [rec])
    assert messages(path) == [[("system", "Be brief."), ("user", "q1"), ("assistant", "a1"),
                               ("user", "q2"), ("assistant", "a2"), ("user", "q3"),
                               ("assistant", "a3")]]


def test_sharegpt_roles_and_top_level_system(tmp_path):
    recs = [
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        # user/assistant are accepted as `from` too; a top-level system comes first
        {"system": "T", "conversations": [{"from": "user", "value": "u"},
                                          {"from": "assistant", "value": "a"}]},
    ]
    path = write(tmp_path, "s.json", recs)
    assert load_conversations(path).format == "sharegpt"
    assert messages(path) == [[("system", "S"), ("user", "hi"), ("assistant", "hello")],
                              [("system", "T"), ("user", "u"), ("assistant", "a")]]


def test_openai_messages_multi_turn(tmp_path):
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    path = write(tmp_path, "o.json", [rec])
    assert load_conversations(path).format == "openai"
    assert messages(path) == [[("system", "S"), ("user", "1+1?"), ("assistant", "2"),
                               ("user", "2+2?"), ("assistant", "4")]]


def test_jsonl_equals_json_array(tmp_path):
    recs = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    array = write(tmp_path, "d.json", recs)
    # JSONL with a blank line and a UTF-8 byte-order mark: both are tolerated
    lines = "\ufeff" + "\n".join(json.dumps(r) for r in recs[:2]) + "\n\n" + json.dumps(recs[2]) + "\n"
    jsonl = write(tmp_path, "d.jsonl", lines)
    assert messages(array) == messages(jsonl) == [[("user", f"q{i}"), ("assistant", f"a{i}")]
                                                  for i in range(3)]
    assert [c.index for c in load_conversations(jsonl).conversations] == [0, 1, 2]


def test_system_from_record_else_from_option(tmp_path):
    recs = [{"instruction": "q", "output": "a", "system": "from record"},
            {"instruction": "q", "output": "a"},
            {"instruction": "q", "output": "a", "system": ""}]  # empty: as if absent
    path = write(tmp_path, "a.json", recs)
    got = messages(path, system="from option")
    assert [c[0] for c in got] == [("system", "from record"), ("system", "from option"),
                                   ("system", "from option")]
    # without --system, a record without one has no system message (the template decides)
    assert [c[0][0] for c in messages(path)] == ["system", "user", "user"]


def test_system_option_applies_to_every_format(tmp_path):
    sharegpt = write(tmp_path, "s.json", [{"conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "yo"}]}])
    openai = write(tmp_path, "o.json", [{"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "yo"}]}])
    for path in (sharegpt, openai):
        assert messages(path, system="SYS") == [[("system", "SYS"), ("user", "hi"),
                                                 ("assistant", "yo")]]


def test_format_override(tmp_path):
    # A record with keys of two formats: auto picks openai ('messages' first), --format wins.
    rec = {"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}],
           "instruction": "i", "output": "o"}
    path = write(tmp_path, "x.json", [rec])
    assert messages(path) == [[("user", "m"), ("assistant", "n")]]
    assert messages(path, fmt="alpaca") == [[("user", "i"), ("assistant", "o")]]
    with pytest.raises(DataError) as e:
        load_conversations(path, fmt="sharegpt")
    assert str(e.value) == f"{path}: record 0: field 'conversations': missing"
    with pytest.raises(DataError) as e:
        load_conversations(path, fmt="chatml")
    assert str(e.value) == f"{path}: unknown format 'chatml' (expected auto, alpaca, sharegpt, openai)"


def test_detect_format_by_keys():
    assert detect_format([{"messages": []}], "f") == "openai"
    assert detect_format([{"conversations": []}], "f") == "sharegpt"
    assert detect_format([{"instruction": "x"}], "f") == "alpaca"
    assert detect_format([{"output": "x"}], "f") == "alpaca"
    # the first record that is an object decides; a non-object is reported later, per record
    assert detect_format([3, {"messages": []}], "f") == "openai"


def test_json_type_names():
    assert [json_type(v) for v in ({}, [], "s", 1, 1.5, True, None)] == [
        "object", "array", "string", "number", "number", "boolean", "null"]


def test_check_conversation_shapes():
    u, a, s = Message("user", "u"), Message("assistant", "a"), Message("system", "s")
    assert check_conversation([u, a]) is None
    assert check_conversation([s, u, a, u, a]) is None
    assert check_conversation([]) == (0, "the conversation has no messages")
    assert check_conversation([s]) == (0, "the conversation has only a system message")
    assert check_conversation([a, u]) == (
        0, "expected a user turn here (turns alternate user, assistant), got assistant")
    assert check_conversation([u, u, a]) == (
        1, "expected an assistant turn here (turns alternate user, assistant), got user")
    assert check_conversation([u, s, a]) == (1, "a system message may only come first")
    assert check_conversation([u, a, u]) == (2, "the conversation must end with an assistant turn")
    assert check_conversation([u, Message("assistant", " \n")]) == (1, "the assistant message is empty")
    assert check_conversation([Message("system", ""), u, a]) is None  # an empty system is allowed


# --------------------------------------------------------------------------- bad files

MALFORMED_ARRAY = '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]'
MALFORMED_JSONL = '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": }\n'

FILE_ERRORS = [
    ("malformed.json", MALFORMED_ARRAY, "malformed JSON at line 3, column 22: Expecting ',' delimiter"),
    ("malformed.jsonl", MALFORMED_JSONL,
     "record 1: malformed JSON on line 3, column 32: Expecting value (JSONL: one record per line)"),
    ("object.json", '{\n "instruction": "a",\n "output": "b"\n}',
     "the top level must be a list of records, found a JSON object"),
    ("object1.json", '{"instruction": "a", "output": "b"}',
     "the top level must be a list of records, found a single JSON object"),
    ("number.json", "42", "the top level must be a list of records (a JSON array), found '42'"),
    ("string.json", '"hello"',
     "the top level must be a list of records (a JSON array), found '\"hello\"'"),
    ("empty.json", "", "the file is empty"),
    ("blank.jsonl", "  \n\n ", "the file is empty"),
    ("emptylist.json", "[]", "the file holds an empty list: no records"),
    ("latin1.json", '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"),
     "not UTF-8 text: invalid byte 0xe9 at byte offset 21 (line 1); re-save the file as UTF-8"),
    ("latin1-line2.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n',
     "not UTF-8 text: invalid byte 0xff at byte offset 53 (line 2); re-save the file as UTF-8"),
    ("numbers.json", "[1, 2]", "record 0: each record must be a JSON object, got number"),
    ("unknown-keys.json", '[{"question": "q", "answer": "a"}]',
     "record 0: cannot tell the format from its keys ['answer', 'question']: expected 'messages' "
     "(openai), 'conversations' (sharegpt) or 'instruction'/'output' (alpaca); or pass --format"),
]


@pytest.mark.parametrize("name,content,problem", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_file_errors(tmp_path, name, content, problem):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == f"{path}: {problem}"
    assert e.value.file == str(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found$"):
        read_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a folder, expected a .json or .jsonl file"):
        read_records(tmp_path)


def _openai(*turns) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


RECORD_ERRORS = [
    # wrong types
    ("type-output", [{"instruction": "q", "output": 5}], 0, "output", "expected a string, got number"),
    ("type-input", [{"instruction": "q", "input": ["x"], "output": "a"}], 0, "input",
     "expected a string, got array"),
    ("type-record", [{"instruction": "q", "output": "a"}, "q: a"], 1, None,
     "expected a JSON object, got string"),
    ("type-conversations", [{"conversations": "hi"}], 0, "conversations",
     "expected a list, got string"),
    ("type-turn", [{"messages": ["hi"]}], 0, "messages[0]", "expected an object, got string"),
    ("type-content", [{"messages": [{"role": "user", "content": 3}]}], 0, "messages[0].content",
     "expected a string, got number"),
    ("type-role", [{"messages": [{"role": None, "content": "x"}]}], 0, "messages[0].role", "missing"),
    ("type-history", [{"instruction": "q", "output": "a", "history": "x"}], 0, "history",
     "expected a list of [user, assistant] pairs, got string"),
    ("type-history-pair", [{"instruction": "q", "output": "a", "history": [["u"]]}], 0,
     "history[0]", "expected a [user, assistant] pair"),
    ("type-history-item", [{"instruction": "q", "output": "a", "history": [["u", 1]]}], 0,
     "history[0][1]", "expected a string, got number"),
    ("type-system", [{"instruction": "q", "output": "a", "system": False}], 0, "system",
     "expected a string, got boolean"),
    # missing fields
    ("missing-output", [{"instruction": "q", "output": "a"}, {"instruction": "q"}], 1, "output",
     "missing"),
    ("null-instruction", [{"instruction": None, "output": "a"}], 0, "instruction", "missing"),
    ("missing-value", [{"conversations": [{"from": "human"}]}], 0, "conversations[0].value",
     "missing"),
    ("missing-role", [{"messages": [{"content": "hi"}]}], 0, "messages[0].role", "missing"),
    # empty fields
    ("empty-instruction", [{"instruction": "  ", "output": "a"}], 0, "instruction", "empty"),
    ("empty-output", [{"instruction": "q", "output": ""}], 0, "output", "empty"),
    ("empty-content", [_openai(("user", "hi"), ("assistant", "\n"))], 0, "messages[1].content",
     "empty"),
    ("empty-history", [{"instruction": "q", "output": "a", "history": [["", "a0"]]}], 0,
     "history[0][0]", "empty"),
    ("empty-list", [{"messages": []}], 0, "messages", "empty list"),
    # unknown roles
    ("role-sharegpt", [{"conversations": [{"from": "human", "value": "hi"},
                                          {"from": "bot", "value": "x"}]}], 0,
     "conversations[1].from", "unknown role 'bot' (expected one of assistant, gpt, human, system, user)"),
    ("role-openai", [_openai(("user", "hi"), ("tool", "x"))], 0, "messages[1].role",
     "unknown role 'tool' (expected one of assistant, system, user)"),
    # conversation shape
    ("ends-with-user", [_openai(("user", "hi"), ("assistant", "yo"), ("user", "more"))], 0,
     "messages[2]", "the conversation must end with an assistant turn"),
    ("ends-with-human", [{"conversations": [{"from": "human", "value": "hi"}]}], 0,
     "conversations[0]", "the conversation must end with an assistant turn"),
    ("two-users", [_openai(("user", "a"), ("user", "b"), ("assistant", "c"))], 0, "messages[1]",
     "expected an assistant turn here (turns alternate user, assistant), got user"),
    ("starts-with-assistant", [_openai(("assistant", "a"), ("user", "b"))], 0, "messages[0]",
     "expected a user turn here (turns alternate user, assistant), got assistant"),
    ("system-later", [_openai(("user", "a"), ("system", "s"), ("assistant", "c"))], 0,
     "messages[1]", "a system message may only come first"),
    ("only-system", [_openai(("system", "s"))], 0, "messages[0]",
     "the conversation has only a system message"),
]


@pytest.mark.parametrize("name,records,index,field,problem", RECORD_ERRORS,
                         ids=[c[0] for c in RECORD_ERRORS])
def test_record_errors_name_file_record_and_field(tmp_path, name, records, index, field, problem):
    path = write(tmp_path, f"{name}.json", records)
    with pytest.raises(DataError) as e:
        load_conversations(path)
    where = f"{path}: record {index}: " + (f"field '{field}': " if field else "")
    assert str(e.value) == where + problem
    assert (e.value.file, e.value.record, e.value.field) == (str(path), index, field)


def test_record_errors_in_jsonl_count_records_not_lines(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "q", "output": "a"}\n\n{"instruction": "q"}\n')
    with pytest.raises(DataError) as e:
        load_conversations(path)
    assert str(e.value) == f"{path}: record 1: field 'output': missing"


# --------------------------------------------------------------------------- --skip-bad


def test_skip_bad_counts_and_keeps_indices(tmp_path):
    recs = [{"instruction": "q0", "output": "a0"},
            {"instruction": "q1"},                          # missing output
            {"instruction": "q2", "output": "a2"},
            {"instruction": "q3", "output": 3},             # wrong type
            {"instruction": "q4", "output": "a4"}]
    path = write(tmp_path, "d.json", recs)
    with pytest.raises(DataError):
        load_conversations(path)
    data = load_conversations(path, skip_bad=True)
    assert data.records == 5
    assert [c.index for c in data.conversations] == [0, 2, 4]
    assert [str(e) for e in data.skipped] == [
        f"{path}: record 1: field 'output': missing",
        f"{path}: record 3: field 'output': expected a string, got number"]


def test_skip_bad_skips_malformed_jsonl_lines(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"instruction": "q0", "output": "a0"}\n{"instruction": \n'
                                      '{"instruction": "q2", "output": "a2"}\n')
    data = load_conversations(path, skip_bad=True)
    assert [c.index for c in data.conversations] == [0, 2]
    assert [str(e) for e in data.skipped] == [
        f"{path}: record 1: malformed JSON on line 2, column 17: Expecting value "
        "(JSONL: one record per line)"]


def test_skip_bad_still_stops_on_file_level_errors(tmp_path):
    path = write(tmp_path, "d.json", MALFORMED_ARRAY)
    with pytest.raises(DataError, match="malformed JSON at line 3, column 22"):
        load_conversations(path, skip_bad=True)


def test_skip_bad_with_nothing_left_is_an_error(tmp_path):
    path = write(tmp_path, "d.json", [{"instruction": "q"}, {"output": "a"}])
    with pytest.raises(DataError) as e:
        load_conversations(path, skip_bad=True)
    assert str(e.value) == f"{path}: no usable records (2 bad, all skipped)"
    path = write(tmp_path, "d.jsonl", "{\n{\n")
    with pytest.raises(DataError) as e:
        load_conversations(path, skip_bad=True)
    assert str(e.value) == f"{path}: no usable records (2 bad, all skipped)"
