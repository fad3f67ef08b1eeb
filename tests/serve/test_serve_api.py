"""The real ``chatft serve`` (subprocess) driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from chatft.serve.batch import SamplingParams
from chatft.serve.generate import reply

from .conftest import CONTEXT, PERSONA

HI = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def _health(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/health") as r:
        return json.loads(r.read())


def _wait_for(url: str, predicate, what: str, deadline_s: float = 60.0) -> dict:
    """Poll /health until ``predicate(health)`` holds (bounded; a hang fails the test)."""
    end = time.monotonic() + deadline_s
    while True:
        h = _health(url)
        if predicate(h):
            return h
        assert time.monotonic() < end, f"timed out waiting for {what}: {h}"
        time.sleep(0.05)


def test_models_and_health(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == [models[0].id] and models[0].id.startswith("tiny-export")
    h = _health(served.url)
    assert h["status"] == "ok" and h["model"] == models[0].id


def test_non_streaming_completion(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    again = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_streaming_matches_non_streaming(client):
    full = client.chat.completions.create(model="tiny", messages=HI, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_persona_default_and_override_change_the_prompt(client):
    default = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0)
    explicit = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": PERSONA}] + HI, max_tokens=5,
        temperature=0)
    other = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "You are a cat."}] + HI,
        max_tokens=5, temperature=0)
    assert default.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert default.choices[0].message.content == explicit.choices[0].message.content
    assert other.usage.prompt_tokens != default.usage.prompt_tokens


def test_multi_turn_and_stop_strings(client):
    turns = HI + [{"role": "assistant", "content": "I am Zhen Huan."},
                  {"role": "user", "content": "Tell me more."}]
    full = client.chat.completions.create(model="tiny", messages=turns, max_tokens=30,
                                          temperature=0).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.chat.completions.create(model="tiny", messages=turns, max_tokens=30,
                                         temperature=0, stop=[stop, "\u2603never"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]
    streamed = client.chat.completions.create(model="tiny", messages=turns, max_tokens=30,
                                              temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        full[:full.index(stop)]


def test_seed_makes_sampling_reproducible(client):
    def ask(seed):
        return client.chat.completions.create(model="tiny", messages=HI, max_tokens=16,
                                              temperature=1.0, top_p=0.95,
                                              seed=seed).choices[0].message.content
    assert ask(11) == ask(11)
    assert ask(11) != ask(12)


def test_top_k_and_repetition_penalty_reach_the_sampler(client, chat_model):
    # sent as the extra body fields vLLM clients use
    def ask(messages, **extra):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                              extra_body=extra, **({"temperature": 1.5, "seed": 3}
                                              if "top_k" in extra else {"temperature": 0})
                                              ).choices[0].message.content
    greedy = ask(HI)
    assert ask(HI, top_k=1) == greedy  # one candidate: any temperature is greedy
    changed = 0
    for text in ("hi", "a b c d", "你好", "Tell me about the palace."):
        messages = [{"role": "user", "content": text}]
        penalized = ask(messages, repetition_penalty=1.3)
        assert penalized == reply(chat_model, messages, SamplingParams(
            max_new_tokens=16, repetition_penalty=1.3)).text
        changed += penalized != ask(messages)
    assert changed  # the penalty did change some answer


def test_n_above_one_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, n=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"


async def _post(session: aiohttp.ClientSession, url: str, data: bytes | str,
                headers: dict | None = None) -> tuple[int, dict]:
    async with session.post(url + "/v1/chat/completions", data=data,
                            headers=headers or {"Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


BAD_BODIES = [
    ("{not json", 400, None),
    ("[1, 2]", 400, None),
    ('"hello"', 400, None),
    (json.dumps({"messages": []}), 400, "messages"),
    (json.dumps({"messages": "hi"}), 400, "messages"),
    (json.dumps({}), 400, "messages"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": {"a": 1}}]}), 400, "messages[0].content"),
    (json.dumps({"messages": HI, "temperature": "warm"}), 400, "temperature"),
    (json.dumps({"messages": HI, "top_p": 1.5}), 400, "top_p"),
    (json.dumps({"messages": HI, "max_tokens": "ten"}), 400, "max_tokens"),
    (json.dumps({"messages": HI, "max_tokens": -1}), 400, "max_tokens"),
    (json.dumps({"messages": HI, "max_tokens": CONTEXT}), 400, "max_tokens"),
    (json.dumps({"messages": HI, "stop": [1]}), 400, "stop"),
    (json.dumps({"messages": HI, "seed": 1.5}), 400, "seed"),
    (json.dumps({"messages": HI, "n": 3}), 400, "n"),
    (json.dumps({"messages": HI, "stream": "true"}), 400, "stream"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * (CONTEXT + 10)}]}), 400,
     "messages"),
    ('{"messages": %s, "temperature": NaN}' % json.dumps(HI), 400, "temperature"),
    ('{"messages": %s, "top_p": Infinity}' % json.dumps(HI), 400, "top_p"),
    (json.dumps({"messages": HI, "seed": 2 ** 70}), 400, "seed"),
    ("[" * 10_000 + "]" * 10_000, 400, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    async def main():
        async with aiohttp.ClientSession() as s:
            for body, status, param in BAD_BODIES:
                got, err = await _post(s, served.url, body)
                assert got == status, (body[:60], err)
                assert set(err["error"]) == {"message", "type", "param", "code"}, err
                assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
                assert err["error"]["param"] == param, (body[:60], err)
            too_long = json.dumps({"messages": HI, "max_tokens": CONTEXT})
            got, err = await _post(s, served.url, too_long)
            assert err["error"]["code"] == "context_length_exceeded"
            # Over the 1 MiB body limit: 413, same error shape.
            huge = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
            got, err = await _post(s, served.url, huge)
            assert got == 413 and err["error"]["code"] == "request_too_large"
            async with s.get(served.url + "/v1/nothing-here") as r:
                assert r.status == 404 and "error" in await r.json()
            async with s.get(served.url + "/v1/chat/completions") as r:
                assert r.status == 405 and "error" in await r.json()
            got, ok = await _post(s, served.url, json.dumps({"messages": HI, "max_tokens": 3}))
            assert got == 200 and ok["choices"][0]["finish_reason"] == "length"
    asyncio.run(main())
    assert "Traceback" not in "".join(served.output)  # every refusal was foreseen


def test_32_concurrent_clients_times_4_requests_all_answered(served):
    """Every request of 32 clients x 4 (half streaming) gets a complete answer."""
    async def one_client(c: openai.AsyncOpenAI, k: int) -> list[tuple[str, str, int]]:
        out = []
        for j in range(4):
            msgs = [{"role": "user", "content": f"client {k} request {j}"}]
            if (k + j) % 2:
                text, finish, usage = "", None, None
                async for ch in await c.chat.completions.create(
                        model="tiny", messages=msgs, max_tokens=8 + j, temperature=0.7, seed=k,
                        stream=True, stream_options={"include_usage": True}):
                    if ch.choices:
                        text += ch.choices[0].delta.content or ""
                        finish = ch.choices[0].finish_reason or finish
                    usage = ch.usage or usage
                out.append((text, finish, usage.completion_tokens))
            else:
                r = await c.chat.completions.create(model="tiny", messages=msgs,
                                                    max_tokens=8 + j, temperature=0.7, seed=k)
                out.append((r.choices[0].message.content, r.choices[0].finish_reason,
                            r.usage.completion_tokens))
        return out

    async def main():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                               timeout=300)
        try:
            return await asyncio.gather(*(one_client(c, k) for k in range(32)))
        finally:
            await c.close()

    before = _health(served.url)
    results = asyncio.run(main())
    answers = [a for client_answers in results for a in client_answers]
    assert len(answers) == 128
    for text, finish, n in answers:
        assert finish in ("stop", "length") and text is not None
        assert n >= 1 and (finish == "stop" or n in (8, 9, 10, 11))
    after = _health(served.url)
    assert after["completed"] - before["completed"] == 128
    assert after["failed"] == before["failed"] and after["running"] == 0
    assert after["max_batch_seen"] > 1  # requests were batched together


def test_disconnected_streaming_client_is_cancelled(served):
    async def main():
        body = json.dumps({"messages": HI, "stream": True, "max_tokens": CONTEXT - 100,
                           "ignore_eos": True})
        async with aiohttp.ClientSession() as s:
            async with s.post(served.url + "/v1/chat/completions", data=body) as r:
                assert r.status == 200
                seen = 0
                async for line in r.content:
                    if line.startswith(b"data: ") and b'"content"' in line:
                        seen += 1
                        if seen == 3:
                            break
            # Leaving the block without reading the rest closes the connection.

    before = _health(served.url)
    asyncio.run(main())
    after = _wait_for(served.url, lambda h: h["cancelled"] > before["cancelled"] and
                      h["running"] == 0, "the request to be cancelled")
    assert after["completed"] == before["completed"]
    assert after["generated_tokens"] - before["generated_tokens"] < CONTEXT - 100


async def _start_unread_request(url: str, payload: dict, what: str) -> asyncio.StreamWriter:
    """POST ``payload`` to the chat endpoint on a bare socket whose answer is never read, and
    return once the server runs the request (``what`` names it if that never happens). The
    caller closes the returned writer to disconnect."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % (host.encode(), port.encode(), len(body)) + body)
    await writer.drain()
    await asyncio.to_thread(_wait_for, url, lambda h: h["running"] >= 1, what)
    return writer


def test_client_that_does_not_read_does_not_stall_others(served):
    """A streaming client that never reads its socket; other requests still finish."""

    async def main():
        writer = await _start_unread_request(
            served.url, {"messages": HI, "stream": True, "max_tokens": CONTEXT - 100,
                         "ignore_eos": True}, "the silent request to start")
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        try:
            answers = await asyncio.gather(*(c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": str(i)}], max_tokens=10)
                for i in range(4)))
        finally:
            await c.close()
        slow_still_running = _health(served.url)["running"] >= 1
        writer.close()
        return answers, slow_still_running

    before = _health(served.url)
    answers, slow_still_running = asyncio.run(main())
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert slow_still_running
    _wait_for(served.url, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0,
              "the silent request to be cancelled")


def test_disconnected_non_streaming_client_is_cancelled(served):
    async def main():
        writer = await _start_unread_request(
            served.url, {"messages": HI, "max_tokens": CONTEXT - 100, "ignore_eos": True},
            "the request to start")
        writer.close()
        await writer.wait_closed()

    before = _health(served.url)
    asyncio.run(main())
    after = _wait_for(served.url, lambda h: h["cancelled"] > before["cancelled"] and
                      h["running"] == 0, "the request to be cancelled")
    assert after["completed"] == before["completed"]


def test_allowed_hosts_option(tiny_export_dir):
    """``chatft serve --allowed-hosts``: the named host is answered, others get 403."""
    import urllib.error
    import urllib.request

    from .conftest import start_server, stop_server

    def status(url: str, host: str) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/config",
                                                               headers={"Host": host})) as r:
                return r.status
        except urllib.error.HTTPError as e:
            assert json.loads(e.read())["error"]["code"] == "host_not_allowed"
            return e.code

    s = start_server(tiny_export_dir, "--allowed-hosts", "chat.example, box.lan")
    try:
        assert [status(s.url, h) for h in ("chat.example:8000", "box.lan", "localhost",
                                           "evil.example")] == [200, 200, 200, 403]
    finally:
        assert stop_server(s) == 0, "".join(s.output)
