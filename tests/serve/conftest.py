"""A tiny exported model folder, built the way ``chatft export`` writes one, and servers on it.

``tiny_export_dir``: a random Qwen2ForCausalLM (hidden 64, 2 layers) saved with
``save_pretrained``, the real Qwen tokenizer (with its chat template), a generation config
that stops on ``<|im_end|>`` and ``<|endoftext|>``, and ``chatft.json`` with a persona.
The weights use a wide initialisation (std 0.3) so greedy answers are varied text rather
than one repeated token, which makes "same ids / same text" assertions meaningful.

``served``: the real ``python -m chatft serve`` in a subprocess on a free loopback port.
``chat_model`` / ``engine``: the same folder loaded in this process, for tests that look
inside (the ids fed to the model, injected failures).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

PERSONA = "You are Zhen Huan, a consort in the Qing palace."
CONTEXT = 4096


@pytest.fixture(scope="session")
def tiny_export_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from chatft.export.metadata import ChatMeta, write_meta

    folder = tmp_path_factory.mktemp("tiny-export")
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=len(qwen_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=eot)
    model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    write_meta(folder, ChatMeta(system_prompt=PERSONA, eot_token="<|im_end|>",
                                base_model="tiny-random-qwen2"))
    return folder


@pytest.fixture(scope="session")
def chat_model(tiny_export_dir):
    from chatft.serve.generate import load_chat_model

    return load_chat_model(tiny_export_dir, device="cpu")


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    output: list[str]


def start_server(folder: Path, *extra: str) -> Served:
    """``python -m chatft serve`` on port 0; returns once it printed its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatft", "serve", str(folder), "--port", "0", "--device", "cpu",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    output: list[str] = []
    url = ""
    for line in proc.stdout:  # ends when the process exits (then url stays "")
        output.append(line)
        if "chatft: serving" in line:
            url = line.split(" on ")[1].split()[0]
            break
    if not url:
        proc.wait()
        raise RuntimeError("chatft serve did not start:\n" + "".join(output))
    # Keep draining its output so a chatty server never blocks on a full pipe.
    threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
    return Served(url, proc, output)


def stop_server(served: Served) -> int:
    served.process.terminate()
    return served.process.wait(timeout=60)


@pytest.fixture(scope="session")
def served(tiny_export_dir):
    s = start_server(tiny_export_dir)
    yield s
    assert stop_server(s) == 0, "".join(s.output)
    # Bad requests, disconnects and floods alike: nothing may reach the log as a traceback.
    assert "Traceback" not in "".join(s.output), "".join(s.output)


@pytest.fixture
def engine(chat_model):
    from chatft.serve.engine import Engine

    e = Engine(chat_model, max_batch_size=8).start()
    yield e
    e.stop()
