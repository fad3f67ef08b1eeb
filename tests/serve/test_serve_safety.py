"""Requests the server must refuse, over real HTTP (BackgroundServer in this process):
non-finite and out-of-range numbers, huge seeds, deep nesting, foreign Host and Origin
headers; and how an unforeseen failure is answered and logged."""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from chatft.serve import server as server_module
from chatft.serve.server import BackgroundServer

from .conftest import CONTEXT

HI = [{"role": "user", "content": "Hello, who are you?"}]


def _request(url: str, data: bytes | None = None, headers: dict | None = None
             ) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, out = _request(url + "/v1/chat/completions", raw, headers)
    return status, json.loads(out)


def _openai_error(err: dict) -> dict:
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["message"]
    return err["error"]


BAD = [
    (b'{"messages": %s, "temperature": NaN}', "temperature"),
    (b'{"messages": %s, "top_p": NaN}', "top_p"),
    (b'{"messages": %s, "repetition_penalty": NaN}', "repetition_penalty"),
    (b'{"messages": %s, "temperature": Infinity}', "temperature"),
    (b'{"messages": %s, "top_p": -Infinity}', "top_p"),
    (b'{"messages": %s, "temperature": 1e400}', "temperature"),
    (b'{"messages": %s, "temperature": -1}', "temperature"),
    (b'{"messages": %s, "temperature": 1000000}', "temperature"),
    (b'{"messages": %s, "top_p": 0}', "top_p"),
    (b'{"messages": %s, "top_p": 1.5}', "top_p"),
    (b'{"messages": %s, "repetition_penalty": 0}', "repetition_penalty"),
    (b'{"messages": %s, "top_k": -5}', "top_k"),
    (b'{"messages": %s, "max_tokens": 0}', "max_tokens"),
    (b'{"messages": %s, "n": 2}', "n"),
    (b'{"messages": %s, "seed": ' + str(2 ** 70).encode() + b"}", "seed"),
    (b'{"messages": %s, "seed": 1' + b"0" * 5000 + b"}", "seed"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    (b'{"messages": %s, "max_tokens": ' + str(CONTEXT).encode() + b"}", "max_tokens"),
    (b'{"messages": %s, "max_completion_tokens": ' + str(CONTEXT).encode() + b"}",
     "max_completion_tokens"),
    (b"[" * 10_000 + b"]" * 10_000, None),
    (b'{"messages": %s, "metadata": ' + b"[" * 900 + b"]" * 900 + b"}", "metadata"),
]


def test_bad_numbers_and_shapes_get_a_400_naming_the_field(engine):
    with BackgroundServer(engine) as url:
        for raw, param in BAD:
            raw = raw.replace(b"%s", json.dumps(HI).encode())
            status, body = _post(url, raw)
            err = _openai_error(body)
            assert (status, err["param"], err["type"]) == (400, param, "invalid_request_error"), \
                (raw[:80], err)
        status, body = _post(url, {"messages": HI, "max_tokens": 2, "seed": 2 ** 64 - 1})
        assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert engine.stats()["submitted"] == 1  # no refused request reached the model


def test_unforeseen_failure_is_a_json_500_without_internals_logged_once(engine, monkeypatch,
                                                                        caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine.cm, "prompt_ids", broken)
    with BackgroundServer(engine) as url, caplog.at_level(logging.ERROR):
        status, body = _post(url, {"messages": HI, "max_tokens": 2})
        err = _openai_error(body)
        assert status == 500 and err["type"] == "server_error"
        assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
        assert _request(url + "/health")[0] == 200  # still serving
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "secret internal detail" in caplog.text
    assert logged[0].name == "chatft.serve"


def test_failure_after_the_stream_started_ends_it_with_an_error_event(engine, monkeypatch,
                                                                      caplog):
    real = server_module.chunk_body
    calls = {"n": 0}

    def fails_second(*args, **kwargs):  # the role chunk goes out, the first text fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("secret internal detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(server_module, "chunk_body", fails_second)
    with BackgroundServer(engine) as url, caplog.at_level(logging.ERROR):
        status, raw = _request(url + "/v1/chat/completions", json.dumps(
            {"messages": HI, "max_tokens": 5, "stream": True}).encode())
    events = [line[6:] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    err = _openai_error(json.loads(events[-2]))
    assert err["type"] == "server_error" and "secret" not in events[-2]
    assert len([r for r in caplog.records if r.exc_info]) == 1


def _raw_http(url: str, data: bytes) -> bytes:
    u = urlsplit(url)
    out = b""
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(data)
        while chunk := s.recv(65536):  # every request here closes the connection
            out += chunk
    return out


def test_malformed_http_is_a_400_logged_as_one_line(engine, caplog):
    with BackgroundServer(engine) as url, caplog.at_level(logging.WARNING):
        reply = _raw_http(url, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
        assert reply.startswith(b"HTTP/1.") and b" 400 " in reply.split(b"\r\n")[0]
        # A body that is not the gzip it claims to be: a JSON 400 from the handler.
        reply = _raw_http(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Encoding: gzip\r\nContent-Length: 10\r\n"
                          b"Connection: close\r\n\r\n0123456789")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0]
        assert "gzip" in _openai_error(json.loads(body))["message"]
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    records = [r for r in caplog.records if r.name == "chatft.serve.http"]
    assert "Invalid header" in records[0].getMessage()
    assert all("\n" not in r.getMessage() for r in records)


def _host(url: str, path: str, host: str, data: bytes | None = None,
          headers: dict | None = None) -> tuple[int, bytes]:
    return _request(url + path, data, {"Host": host, **(headers or {})})


ASK = json.dumps({"messages": HI, "max_tokens": 1}).encode()


def test_foreign_host_is_refused_without_an_api_key(engine):
    with BackgroundServer(engine) as url:
        port = urlsplit(url).port
        for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.1.2.3"]:
            for path, data in [("/", None), ("/config", None), ("/v1/models", None),
                               ("/v1/chat/completions", ASK)]:
                assert _host(url, path, host, data)[0] == 200, (host, path)
        for host in [f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}",
                     f"10.1.2.3:{port}"]:
            for path, data in [("/", None), ("/config", None), ("/health", None),
                               ("/v1/chat/completions", ASK)]:
                status, body = _host(url, path, host, data)
                err = _openai_error(json.loads(body))
                assert status == 403 and err["code"] == "host_not_allowed", (host, path)
                assert "--allowed-hosts" in err["message"]
    assert engine.stats()["submitted"] == 4  # the loopback POSTs only


def test_allowed_hosts_and_api_key(engine):
    with BackgroundServer(engine, allowed_hosts="chat.example,10.1.2.3") as url:
        assert _host(url, "/config", "chat.example:8080")[0] == 200
        assert _host(url, "/config", "10.1.2.3")[0] == 200
        assert _host(url, "/config", "localhost")[0] == 200
        assert _host(url, "/config", "evil.example")[0] == 403
    with BackgroundServer(engine, allowed_hosts="*") as url:
        assert _host(url, "/v1/chat/completions", "evil.example", ASK)[0] == 200
    # With a key the Host is not checked: the key is what a foreign page lacks.
    with BackgroundServer(engine, api_key="s3cret") as url:
        assert _host(url, "/config", "evil.example")[0] == 200
        assert _host(url, "/v1/chat/completions", "evil.example", ASK)[0] == 401
        assert _host(url, "/v1/chat/completions", "evil.example", ASK,
                     {"Authorization": "Bearer s3cret"})[0] == 200


def test_post_from_another_origin_is_refused(engine):
    with BackgroundServer(engine) as url:
        own = url  # http://127.0.0.1:PORT, as the chat page sends it
        status, body = _post(url, {"messages": HI, "max_tokens": 1}, {"Origin": own})
        assert status == 200
        for origin in ["https://evil.example", "http://localhost:3000", "null",
                       url.replace("127.0.0.1", "localhost")]:
            status, body = _post(url, {"messages": HI, "max_tokens": 1}, {"Origin": origin})
            err = _openai_error(body)
            assert status == 403 and err["code"] == "origin_not_allowed", origin
        # GETs are not checked (a foreign page cannot read the answer without CORS).
        assert _request(url + "/config", headers={"Origin": "https://evil.example"})[0] == 200
    assert engine.stats()["submitted"] == 1


def test_serve_cli_refuses_an_empty_batch(tiny_export_dir, capsys):
    from chatft.cli import main

    assert main(["serve", str(tiny_export_dir), "--max-batch-size", "0"]) == 2
    assert "--max-batch-size 0: expected at least 1" in capsys.readouterr().err
