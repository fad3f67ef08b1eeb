"""Reading data files and turning every supported format into :class:`Conversation`.

Files are a JSON array of records or JSONL (one record per line). Formats:

* **alpaca** — ``instruction``, optional ``input`` (appended to the instruction after a
  newline), ``output``, optional ``system``, optional ``history`` as ``[[user, assistant], ...]``
  turns that come before the instruction.
* **sharegpt** — ``conversations``: ``[{"from": "human"|"gpt"|"system", "value": ...}]``
  (``user``/``assistant`` are accepted as ``from`` too), optional top-level ``system``.
* **openai** — ``messages``: ``[{"role": "system"|"user"|"assistant", "content": ...}]``.

Every problem raises :class:`~chatft.errors.DataError` naming the file, the record index and
the field, e.g. ``data.json: record 7: field 'conversations[2].from': unknown role 'bot'``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatft.data.messages import Conversation, Message, check_conversation
from chatft.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


# --------------------------------------------------------------------------- files


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as users see it in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _decode(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", file=str(path)) from None
    except IsADirectoryError:
        raise DataError("is a folder, expected a .json or .jsonl file", file=str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text: invalid byte 0x{raw[e.start]:02x} at byte offset "
                        f"{e.start} (line {line}); re-save the file as UTF-8",
                        file=str(path)) from None
    if not text.strip():
        raise DataError("the file is empty", file=str(path))
    return text


def read_records(path: str | Path, *, skip_bad: bool = False) -> list[Any]:
    """Parse a JSON array or a JSONL file into a list of (unchecked) records.

    In JSONL a malformed line is one bad record: it raises, or with ``skip_bad`` it stays
    in the list as its :class:`DataError`, so record indices keep matching the file.
    """
    path = Path(path)
    text = _decode(path)
    first = text.lstrip()[0]
    if path.suffix != ".jsonl" and first == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}",
                            file=str(path)) from None
        if not isinstance(records, list):  # pragma: no cover - '[' always parses to a list
            raise DataError("the top level must be a list of records", file=str(path))
        if not records:
            raise DataError("the file holds an empty list: no records", file=str(path))
        return records
    if path.suffix == ".json" and first != "{":
        raise DataError(f"the top level must be a list of records (a JSON array), "
                        f"found {text.lstrip()[:20]!r}", file=str(path))
    # JSONL (or a .json file whose top level is one object: report that clearly).
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if path.suffix == ".json" and lineno == 1:
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError as e2:
                    raise DataError(f"malformed JSON at line {e2.lineno}, column {e2.colno}: "
                                    f"{e2.msg}", file=str(path)) from None
                raise DataError(f"the top level must be a list of records, found a JSON "
                                f"{json_type(whole)}", file=str(path)) from None
            bad = DataError(f"malformed JSON on line {lineno}, column {e.colno}: {e.msg} "
                            f"(JSONL: one record per line)", file=str(path), record=len(records))
            if not skip_bad:
                raise bad from None
            records.append(bad)
    if path.suffix == ".json" and len(records) == 1 and isinstance(records[0], dict):
        raise DataError("the top level must be a list of records, found a single JSON object",
                        file=str(path))
    return records


def detect_format(records: list[Any], path: str) -> str:
    """The format of the first record that is an object, by its keys."""
    at = next((i for i, rec in enumerate(records) if isinstance(rec, dict)), None)
    if at is None:
        other = next((i for i, rec in enumerate(records) if not isinstance(rec, DataError)), None)
        if other is None:  # every line was malformed JSONL, kept as errors by skip_bad
            raise DataError(f"no usable records ({len(records)} bad, all skipped)", file=path)
        raise DataError(f"each record must be a JSON object, got {json_type(records[other])}",
                        file=path, record=other)
    rec = records[at]
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    raise DataError(f"cannot tell the format from its keys {sorted(rec)}: expected "
                    "'messages' (openai), 'conversations' (sharegpt) or 'instruction'/"
                    "'output' (alpaca); or pass --format", file=path, record=at)


# --------------------------------------------------------------------------- records


class _Rec:
    """Typed field access on one record that raises located DataErrors."""

    def __init__(self, rec: Any, path: str, index: int):
        if not isinstance(rec, dict):
            raise DataError(f"expected a JSON object, got {json_type(rec)}", file=path,
                            record=index)
        self.rec, self.path, self.index = rec, path, index

    def error(self, field: str, problem: str) -> DataError:
        return DataError(problem, file=self.path, record=self.index, field=field)

    def text(self, obj: dict, key: str, field: str, *, required: bool = True,
             allow_empty: bool = False) -> str | None:
        if key not in obj or obj[key] is None:
            if required:
                raise self.error(field, "missing")
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {json_type(value)}")
        if not allow_empty and not value.strip():
            if required:
                raise self.error(field, "empty")
            return None
        return value

    def items(self, obj: dict, key: str, field: str) -> list:
        if key not in obj:
            raise self.error(field, "missing")
        value = obj[key]
        if not isinstance(value, list):
            raise self.error(field, f"expected a list, got {json_type(value)}")
        if not value:
            raise self.error(field, "empty list")
        return value


def _alpaca(r: _Rec) -> tuple[list[Message], list[str]]:
    rec = r.rec
    msgs: list[Message] = []
    fields: list[str] = []
    system = r.text(rec, "system", "system", required=False)
    if system:
        msgs.append(Message("system", system))
        fields.append("system")
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise r.error("history", f"expected a list of [user, assistant] pairs, got "
                                     f"{json_type(history)}")
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise r.error(f"history[{i}]", "expected a [user, assistant] pair")
            for j, role in enumerate(("user", "assistant")):
                if not isinstance(pair[j], str):
                    raise r.error(f"history[{i}][{j}]", f"expected a string, got "
                                                        f"{json_type(pair[j])}")
                if not pair[j].strip():
                    raise r.error(f"history[{i}][{j}]", "empty")
                msgs.append(Message(role, pair[j]))  # type: ignore[arg-type]
                fields.append(f"history[{i}][{j}]")
    instruction = r.text(rec, "instruction", "instruction")
    extra = r.text(rec, "input", "input", required=False, allow_empty=True)
    user = instruction + ("\n" + extra if extra else "")  # type: ignore[operator]
    msgs.append(Message("user", user))
    fields.append("instruction")
    msgs.append(Message("assistant", r.text(rec, "output", "output")))  # type: ignore[arg-type]
    fields.append("output")
    return msgs, fields


def _turns(r: _Rec, key: str, role_key: str, text_key: str,
           roles: dict[str, str]) -> tuple[list[Message], list[str]]:
    msgs, fields = [], []
    for i, turn in enumerate(r.items(r.rec, key, key)):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise r.error(where, f"expected an object, got {json_type(turn)}")
        role = r.text(turn, role_key, f"{where}.{role_key}")
        if role not in roles:
            raise r.error(f"{where}.{role_key}", f"unknown role {role!r} (expected one of "
                                                  f"{', '.join(sorted(roles))})")
        content = r.text(turn, text_key, f"{where}.{text_key}",
                         allow_empty=roles[role] == "system")
        msgs.append(Message(roles[role], content))  # type: ignore[arg-type]
        fields.append(where)
    return msgs, fields


def _sharegpt(r: _Rec) -> tuple[list[Message], list[str]]:
    msgs, fields = _turns(r, "conversations", "from", "value", SHAREGPT_ROLES)
    system = r.text(r.rec, "system", "system", required=False)
    if system and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", system))
        fields.insert(0, "system")
    return msgs, fields


def _openai(r: _Rec) -> tuple[list[Message], list[str]]:
    return _turns(r, "messages", "role", "content", {k: k for k in ("system", "user", "assistant")})


_CONVERTERS: dict[str, Callable[[_Rec], tuple[list[Message], list[str]]]] = {
    "alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


def to_conversation(record: Any, fmt: str, *, path: str, index: int,
                    system: str | None = None) -> Conversation:
    """Convert one record; ``system`` is used when the record has no system message."""
    r = _Rec(record, path, index)
    msgs, fields = _CONVERTERS[fmt](r)
    if system and not (msgs and msgs[0].role == "system"):
        msgs.insert(0, Message("system", system))
        fields.insert(0, "system")
    problem = check_conversation(msgs)
    if problem is not None:
        pos, text = problem
        raise r.error(fields[pos] if pos < len(fields) else fmt, text)
    return Conversation(tuple(msgs), index)


@dataclass
class LoadedData:
    """Conversations read from one file, and the records skipped with --skip-bad."""

    path: str
    format: str
    conversations: list[Conversation]
    records: int
    skipped: list[DataError] = field(default_factory=list)


def load_conversations(path: str | Path, fmt: str = "auto", *, system: str | None = None,
                       skip_bad: bool = False) -> LoadedData:
    """Read ``path`` and convert every record; bad records raise, or are skipped and kept
    in :attr:`LoadedData.skipped` when ``skip_bad``."""
    records = read_records(path, skip_bad=skip_bad)
    path = str(path)
    if fmt == "auto":
        fmt = detect_format(records, path)
    elif fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (expected auto, {', '.join(FORMATS)})", file=path)
    convs, skipped = [], []
    for i, rec in enumerate(records):
        if isinstance(rec, DataError):  # a malformed JSONL line kept by skip_bad
            skipped.append(rec)
            continue
        try:
            convs.append(to_conversation(rec, fmt, path=path, index=i, system=system))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(e)
    if not convs:
        raise DataError(f"no usable records ({len(skipped)} bad, all skipped)", file=path)
    return LoadedData(path, fmt, convs, len(records), skipped)
