"""The data step as the CLI (and the trainer) call it: tokenizer + data options -> datasets."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from chatft.config import DataArgs, ModelArgs
from chatft.data.formats import load_conversations
from chatft.data.inspect import colour_sample, legend
from chatft.data.prepare import DataOptions, TokenizedDataset, prepare, resolve_data_path, split_eval
from chatft.data.render import chat_format, render_many
from chatft.model.loading import load_tokenizer, resolve_model


@dataclass
class PreparedData:
    train: TokenizedDataset
    eval: TokenizedDataset | None
    folder: Path  # cache folder of the training file
    cached: bool


def tokenizer_for(model: ModelArgs):
    return load_tokenizer(resolve_model(model.name_or_path), model.tokenizer)


def prepare_data(data: DataArgs, tokenizer, cached_only: bool = False) -> PreparedData:
    """Tokenize (or load from cache) the training file and the held-out data; with
    ``cached_only``, data missing from the cache is an error (see ``prepare``)."""
    opts = DataOptions.from_config(data)
    fmt = chat_format(tokenizer)
    ds, folder, cached = prepare(data.path, tokenizer, opts, data.cache_dir, fmt, cached_only)
    if data.eval_file:
        held, _, _ = prepare(data.eval_file, tokenizer, opts, data.cache_dir, fmt, cached_only)
        return PreparedData(ds, held, folder, cached)
    train, held = split_eval(ds, data.eval_ratio)
    return PreparedData(train, held, folder, cached)


def print_summary(data: PreparedData, out=sys.stdout) -> None:
    for line in data.train.summary.lines():
        print(line, file=out)
    if data.eval is not None:
        print(f"split:     {len(data.train)} train samples, {len(data.eval)} held out", file=out)
    print(f"cache:     {data.folder}{' (reused)' if data.cached else ''}", file=out)


def inspect(data: DataArgs, tokenizer, indices: list[int], colour: bool, out=sys.stdout) -> None:
    """Print the chosen records token by token, then the summary of the whole file."""
    fmt = chat_format(tokenizer)
    opts = DataOptions.from_config(data)  # as prepare_data sees them (built-in system prompt)
    loaded = load_conversations(resolve_data_path(data.path), opts.format,
                                system=opts.system, skip_bad=opts.skip_bad)
    by_index = {c.index: c for c in loaded.conversations}
    chosen = [by_index[i] for i in indices if i in by_index]
    missing = [i for i in indices if i not in by_index]
    print(legend(colour), file=out)
    for conv, sample in zip(chosen, render_many(chosen, fmt, opts.train_on,  # type: ignore
                                                opts.verify_labels)):
        n_trained = sum(sample.loss_mask)
        print(f"\n--- record {conv.index}: {len(sample)} tokens, {n_trained} trained", file=out)
        print(colour_sample(conv, sample, fmt, colour), file=out)
    for i in missing:
        print(f"\n--- record {i}: not available (out of range or skipped as bad)", file=out)
    print(file=out)
    print_summary(prepare_data(data, tokenizer), out)
