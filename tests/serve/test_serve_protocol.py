"""Request validation: each rule of chatft.serve.protocol.parse_request."""

from __future__ import annotations

import json
import math

import pytest

from chatft.serve.protocol import MAX_DEPTH, ApiError, decode_body, parse_request

USER = [{"role": "user", "content": "hi"}]


def test_minimal_request_defaults():
    r = parse_request({"messages": USER})
    assert r.messages == USER
    assert (r.stream, r.temperature, r.top_p, r.max_tokens, r.stop, r.seed) == \
        (False, None, None, None, (), None)


def test_fields_are_read():
    r = parse_request({
        "model": "x", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}],
        "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 7, "stop": "\n",
        "seed": 3, "n": 1, "stream": True, "stream_options": {"include_usage": True},
        "user": "someone"})
    assert r.messages == [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "ab"}]
    assert (r.temperature, r.top_p, r.max_tokens, r.stop, r.seed, r.stream, r.include_usage) == \
        (0.5, 0.9, 7, ("\n",), 3, True, True)


@pytest.mark.parametrize("body, param", [
    ([], None),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "system", "content": "s"}]}, "messages"),
    ({"messages": USER + [{"role": "system", "content": "s"}]}, "messages[1].role"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": True}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": USER, "stop": 3}, "stop"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stop": [""]}, "stop"),
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "seed": "1"}, "seed"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": USER, "top_k": -2}, "top_k"),
    ({"messages": USER, "top_k": 2.5}, "top_k"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": USER, "repetition_penalty": "high"}, "repetition_penalty"),
    ({"messages": USER, "min_p": 0.05}, "min_p"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "model": 7}, "model"),
    # Non-finite and out-of-range numbers (a Python caller can pass NaN directly).
    ({"messages": USER, "temperature": math.nan}, "temperature"),
    ({"messages": USER, "temperature": math.inf}, "temperature"),
    ({"messages": USER, "temperature": -0.5}, "temperature"),
    ({"messages": USER, "top_p": math.nan}, "top_p"),
    ({"messages": USER, "top_p": -0.1}, "top_p"),
    ({"messages": USER, "repetition_penalty": math.nan}, "repetition_penalty"),
    ({"messages": USER, "repetition_penalty": -1.0}, "repetition_penalty"),
    ({"messages": USER, "repetition_penalty": 1e6}, "repetition_penalty"),
    ({"messages": USER, "frequency_penalty": math.nan}, "frequency_penalty"),
    ({"messages": USER, "frequency_penalty": 3}, "frequency_penalty"),
    ({"messages": USER, "min_p": math.nan}, "min_p"),
    ({"messages": USER, "seed": 2 ** 70}, "seed"),
    ({"messages": USER, "seed": -2 ** 63 - 1}, "seed"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "n": 1.0}, "n"),
    ({"messages": USER, "max_tokens": -(2 ** 70)}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
    ({"messages": USER, "max_completion_tokens": 5, "max_tokens": "x"}, "max_tokens"),
    ({"messages": USER, "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
])
def test_bad_requests_name_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        parse_request(body)
    assert e.value.status == 400
    assert e.value.param == param
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]


def test_sampling_extensions():
    req = parse_request({"messages": USER, "top_k": -1, "repetition_penalty": 1.0, "min_p": 0})
    assert (req.top_k, req.repetition_penalty) == (0, 1.0)
    assert (parse_request({"messages": USER}).top_k,
            parse_request({"messages": USER}).repetition_penalty) == (0, 1.0)
    req = parse_request({"messages": USER, "top_k": 40, "repetition_penalty": 1.2})
    assert (req.top_k, req.repetition_penalty) == (40, 1.2)


def test_extreme_values_in_range_are_accepted():
    r = parse_request({"messages": USER, "seed": 2 ** 64 - 1, "top_k": 10 ** 30,
                       "temperature": 2, "top_p": 1, "max_completion_tokens": 3})
    assert (r.seed, r.top_k, r.temperature, r.top_p) == (2 ** 64 - 1, 10 ** 30, 2.0, 1.0)
    assert (r.max_tokens, r.max_tokens_param) == (3, "max_completion_tokens")
    assert parse_request({"messages": USER, "seed": -2 ** 63}).seed == -2 ** 63


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [], "temperature": NaN}', "temperature"),
    (b'{"top_p": Infinity}', "top_p"),
    (b'{"repetition_penalty": -Infinity}', "repetition_penalty"),
    (b'{"temperature": 1e999}', "temperature"),
    (b'{"seed": ' + b"1" * 41 + b"}", "seed"),
    (b'{"seed": -' + b"9" * 5000 + b"}", "seed"),  # Python's own 4300-digit limit, named
    (b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": [NaN]}}',
     "metadata.a[0]"),
    (b'{"stream_options": {"include_usage": NaN}}', "stream_options.include_usage"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"stop": ["\\udfff"]}', "stop[0]"),
    (b'{"metadata": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}", "metadata"),
    (b"[" * 10_000 + b"]" * 10_000, None),  # deeper than the C decoder's own guard
    (b"[" * 500 + b"]" * 500, None),  # decodes, refused by the depth bound
    (b"NaN", None),
    (b"{not json", None),
    (b"\xff\xfe\x00", None),
    (b"", None),
])
def test_decode_refuses_what_json_loads_lets_through(raw, param):
    with pytest.raises(ApiError) as e:
        decode_body(raw)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    assert e.value.message


def test_decode_accepts_ordinary_bodies():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "皇上 😀 \u00e9"}]}],
            "temperature": 0.5, "seed": -(2 ** 63), "metadata": {"a": {"b": [1, 2.5, None]}}}
    assert decode_body(json.dumps(body).encode()) == body  # surrogate pairs are text
    assert decode_body(json.dumps(body, ensure_ascii=False).encode("utf-16")) == body
    nested = {"x": 0}
    for _ in range(MAX_DEPTH - 1):
        nested = {"x": nested}
    assert decode_body(json.dumps(nested).encode()) == nested  # exactly at the bound
