"""Load a model and generate answers; shared by ``chatft chat``, ``chatft serve`` and
``chatft eval`` (and usable from training code on a model already in memory). The model is an
exported folder or anything training starts from (GGUF file, Qwen-1 folder, built-in name).

Prompts are formatted exactly as training did: the tokenizer's own chat template through
:func:`chatft.data.render.chat_format`, with the folder's default system prompt
(``chatft.json``) when a conversation brings none. Generation stops on the template's
end-of-turn token, the tokenizer's eos and every eos id of ``generation_config.json``.

Interface::

    cm = load_chat_model("runs/x/export")                      # ChatModel
    print(reply(cm, [{"role": "user", "content": "Hi"}]).text)  # greedy by default
    for ev in stream_reply(cm, messages, SamplingParams(temperature=0.7, max_new_tokens=200)):
        print(ev.text, end="", flush=True)

    cm = ChatModel.wrap(model, tokenizer, system_prompt="...")   # a model already in memory
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence as Seq

import torch

from chatft.data.render import ChatFormat, chat_format
from chatft.errors import ChatftError
from chatft.export.metadata import read_meta
from chatft.serve.batch import DecodeBatch, Event, SamplingParams, Sequence
from chatft.serve.detok import TextStream

__all__ = ["ChatModel", "Event", "Reply", "SamplingParams", "load_chat_model", "reply",
           "stream_reply"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ChatModel:
    """A causal LM with everything needed to format prompts and stop answers."""

    model: torch.nn.Module
    tokenizer: object
    fmt: ChatFormat
    name: str
    """Model id shown by the API (the folder's name)."""

    system_prompt: str | None
    """Default persona: used when a conversation has no system message."""

    stop_ids: frozenset[int]
    """End-of-turn and eos token ids: generation stops when one is sampled."""

    max_context: int
    """Positions the model supports (prompt + answer)."""

    default_temperature: float = 0.7
    default_top_p: float = 0.9
    """Sampling used when a caller asks for none: generation_config.json's when it samples."""

    _encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Fast tokenizers can fail ("Already borrowed") when one instance encodes on several
    threads at once, as the server's executor threads would."""

    @classmethod
    def wrap(cls, model, tokenizer, system_prompt: str | None = None, name: str = "model",
             extra_stop_tokens: Seq[str] = ()) -> "ChatModel":
        """Build from a model and tokenizer already loaded (e.g. right after training).

        Puts ``model`` in eval mode (no dropout while generating); a caller that goes on
        training calls ``model.train()`` afterwards. The model must hold its full weights
        (not ZeRO-3 partitions)."""
        fmt = chat_format(tokenizer)
        stops = {fmt.eot_id}
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None:
            stops.add(int(eos))
        gen = getattr(model, "generation_config", None)
        gen_eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        stops.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        for tok in extra_stop_tokens:
            if tok not in vocab:
                raise ChatftError(f"{name}: end-of-turn token {tok!r} is not in the tokenizer's "
                                  "vocabulary")
            stops.add(vocab[tok])
        cfg = model.config.get_text_config()
        max_context = getattr(cfg, "max_position_embeddings", None) or \
            getattr(tokenizer, "model_max_length", None) or 2048
        temperature, top_p = 0.7, 0.9
        if gen is not None and getattr(gen, "do_sample", False):
            temperature = float(gen.temperature if gen.temperature is not None else 1.0)
            top_p = float(gen.top_p if gen.top_p is not None else 1.0)
        model.eval()
        return cls(model=model, tokenizer=tokenizer, fmt=fmt, name=name,
                   system_prompt=system_prompt, stop_ids=frozenset(stops),
                   max_context=int(max_context), default_temperature=temperature,
                   default_top_p=top_p)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def conversation(self, messages: Seq[dict], system: str | None = None) -> list[dict]:
        """``messages`` with the persona applied: ``system`` (if given) replaces any system
        message; otherwise a conversation without one gets the default system prompt."""
        msgs = [dict(m) for m in messages]
        has_system = bool(msgs) and msgs[0].get("role") == "system"
        if system is not None:
            msgs = ([{"role": "system", "content": system}] +
                    (msgs[1:] if has_system else msgs))
        elif not has_system and self.system_prompt is not None:
            msgs = [{"role": "system", "content": self.system_prompt}] + msgs
        return msgs

    def prompt_ids(self, messages: Seq[dict], system: str | None = None) -> list[int]:
        """Token ids of the conversation ready for the assistant's answer."""
        msgs = self.conversation(messages, system)
        with self._encode_lock:
            return self.fmt.prompt_ids(msgs)

    def sequence(self, prompt_ids: list[int], params: SamplingParams, sink) -> Sequence:
        """A :class:`Sequence` for a batch (``sink`` receives its events)."""
        if len(prompt_ids) >= self.max_context:
            raise ChatftError(f"the conversation is {len(prompt_ids)} tokens; the model's context "
                              f"is {self.max_context}, leaving no room for an answer")
        return Sequence(prompt_ids=list(prompt_ids), params=params, sink=sink,
                        stream=TextStream(self.tokenizer, params.stop),
                        stop_ids=self.stop_ids, max_position=self.max_context)

    def new_batch(self) -> DecodeBatch:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return DecodeBatch(self.model, pad if pad is not None else self.fmt.eot_id)

    def sampling(self, temperature: float | None = None, top_p: float | None = None,
                 **kw) -> SamplingParams:
        """SamplingParams with the model's defaults for what is not given."""
        return SamplingParams(
            temperature=self.default_temperature if temperature is None else temperature,
            top_p=self.default_top_p if top_p is None else top_p, **kw)


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        built = "with" if torch.version.cuda else "without"
        raise ChatftError(f"--device {device}: no CUDA GPU is available (torch "
                          f"{torch.__version__}, built {built} CUDA)")
    return torch.device(device)


def _is_model_folder(path: Path) -> str | None:
    """Why ``path`` is not a model folder chat/serve can load, or None if it is."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder (expected an exported model folder)"
    if not (path / "config.json").is_file():
        return "has no config.json; not a Hugging Face model folder"
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"has an unreadable config.json ({e})"
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return "has no tokenizer files (tokenizer.json); export saves them with the model"
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return "has no weights (*.safetensors)"
    return None


def load_chat_model(folder: str | Path, device: str = "auto", dtype: str = "auto") -> ChatModel:
    """Load a model for generation: an exported folder (or any Hugging Face chat model folder),
    or anything ``chatft train --model`` takes: a ``.gguf`` file, a Qwen-1 folder, the
    embedded default's name. So a user can talk to the base model before fine-tuning it.

    ``dtype`` "auto": float32 on CPU (bf16 matmuls are slow on most CPUs), bfloat16 on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatft.config import DEFAULT_MODEL
    from chatft.model.loading import resolve_model

    path = Path(folder).expanduser()
    dev = resolve_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ChatftError(f"--dtype {dtype}: expected auto, {', '.join(_DTYPES)}")
    if str(folder) == DEFAULT_MODEL or path.suffix == ".gguf" or (path / "config.json").is_file():
        source = resolve_model(str(folder))  # a clear error for a missing or odd model
        if source.kind != "hf":  # GGUF file or Qwen-1 folder: weights converted on load
            return _load_source(source, dev, torch_dtype)
        path = source.folder  # the embedded default: its dequantized folder
    problem = _is_model_folder(path)
    if problem:
        raise ChatftError(f"{folder} {problem}")
    meta = read_meta(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise ChatftError(f"{folder}: cannot load the model: {e}") from None
    model.to(dev)
    return ChatModel.wrap(model, tokenizer, system_prompt=meta.system_prompt if meta else None,
                          name=path.resolve().name,
                          extra_stop_tokens=[meta.eot_token] if meta and meta.eot_token else [])


def _load_source(source, device: torch.device, dtype: torch.dtype) -> ChatModel:
    """A GGUF file or Qwen-1 folder, loaded as training loads it (same tokenizer and chat
    template); no persona of its own."""
    from chatft.model.build import load_pretrained
    from chatft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(source)
    model = load_pretrained(source, dtype=dtype, attn_implementation="sdpa").to(device)
    name = Path(source.gguf_file).stem if source.gguf_file else source.folder.resolve().name
    return ChatModel.wrap(model, tokenizer, name=name)


def stream_reply(cm: ChatModel, messages: Seq[dict], params: SamplingParams | None = None,
                 system: str | None = None) -> Iterator[Event]:
    """Generate one answer in the calling thread, yielding :class:`Event` s as text arrives;
    the last event carries ``finish_reason``. Greedy unless ``params`` says otherwise."""
    events: list[Event] = []
    seq = cm.sequence(cm.prompt_ids(messages, system), params or SamplingParams(), events.append)
    batch = cm.new_batch()
    try:
        batch.admit([seq])
        while True:
            yield from events
            events.clear()
            if seq.finish_reason is not None:
                return
            batch.step()
    finally:
        # The caller stopped early (Ctrl-C, break): drop the cache now.
        seq.cancel()
        batch.drop_finished()


def reply(cm: ChatModel, messages: Seq[dict], params: SamplingParams | None = None,
          system: str | None = None) -> Reply:
    """The whole answer at once (greedy unless ``params`` says otherwise)."""
    parts: list[str] = []
    last = Event()
    for ev in stream_reply(cm, messages, params, system):
        parts.append(ev.text)
        last = ev
    return Reply("".join(parts), last.finish_reason or "stop", last.prompt_tokens,
                 last.completion_tokens)
