"""Batched generation with a KV cache that sequences can join and leave between steps.

A :class:`DecodeBatch` holds the running sequences as rows of one left-padded batch::

    column:      0 ...          T-1 | T (next token)
    row 0:   pad pad p p p g g g    |  x
    row 1:   p p p p p p p g g g    |  x

``T`` is the cache length. Row ``i`` has ``pad[i]`` padding columns on the left, so its next
token sits at position ``T - pad[i]`` and every row writes its next K/V into column ``T``:
one forward pass of shape ``[B, 1]`` advances all rows. Padding columns hold zeros in the
cache (never uninitialized memory: a masked NaN would still poison attention through
``0 * NaN``) and are masked out.

* New sequences are prefilled together (left-padded to their longest prompt) into a cache of
  their own, then merged: both caches are left-padded to the longer one and concatenated on
  the batch axis. This is continuous batching at step granularity: a request waits at most
  one decode step before its prefill starts.
* Finished or cancelled rows are removed between steps, and padding columns that no
  remaining row needs are dropped then, so one long answer does not keep the cache wide.
* K/V live in preallocated buffers that grow in chunks (:class:`SlabLayer`); a decode step
  writes one column instead of concatenating (copying) the whole cache as transformers'
  DynamicCache does.

Sampling is per row (temperature, top-p), vectorised over the batch; each sequence draws its
random numbers from its own ``torch.Generator``, one draw per sampled token, so the draws do
not depend on what else is in the batch (see :func:`sample_next`).
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence as Seq

import torch
from transformers.cache_utils import Cache, DynamicLayer

from chatft.serve.detok import TextStream

_GROW = 256  # cache columns added at a time


@dataclass(frozen=True)
class SamplingParams:
    """How one answer is generated."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens (the end-of-turn token not counted in the text)."""

    temperature: float = 0.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""

    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches it."""

    top_k: int = 0
    """Sample only among the k most likely tokens (0 = no limit; greedy is unaffected)."""

    repetition_penalty: float = 1.0
    """> 1 makes every token already in the prompt or the answer less likely (a positive logit
    is divided by it, a negative one multiplied), greedy included; 1 = off."""

    seed: int | None = None
    """Seeds this answer's own random generator; None = a fresh random seed."""

    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one; it is cut from the text."""

    ignore_eos: bool = False
    """Keep generating past the end-of-turn/eos tokens (benchmarks: fixed-length answers)."""


@dataclass
class Event:
    """What a sequence reports to its owner: new text, and once, how it finished."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


Sink = Callable[[Event], None]


@dataclass(eq=False)
class Sequence:
    """One answer being generated. ``sink`` receives its :class:`Event` s, called from the
    thread that runs the batch."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    stream: TextStream
    stop_ids: frozenset[int]
    max_position: int
    """Positions available to this sequence (the model's context length)."""

    generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator = field(default_factory=torch.Generator)
    seen: set[int] = field(default_factory=set)
    """Tokens of the prompt and the answer so far (kept only for a repetition penalty)."""

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator.manual_seed(seed)
        if self.params.repetition_penalty != 1.0:
            self.seen.update(self.prompt_ids)

    def cancel(self) -> None:
        """Ask for removal; the batch drops the row before its next step (thread-safe:
        a single attribute store)."""
        self.cancelled = True

    def _emit(self, text: str) -> None:
        if text:
            self.sink(Event(text=text))

    def accept(self, token: int) -> None:
        """Record one sampled token: release its text, decide whether the answer is over."""
        if token in self.stop_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.generated += 1
        if self.params.repetition_penalty != 1.0:
            self.seen.add(token)
        self._emit(self.stream.push(token))
        if self.stream.stopped:
            self.finish("stop")
        elif self.generated >= self.params.max_new_tokens or \
                len(self.prompt_ids) + self.generated >= self.max_position:
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        if reason in ("stop", "length"):
            self._emit(self.stream.finish())
        self.sink(Event(finish_reason=reason, prompt_tokens=len(self.prompt_ids),
                        completion_tokens=self.generated, error=error))


class SlabLayer(DynamicLayer):
    """One layer's K/V, ``[B, kv_heads, capacity, head_dim]`` buffers of which the first
    ``length`` columns are filled; ``keys``/``values`` are views of that part."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        b, h, _, d = key_states.shape
        self._k = key_states.new_zeros(b, h, _GROW, d)
        self._v = value_states.new_zeros(b, h, _GROW, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:
            self._resize(self.length + n + _GROW)
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self._publish()
        return self.keys, self.values

    def _resize(self, capacity: int) -> None:
        k, v = self._k, self._v
        self._k = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
        self._v = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
        self._k[:, :, :self.length] = k[:, :, :self.length]
        self._v[:, :, :self.length] = v[:, :, :self.length]

    def _publish(self) -> None:
        self.keys = self._k[:, :, :self.length]
        self.values = self._v[:, :, :self.length]

    def adopt(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Take ``k``/``v`` (``[B, H, >= length, D]``, columns ``< length`` filled) as buffers."""
        self._k, self._v, self.length = k, v, length
        self.is_initialized = True
        self._publish()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers < 5 passes the query's cache_position tensor instead of its length.
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.length + q, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("DecodeBatch reshapes the cache itself")


def _new_cache(num_layers: int) -> Cache:
    return Cache(layers=[SlabLayer() for _ in range(num_layers)])


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """One row's logits ``[V]`` with the tokens in ``seen`` (ids ``[n]``) made less likely:
    positive logits divided by ``penalty``, negative ones multiplied (the CTRL rule that
    Hugging Face's ``repetition_penalty`` uses). Returns a new tensor."""
    out = logits.clone()
    picked = out[seen]
    out[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return out


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """One row's logits ``[V]`` with all but the ``k`` largest set to -inf (ties at the k-th
    value are kept). Returns a new tensor."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """Pick one token per row.

    ``logits`` ``[B, V]`` (float32); ``temperature``, ``top_p``, ``uniform`` ``[B]``.
    Rows with temperature 0 take the argmax. The others sample by inverse CDF: the token
    whose cumulative probability (in descending-probability order when top-p < 1, else in
    vocabulary order) first exceeds ``uniform * total``. Using one uniform draw per token,
    drawn from the sequence's own generator, is what makes a seeded answer independent of
    its batch neighbours: only the logits themselves can differ, by floating-point noise
    between batch shapes, which changes a token only at a near-tie.
    """
    out = logits.argmax(dim=-1)  # [B]
    sampled = temperature > 0
    if not bool(sampled.any()):
        return out
    rows = sampled.nonzero().squeeze(1)  # [S]
    probs = torch.softmax(logits[rows] / temperature[rows, None], dim=-1)  # [S, V]
    u = uniform[rows, None]  # [S, 1]
    # A row's token depends only on its own logits, knobs and draw: rows with top-p < 1
    # sample in sorted order, the others in vocabulary order (no sort: V is ~150k).
    nucleus = top_p[rows] < 1
    chosen = torch.empty_like(rows)
    if bool(nucleus.any()):
        sorted_p, order = _descending(probs[nucleus], top_p[rows][nucleus])  # [N, K]
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        # Keep tokens until the kept mass reaches top_p (the most likely token always).
        sorted_p = sorted_p.masked_fill(before >= top_p[rows][nucleus, None], 0.0)
        pick = _inverse_cdf(sorted_p, u[nucleus])  # [N, 1]
        chosen[nucleus] = order.gather(-1, pick).squeeze(1)
    if not bool(nucleus.all()):
        chosen[~nucleus] = _inverse_cdf(probs[~nucleus], u[~nucleus]).squeeze(1)
    out[rows] = chosen
    return out


NUCLEUS_CANDIDATES = (1024, 16384)
"""Top-k sizes tried before a full sort when looking for a top-p nucleus."""


def _descending(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely tokens of each row in descending order, ``[N, K]`` values and ids,
    with enough of them to hold the top-p nucleus.

    Sorting a 150k vocabulary costs ~20 ms per row on a CPU, while a trained model's nucleus
    is usually a few dozen tokens: try ``topk`` with growing K and sort in full only the
    rows whose nucleus is still not covered. The nucleus, and so the sampled token, is the
    same whichever K a row ends up with.
    """
    n, v = probs.shape
    todo = torch.arange(n, device=probs.device)
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for k in NUCLEUS_CANDIDATES + (v,):
        k = min(k, v)
        if k == v:
            top, ids = probs[todo].sort(dim=-1, descending=True)
        else:
            top, ids = probs[todo].topk(k, dim=-1)
        covered = (top.sum(dim=-1) >= top_p[todo]) | (k == v)
        if bool(covered.any()):
            results.append((todo[covered], top[covered], ids[covered]))
        todo = todo[~covered]
        if todo.numel() == 0:
            break
    width = max(t.shape[1] for _, t, _ in results)
    vals = probs.new_zeros(n, width)  # zero-probability tail past a row's K is never picked
    order = torch.zeros(n, width, dtype=torch.long, device=probs.device)
    for rows, top, ids in results:
        vals[rows, :top.shape[1]] = top
        order[rows, :ids.shape[1]] = ids
    return vals, order


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index ``[N, 1]`` of the first column whose cumulative weight exceeds ``u`` (``[N, 1]``,
    in [0, 1)) times the row total; zero-weight columns are never picked."""
    cdf = weights.cumsum(dim=-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=cdf.shape[-1] - 1)


class DecodeBatch:
    """The running sequences of one model; see the module docstring for the layout.

    Not thread-safe: one thread calls :meth:`admit` and :meth:`step` (the engine's worker,
    or the caller itself for a single interactive answer).
    """

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_id = pad_id
        self.num_layers = model.config.get_text_config().num_hidden_layers
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache (old name deprecated).
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.seqs: list[Sequence] = []
        self.cache: Cache | None = None
        self.length = 0  # T: filled cache columns
        self.pad = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # [B] token to feed
        self._knobs: tuple[torch.Tensor, torch.Tensor] | None = None  # temperature, top_p [B]

    def __len__(self) -> int:
        return len(self.seqs)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits of each row's last input position, ``[B, V]`` float32."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})
        return out.logits[:, -1, :].float()

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor,
                knobs: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
        temperature, top_p = knobs
        for r, s in enumerate(seqs):  # per-row logit processors, only where asked for
            if s.params.repetition_penalty != 1.0 and s.seen:
                seen = torch.tensor(sorted(s.seen), device=logits.device)
                logits[r] = penalize_repeats(logits[r], seen, s.params.repetition_penalty)
            if s.params.top_k > 0 and s.params.temperature > 0:
                logits[r] = keep_top_k(logits[r], s.params.top_k)
        u = torch.tensor([torch.rand(1, generator=s.generator).item()
                          if s.params.temperature > 0 else 0.0 for s in seqs])
        return sample_next(logits, temperature, top_p, u.to(self.device)).tolist()

    def _knobs_of(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tensor([s.params.temperature for s in seqs], device=self.device)
        p = torch.tensor([s.params.top_p for s in seqs], device=self.device)
        return t, p

    @torch.inference_mode()
    def admit(self, new: Seq[Sequence]) -> None:
        """Prefill ``new`` (one padded forward pass), sample their first tokens and merge
        the ones still running into the batch."""
        for s in new:
            if s.cancelled:
                s.finish("cancelled")
        new = [s for s in new if not s.cancelled]
        if not new:
            return
        lengths = [len(s.prompt_ids) for s in new]
        width = max(lengths)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        for r, s in enumerate(new):
            ids[r, width - lengths[r]:] = torch.tensor(s.prompt_ids)
        pad = torch.tensor([width - n for n in lengths], device=self.device)  # [N]
        cols = torch.arange(width, device=self.device)[None, :]  # [1, width]
        mask = (cols >= pad[:, None]).long()  # [N, width]
        positions = (cols - pad[:, None]).clamp(min=0)  # [N, width]
        cache = _new_cache(self.num_layers)
        logits = self._forward(ids.to(self.device), mask, positions, cache)
        if bool(pad.any()):
            # Padding rows attended to nothing; whatever they computed must not stay in the
            # cache (the module docstring says why zeros).
            padding = ~mask.bool()[:, None, :, None]  # [N, 1, width, 1]
            for layer in cache.layers:
                layer.keys.masked_fill_(padding, 0.0)
                layer.values.masked_fill_(padding, 0.0)
        first = self._sample(new, logits, self._knobs_of(new))
        for s, tok in zip(new, first):
            s.accept(tok)
        alive = [r for r, s in enumerate(new) if s.finish_reason is None]
        if not alive:
            return
        rows = torch.tensor(alive, device=self.device)
        self._merge([new[r] for r in alive], cache, width, pad[rows],
                    torch.tensor([first[r] for r in alive], device=self.device), rows)

    def _merge(self, seqs: list[Sequence], cache: Cache, width: int, pad: torch.Tensor,
               last: torch.Tensor, rows: torch.Tensor) -> None:
        if not self.seqs:
            for layer in cache.layers:
                layer.adopt(layer._k[rows], layer._v[rows], width)
            self.cache, self.length, self.pad, self.last = cache, width, pad, last
        else:
            length = max(self.length, width)
            for mine, theirs in zip(self.cache.layers, cache.layers):
                k = mine._k.new_zeros(len(self.seqs) + len(seqs), mine._k.shape[1],
                                      length + _GROW, mine._k.shape[3])
                v = mine._v.new_zeros(len(self.seqs) + len(seqs), mine._v.shape[1],
                                      length + _GROW, mine._v.shape[3])
                b = len(self.seqs)
                k[:b, :, length - self.length:length] = mine.keys
                v[:b, :, length - self.length:length] = mine.values
                k[b:, :, length - width:length] = theirs._k[rows, :, :width]
                v[b:, :, length - width:length] = theirs._v[rows, :, :width]
                mine.adopt(k, v, length)
            self.pad = torch.cat([self.pad + (length - self.length), pad + (length - width)])
            self.last = torch.cat([self.last, last])
            self.length = length
        self.seqs.extend(seqs)
        self._knobs = None

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled rows, then generate one token for every running sequence."""
        self.drop_finished()
        if not self.seqs:
            return
        if self._knobs is None:
            self._knobs = self._knobs_of(self.seqs)
        cols = torch.arange(self.length + 1, device=self.device)[None, :]
        mask = (cols >= self.pad[:, None]).long()  # [B, T+1]
        positions = (self.length - self.pad)[:, None]  # [B, 1]
        logits = self._forward(self.last[:, None], mask, positions, self.cache)
        self.length += 1
        tokens = self._sample(self.seqs, logits, self._knobs)
        for s, tok in zip(self.seqs, tokens):
            s.accept(tok)
        self.last = torch.tensor(tokens, device=self.device)
        self.drop_finished()

    def drop_finished(self) -> list[Sequence]:
        """Remove finished and cancelled rows (cancelled ones get their final event); drop
        padding columns no remaining row needs. Returns the cancelled sequences removed."""
        cancelled = [s for s in self.seqs if s.cancelled and s.finish_reason is None]
        for s in cancelled:
            s.finish("cancelled")
        keep = [r for r, s in enumerate(self.seqs) if s.finish_reason is None]
        if len(keep) == len(self.seqs):
            return cancelled
        self.seqs = [self.seqs[r] for r in keep]
        self._knobs = None
        if not keep:
            self.cache, self.length = None, 0
            self.pad = self.pad[:0]
            self.last = self.last[:0]
            return cancelled
        rows = torch.tensor(keep, device=self.device)
        self.pad, self.last = self.pad[rows], self.last[rows]
        drop = int(self.pad.min())
        length = self.length - drop
        for layer in self.cache.layers:
            k = layer._k.new_empty(len(keep), layer._k.shape[1], length + _GROW, layer._k.shape[3])
            v = layer._v.new_empty(len(keep), layer._v.shape[1], length + _GROW, layer._v.shape[3])
            k[:, :, :length] = layer.keys[rows, :, drop:]
            v[:, :, :length] = layer.values[rows, :, drop:]
            layer.adopt(k, v, length)
        self.pad -= drop
        self.length = length
        return cancelled

    def fail_all(self, message: str) -> None:
        """Finish every row with an error (the model raised) and empty the batch."""
        for s in self.seqs:
            s.finish("error", message)
        self.seqs = []
        self.cache, self.length, self._knobs = None, 0, None
        self.pad = self.pad[:0]
        self.last = self.last[:0]
