"""An Ollama ``Modelfile`` beside an exported GGUF: ``ollama create NAME -f FILE.Modelfile``.

It names the GGUF (``FROM``), the persona (``SYSTEM``), the end-of-turn token (``PARAMETER
stop``) and, for ChatML models (Qwen2, SmolLM2), the prompt format as an Ollama ``TEMPLATE``
(Go template syntax). The template is only written when the model's own chat template renders
ChatML exactly, which is checked on a probe conversation; otherwise the Modelfile leaves
``TEMPLATE`` out and Ollama falls back to the chat template inside the GGUF.
"""

from __future__ import annotations

from pathlib import Path

from chatft.data.render import apply_template

#: ChatML in Ollama's Go templates: the system prompt (the Modelfile's SYSTEM, or the
#: request's), then every user/assistant message, then the opening of the assistant's turn.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}{{- if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n"
)


def _chatml(system: str, user: str, assistant: str | None = None) -> str:
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    return text + (f"<|im_start|>assistant\n{assistant}<|im_end|>\n" if assistant is not None
                   else "<|im_start|>assistant\n")


def renders_chatml(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders exactly ChatML (with a system message, a
    finished exchange, and the generation prompt)."""
    s, u, a = "Be brief.", "Hi there", "Hello!"
    msgs = [{"role": "system", "content": s}, {"role": "user", "content": u}]
    try:
        whole = apply_template(tokenizer, msgs + [{"role": "assistant", "content": a}])
        prompt = apply_template(tokenizer, msgs, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - any template failure just means "not ChatML"
        return False
    return whole == _chatml(s, u, a) and prompt == _chatml(s, u)


def default_system(tokenizer) -> str | None:
    """The system prompt a ChatML template inserts when a conversation has none."""
    text = apply_template(tokenizer, [{"role": "user", "content": "x"}])
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head):text.index("<|im_end|>")]
    return None


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (which the value itself must not contain)."""
    return '"""' + text.replace('"""', '" " "') + '"""'


def modelfile_text(gguf_name: str, *, chatml: bool, system: str | None, eot_token: str) -> str:
    lines = [f"# Ollama: ollama create NAME -f {Path(gguf_name).stem}.Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}"]
    if chatml:
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines.append(f'PARAMETER stop "{eot_token}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, tokenizer, system: str | None, eot_token: str) -> Path:
    """Write ``<gguf stem>.Modelfile`` next to ``gguf_path``; returns its path."""
    chatml = renders_chatml(tokenizer)
    if system is None and chatml:
        system = default_system(tokenizer)
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text(modelfile_text(gguf_path.name, chatml=chatml, system=system,
                                   eot_token=eot_token), encoding="utf-8")
    return path
