"""The OpenAI chat-completions wire format: request validation and response bodies.

Kept apart from the HTTP layer so every rule is a plain function of the body:
:func:`decode_body` (bytes -> JSON value, refusing what Python's ``json`` accepts but no field
can use) then :func:`parse_request` (JSON value -> :class:`ChatRequest`, numeric ranges from
:mod:`chatft.serve.limits`). A request that breaks a rule raises :class:`ApiError`, which the
server turns into an HTTP 4xx with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, ``param`` naming the field.

Supported: ``messages`` (system/developer, user, assistant; text content as a string or as
a list of ``{"type": "text"}`` parts), ``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens``, ``stop``, ``seed``, ``n`` (1 only), ``stream``,
``stream_options.include_usage``, and the extension ``ignore_eos``. Features the server
cannot honour (tools, logprobs, penalties, logit_bias, JSON mode, n > 1) are rejected with
400 rather than silently ignored; bookkeeping fields (``user``, ``metadata``, ``store``) are
accepted and ignored. The ``model`` field is not checked: the server has one model and
answers with its id.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from chatft.serve import limits
from chatft.serve.limits import Limit

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
_INTEGER = Limit(-math.inf, math.inf, integer=True)


class ApiError(Exception):
    """A request the server refuses; ``status`` is the HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.type, self.code = type, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """A validated request. ``max_tokens`` None = as many as the context allows (capped by
    the server's default); the sampling fields None = the model's defaults."""

    messages: list[dict]
    stream: bool
    include_usage: bool
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool
    top_k: int = 0
    """Not OpenAI's (vLLM and others take it): 0 or -1 = no limit."""

    repetition_penalty: float = 1.0
    """Not OpenAI's (vLLM and others take it): 1 = off."""

    max_tokens_param: str = "max_tokens"
    """Which field set ``max_tokens`` (``max_completion_tokens`` is the newer name): errors
    about the answer's length name the field the client sent."""


def _checked(body: dict, key: str, limit: Limit, param: str | None = None):
    """``body[key]`` if it is within ``limit`` (None if absent); else an ApiError naming it."""
    v = body.get(key)
    if v is None:
        return None
    problem = limit.problem(v)
    if problem:
        raise ApiError(f"'{param or key}' {problem}", param=param or key)
    return v


def _number(body: dict, key: str, limit: Limit) -> float | None:
    v = _checked(body, key, limit)
    return None if v is None else float(v)


def _bool(body: dict, key: str, param: str | None = None) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{param or key}' must be a boolean, got {type(v).__name__}",
                       param=param or key)
    return v


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    param = f"messages[{i}].content"
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise ApiError(f"{param}[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                               "...}) are supported", param=f"{param}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    if c is None:
        raise ApiError(f"{param} is missing", param=param)
    raise ApiError(f"{param} must be a string or a list of text parts, got {type(c).__name__}",
                   param=param)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError("'messages' is required", param="messages")
    if not isinstance(msgs, list):
        raise ApiError(f"'messages' must be a list, got {type(msgs).__name__}", param="messages")
    if not msgs:
        raise ApiError("'messages' must hold at least one message", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(f"messages[{i}] must be an object, got {type(m).__name__}",
                           param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(f"messages[{i}].role: unknown role {role!r} (expected one of "
                           f"{', '.join(ROLES)})", param=f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(f"messages[{i}]: tool calls are not supported", param=f"messages[{i}]")
        role = ROLES[role]
        if role == "system" and i != 0:
            raise ApiError(f"messages[{i}]: a system message may only come first (the model was "
                           "trained with one persona per conversation)",
                           param=f"messages[{i}].role")
        out.append({"role": role, "content": _content(m, i)})
    if all(m["role"] == "system" for m in out):
        raise ApiError("'messages' has no user message", param="messages")
    return out


_UNSUPPORTED_TRUTHY = {
    "tools": "tools / function calling", "functions": "function calling",
    "logprobs": "logprobs", "top_logprobs": "logprobs", "logit_bias": "logit_bias",
}


#: Non-OpenAI sampling knobs -> the values that mean "off".
_SAMPLING_EXTENSIONS: dict[str, tuple] = {"min_p": (0, 0.0)}


MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a body. A chat request needs 4 (body >
messages > message > content parts > part); a deeper body is refused before anything walks
it, so no later code can run out of stack on it."""

MAX_INT_DIGITS = 40
"""Longest integer literal decoded (a 64-bit seed has 20 digits). Python refuses to convert
integers of over 4300 digits with a ValueError of its own; this bound keeps every such case
on the same named error."""

_SURROGATE = re.compile(r"[\ud800-\udfff]")


class _Unusable:
    """What the decoder yields for a literal no field can use: ``NaN``, ``Infinity``,
    ``-Infinity`` (Python's ``json`` accepts them; RFC 8259 JSON has no such numbers) and
    over-long integers. :func:`_check_values` finds it and names its field."""

    def __init__(self, problem: str):
        self.problem = problem


def _parse_constant(text: str) -> _Unusable:
    return _Unusable(f"is {text}, which is not a JSON number (numbers must be finite)")


def _parse_int(text: str) -> int | _Unusable:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Unusable(f"is an integer of {digits} digits (at most {MAX_INT_DIGITS} are "
                         "accepted)")
    return int(text)


def decode_body(raw: bytes) -> Any:
    """The JSON value of a request body, refusing what Python's ``json`` lets through but no
    field can use: NaN/Infinity literals, numbers that overflow to infinity (``1e999``),
    integers of more than ``MAX_INT_DIGITS`` digits, nesting deeper than ``MAX_DEPTH`` and
    strings holding unpaired surrogates (``"\\ud800"``: a valid JSON escape, but not text;
    the tokenizer cannot encode it). The error names the field (``messages[0].content``).

    Refusing NaN here, for the whole body, rather than only in the numeric fields, also
    covers fields read for their truth value (NaN is truthy)."""
    too_deep = f"the request body nests arrays/objects deeper than {MAX_DEPTH} levels"
    try:
        body = json.loads(raw, parse_constant=_parse_constant, parse_int=_parse_int)
    except RecursionError:  # the C decoder's own depth guard (about 1000 levels)
        raise ApiError(too_deep) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError (bytes not UTF-8/16/32)
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]  # (value, field path, depth)
    while stack:  # no recursion: the depth bound is what this walk enforces
        v, path, depth = stack.pop()
        name = f"'{path}'" if path else "the request body"
        if isinstance(v, (dict, list)):
            if depth >= MAX_DEPTH:
                top = path.split(".")[0].split("[")[0]  # the body's field it is in
                raise ApiError(f"{too_deep} (in '{top}')" if top else too_deep,
                               param=top or None)
            if isinstance(v, dict):
                children = [(x, f"{path}.{k}" if path else str(k)) for k, x in v.items()]
            else:
                children = [(x, f"{path}[{i}]") for i, x in enumerate(v)]
            # Reversed onto the stack: fields are checked, and the first bad one named, in
            # document order.
            stack.extend((x, p, depth + 1) for x, p in reversed(children))
        elif isinstance(v, _Unusable):
            raise ApiError(f"{name} {v.problem}", param=path or None)
        elif isinstance(v, float) and not math.isfinite(v):
            raise ApiError(f"{name} is beyond the range of a float (numbers must be finite)",
                           param=path or None)
        elif isinstance(v, str) and not v.isascii() and _SURROGATE.search(v):
            raise ApiError(f"{name} holds an unpaired UTF-16 surrogate escape (\\ud800-"
                           "\\udfff), which is not text", param=path or None)
    return body


def parse_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`ApiError` on the first problem."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, what in _UNSUPPORTED_TRUTHY.items():
        if body.get(key):
            raise ApiError(f"{what} is not supported by this server", param=key)
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(body, key, limits.PENALTY):
            raise ApiError(f"'{key}' is not supported (only 0)", param=key)
    # Sampling extensions other servers accept and this one does not: refused unless
    # neutral, never ignored.
    for key, neutral in _SAMPLING_EXTENSIONS.items():
        v = body.get(key)
        if v is not None and v not in neutral:
            raise ApiError(f"'{key}' is not supported by this server (sampling uses "
                           f"temperature and top_p); leave it out", param=key)
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ApiError("only response_format {\"type\": \"text\"} is supported",
                       param="response_format")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"'model' must be a string, got {type(model).__name__}", param="model")
    messages = _messages(body)
    n = _checked(body, "n", _INTEGER)
    if n is not None and n != 1:
        raise ApiError(f"'n' must be 1 (one answer per request), got {n}", param="n")
    # Both spellings are checked; the newer one wins when both are given.
    max_tokens, key = _checked(body, "max_tokens", limits.MAX_TOKENS), "max_tokens"
    newer = _checked(body, "max_completion_tokens", limits.MAX_TOKENS)
    if newer is not None:
        max_tokens, key = newer, "max_completion_tokens"
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}",
                       param="stop")
    if any(not s for s in stops):
        raise ApiError("'stop' strings must not be empty", param="stop")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    stream = _bool(body, "stream")
    include_usage = _bool(opts or {}, "include_usage", "stream_options.include_usage")
    if include_usage and not stream:
        raise ApiError("'stream_options' is only allowed with stream: true", param="stream_options")
    return ChatRequest(
        messages=messages, stream=stream, include_usage=include_usage,
        temperature=_number(body, "temperature", limits.TEMPERATURE),
        top_p=_number(body, "top_p", limits.TOP_P),
        max_tokens=max_tokens, max_tokens_param=key, stop=stops,
        seed=_checked(body, "seed", limits.SEED), ignore_eos=_bool(body, "ignore_eos"),
        top_k=max(_checked(body, "top_k", limits.TOP_K) or 0, 0),
        repetition_penalty=_number(body, "repetition_penalty", limits.REPETITION_PENALTY) or 1.0)


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk_body(cid: str, created: int, model: str, delta: dict,
               finish_reason: str | None = None, with_usage: dict | None = None,
               empty_choices: bool = False) -> dict:
    """One ``chat.completion.chunk``; the usage chunk (stream_options.include_usage) has no
    choices."""
    body: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                  "choices": [] if empty_choices else
                  [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage is not None:
        body["usage"] = with_usage
    return body
