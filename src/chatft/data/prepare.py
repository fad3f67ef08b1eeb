"""Data step: file -> conversations -> rendered samples -> length policy -> tokenized dataset.

The result is cached on disk by a hash of everything that can change it (the data file's
bytes, the tokenizer, its chat template, the options), so a re-run is instant and a changed
input can never be served stale. Nothing is dropped silently: :class:`Summary` counts every
sample read, kept, truncated and dropped, by reason.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from chatft.config import DataArgs
from chatft.data.formats import load_conversations
from chatft.data.labels import trained_count
from chatft.data.render import ChatFormat, Rendered, chat_format, render_many
from chatft.errors import DataError, TemplateError

CACHE_VERSION = 1  # bump when the on-disk layout or the rendering rules change
BUILTIN_PREFIX = "builtin:"


def resolve_data_path(path: str) -> Path:
    """A real file path for ``path``; ``builtin:NAME`` is a dataset shipped in the package."""
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        res = resources.files("chatft.data") / "assets" / f"{name}.jsonl"
        if not res.is_file():
            raise DataError(f"no built-in dataset named {name!r}", file=path)
        return Path(str(res))
    return Path(path)


#: The fields of :class:`~chatft.config.DataArgs` that change the tokenized result; the other
#: ones (the files, the split, packing, the cache folder) do not.
TOKENIZING_FIELDS = ("format", "system", "train_on", "max_length", "overlong", "skip_bad",
                     "verify_labels")


class DataOptions(dataclasses.make_dataclass(
        "_TokenizingFields", [(f.name, f.type, field(default=f.default))
                              for f in dataclasses.fields(DataArgs) if f.name in TOKENIZING_FIELDS])):
    """The options that change the tokenized result, all part of the cache key: the
    :data:`TOKENIZING_FIELDS` of ``DataArgs``, with its types, defaults and documentation
    (declared there only), and the system prompt resolved (:func:`system_prompt`)."""

    @classmethod
    def from_config(cls, data_args: DataArgs) -> "DataOptions":
        opts = cls(**{k: getattr(data_args, k) for k in TOKENIZING_FIELDS})
        opts.system = system_prompt(data_args)
        return opts


def builtin_meta(path: str) -> dict:
    """What a built-in dataset was written for (``assets/NAME.meta.json``): its system
    prompt (``system``) and a question it teaches (``ask``, printed after training)."""
    if not path.startswith(BUILTIN_PREFIX):
        return {}
    res = resources.files("chatft.data") / "assets" / f"{path[len(BUILTIN_PREFIX):]}.meta.json"
    return json.loads(res.read_text(encoding="utf-8")) if res.is_file() else {}


def builtin_system(path: str) -> str | None:
    return builtin_meta(path).get("system")


def system_prompt(data_args: DataArgs) -> str | None:
    """The system prompt for records that carry none, and the one saved with the exported
    model: ``data.system``, else the built-in dataset's own (None for a file)."""
    return data_args.system if data_args.system is not None else builtin_system(data_args.path)


@dataclass
class Summary:
    """What happened to every record of a data file."""

    file: str
    format: str
    records: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    length_min: int = 0
    length_mean: float = 0.0
    length_p50: int = 0
    length_p95: int = 0
    length_max: int = 0
    bad_examples: list[str] = field(default_factory=list)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def lines(self) -> list[str]:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        out = [
            f"data:      {self.file} ({self.format})",
            f"samples:   {self.records} read, {self.kept} kept, {sum(self.dropped.values())} "
            f"dropped ({dropped}), {self.truncated} truncated",
            f"tokens:    {self.tokens:,} total, {self.trained_tokens:,} trained "
            f"({100 * self.trained_fraction:.1f}%)",
            f"length:    min {self.length_min}, mean {self.length_mean:.1f}, p50 "
            f"{self.length_p50}, p95 {self.length_p95}, max {self.length_max}",
        ]
        out += [f"skipped:   {e}" for e in self.bad_examples]
        return out


@dataclass
class TokenizedDataset:
    """Samples stored flat: sample ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray  # int32 [total_tokens]
    loss_mask: np.ndarray  # bool  [total_tokens]
    offsets: np.ndarray  # int64 [n_samples + 1]
    record_index: np.ndarray  # int64 [n_samples], index of the source record
    summary: Summary

    def __len__(self) -> int:
        return len(self.record_index)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.loss_mask[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, keep: np.ndarray) -> "TokenizedDataset":
        """The samples where ``keep`` (bool per sample) is True; summary is shared."""
        idx = np.flatnonzero(keep)
        parts = [self.sample(i) for i in idx]
        lengths = np.array([len(p[0]) for p in parts], dtype=np.int64)
        return TokenizedDataset(
            np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32),
            np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, bool),
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.record_index[idx], self.summary)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", input_ids=self.input_ids, loss_mask=self.loss_mask,
                 offsets=self.offsets, record_index=self.record_index)
        (folder / "summary.json").write_text(json.dumps(asdict(self.summary), ensure_ascii=False,
                                                        indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "TokenizedDataset":
        with np.load(folder / "data.npz") as z:
            arrays = {k: z[k] for k in z.files}
        summary = Summary(**json.loads((folder / "summary.json").read_text(encoding="utf-8")))
        return cls(summary=summary, **arrays)


def apply_length_policy(samples: list[Rendered], max_length: int, overlong: str,
                        summary: Summary) -> list[Rendered]:
    """Drop or truncate over-long samples, drop samples with no target; count everything."""
    kept = []
    for s in samples:
        cut = len(s) > max_length
        if cut:
            if overlong == "drop":
                summary.dropped["too_long"] = summary.dropped.get("too_long", 0) + 1
                continue
            s = Rendered(s.input_ids[:max_length], s.loss_mask[:max_length], s.index)
        if trained_count(np.asarray(s.loss_mask)) == 0:
            # e.g. truncation cut off every assistant token: dropped, not counted as truncated,
            # so read == kept + dropped and truncated counts only samples that are kept.
            summary.dropped["no_trained_tokens"] = summary.dropped.get("no_trained_tokens", 0) + 1
            continue
        summary.truncated += cut
        kept.append(s)
    return kept


def tokenize_file(path: str, fmt: ChatFormat, opts: DataOptions) -> TokenizedDataset:
    """The uncached data step for one file."""
    loaded = load_conversations(resolve_data_path(path), opts.format, system=opts.system,
                                skip_bad=opts.skip_bad)
    summary = Summary(file=path, format=loaded.format, records=loaded.records)
    if loaded.skipped:
        summary.dropped["bad_record"] = len(loaded.skipped)
        summary.bad_examples = [str(e) for e in loaded.skipped[:5]]
    mismatched: list[str] = []

    def skip(conv, error: TemplateError) -> None:  # --skip-bad: counted, first ones shown
        mismatched.append(f"{path}: {error}")

    try:
        rendered = render_many(loaded.conversations, fmt, opts.train_on,  # type: ignore[arg-type]
                               opts.verify_labels, on_error=skip if opts.skip_bad else None)
    except TemplateError as e:
        raise TemplateError(f"{path}: {e} (--skip-bad leaves such records out and counts "
                            "them)") from None
    if mismatched:
        summary.dropped["template_mismatch"] = len(mismatched)
        summary.bad_examples += mismatched[:max(0, 5 - len(summary.bad_examples))]
    kept = apply_length_policy(rendered, opts.max_length, opts.overlong, summary)
    if not kept:
        raise DataError(f"no sample survived preparation ({summary.dropped}); raise "
                        "max_length or use overlong truncate", file=path)
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int32) for s in kept])
    mask = np.concatenate([np.asarray(s.loss_mask, dtype=bool) for s in kept])
    summary.kept = len(kept)
    summary.tokens = int(lengths.sum())
    summary.trained_tokens = sum(trained_count(np.asarray(s.loss_mask)) for s in kept)
    summary.length_min, summary.length_max = int(lengths.min()), int(lengths.max())
    summary.length_mean = float(lengths.mean())
    summary.length_p50 = int(np.percentile(lengths, 50, method="nearest"))
    summary.length_p95 = int(np.percentile(lengths, 95, method="nearest"))
    return TokenizedDataset(ids, mask, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                            np.array([s.index for s in kept], dtype=np.int64), summary)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of everything in a tokenizer that can change ids: vocab, merges, normalizer,
    pre-tokenizer, special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    h.update(repr(sorted(tokenizer.all_special_tokens)).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def cache_root(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("CHATFT_DATA_CACHE"):
        return Path(os.environ["CHATFT_DATA_CACHE"])
    return Path(os.environ.get("CHATFT_CACHE", Path.home() / ".cache" / "chatft")) / "data"


def cache_key(path: str, tokenizer, opts: DataOptions) -> str:
    h = hashlib.sha256()
    h.update(f"chatft-data-v{CACHE_VERSION}".encode())
    with open(resolve_data_path(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(tokenizer_fingerprint(tokenizer).encode())
    h.update(json.dumps(asdict(opts), sort_keys=True).encode())
    return h.hexdigest()[:24]


def prepare(path: str, tokenizer, opts: DataOptions, cache_dir: str | None = None,
            fmt: ChatFormat | None = None,
            cached_only: bool = False) -> tuple[TokenizedDataset, Path, bool]:
    """Tokenized dataset for ``path``: from the cache when the key matches, else built and
    stored. Returns ``(dataset, cache_folder, was_cached)``.

    Processes that prepare the same file at once (the training processes of a node started
    by torchrun or srun) take turns on a lock file next to the entry: one tokenizes, the
    others then read its result. ``cached_only``: a missing entry is an error (a training
    process whose launcher prepared the data must find it, not tokenize again)."""
    resolved = resolve_data_path(path)
    if not resolved.is_file():
        raise DataError("file not found", file=path)
    folder = cache_root(cache_dir) / cache_key(path, tokenizer, opts)
    if (folder / "data.npz").is_file():
        return _load_cached(folder, path), folder, True
    if cached_only:
        raise DataError(f"the prepared (tokenized) data is not in the cache: {folder} does not "
                        "exist here. `chatft train` prepared it before starting this process; "
                        "both must see the same cache folder (data.cache_dir, $CHATFT_DATA_CACHE "
                        "or ~/.cache/chatft/data)", file=path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # no flock on this file system: the atomic rename below suffices
            pass
        if (folder / "data.npz").is_file():  # another process built it while we waited
            return _load_cached(folder, path), folder, True
        ds = tokenize_file(path, fmt or chat_format(tokenizer), opts)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        ds.save(tmp)
        try:
            os.replace(tmp, folder)  # atomic: a reader sees all of it or none
        except OSError:  # another process won the race with the same content
            shutil.rmtree(tmp, ignore_errors=True)
    return ds, folder, False


def _load_cached(folder: Path, path: str) -> TokenizedDataset:
    ds = TokenizedDataset.load(folder)
    ds.summary.file = path  # the key holds the file's bytes, not its name
    return ds


def split_eval(ds: TokenizedDataset, eval_ratio: float) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Hold out records with index % n == n - 1, n = round(1 / eval_ratio)."""
    if eval_ratio <= 0:
        return ds, None
    n = max(2, round(1 / eval_ratio))
    held = ds.record_index % n == n - 1
    return ds.subset(~held), ds.subset(held)
