"""The server in this process (BackgroundServer): what reaches the model, auth, failures."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from chatft.data.render import chat_format
from chatft.serve.server import BackgroundServer

from .conftest import PERSONA

HI = [{"role": "user", "content": "Hello, who are you?"}]


def test_prompt_ids_fed_to_the_model_are_the_training_format(engine, chat_model, qwen_tokenizer):
    """Capture the ids of the prefill forward pass through a hook on the embedding."""
    seen: list[list[int]] = []
    embed = chat_model.model.get_input_embeddings()
    hook = embed.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0].tolist()) if args[0].shape[1] > 1 else None)
    fmt = chat_format(qwen_tokenizer)
    turns = HI + [{"role": "assistant", "content": "I am a consort."},
                  {"role": "user", "content": "皇上呢？"}]
    try:
        with BackgroundServer(engine) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            c.chat.completions.create(model="m", messages=HI, max_tokens=2)
            c.chat.completions.create(model="m", messages=turns, max_tokens=2, stream=False)
            own = [{"role": "system", "content": "You are a cat."}] + HI
            list(c.chat.completions.create(model="m", messages=own, max_tokens=2, stream=True))
    finally:
        hook.remove()
    system = [{"role": "system", "content": PERSONA}]
    assert seen == [fmt.prompt_ids(system + HI), fmt.prompt_ids(system + turns),
                    fmt.prompt_ids(own)]
    text = qwen_tokenizer.decode(seen[0])
    assert text.startswith(f"<|im_start|>system\n{PERSONA}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_key_is_required_on_the_api_only(engine):
    with BackgroundServer(engine, api_key="s3cret") as url:
        status, body = _get(url + "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        status, _ = _get(url + "/v1/models", {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _ = _get(url + "/v1/models", {"Authorization": "s3cret"})
        assert status == 401
        assert _get(url + "/health")[0] == 200
        status, cfg = _get(url + "/config")
        assert status == 200 and cfg["auth_required"] is True
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        r = c.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert r.choices[0].finish_reason == "length"


def test_config_and_page(engine):
    with BackgroundServer(engine) as url:
        status, cfg = _get(url + "/config")
        assert cfg == {"model": engine.cm.name, "system_prompt": PERSONA,
                       "max_context": engine.cm.max_context, "auth_required": False}
        with urllib.request.urlopen(url + "/") as r:
            html = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/html")
        assert "/v1/chat/completions" in html
        # No external assets: the page must work offline.
        assert "http://" not in html and "https://" not in html and "src=" not in html


def test_model_failure_fails_that_request_and_the_server_keeps_serving(engine, monkeypatch):
    batch = engine._batch
    real = batch._forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "_forward", flaky)
    with BackgroundServer(engine) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert "simulated out of memory" in e.value.body["message"]
        r = c.chat.completions.create(model="m", messages=HI, max_tokens=3)
        assert r.choices[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["failed"] == 1 and stats["completed"] == 1
