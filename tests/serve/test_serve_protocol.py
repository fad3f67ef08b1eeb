"""Request validation: each rule of chatft.serve.protocol.parse_request."""

from __future__ import annotations

import pytest

from chatft.serve.protocol import ApiError, parse_request

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
