"""The weight files of a model folder: found, and checked to be whole, before anything loads.

A missing shard or a truncated ``.safetensors`` (an interrupted download or copy) otherwise
surfaces as transformers' ``OSError`` or a ``SafetensorError`` traceback; here it is one
:class:`~chatft.errors.ChatftError` naming the file. A safetensors file is an 8-byte header
length, a JSON header whose ``data_offsets`` locate every tensor, then the tensor bytes, so
its complete size is known from the header alone: the check reads a few kilobytes per file.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatft.errors import ChatftError


def weight_files(folder: str | Path) -> list[Path]:
    """The weight shards of ``folder`` in reading order: from the index json when there is
    one, else a single ``model.safetensors`` / ``pytorch_model.bin``, else the numbered
    shards. safetensors is preferred when both formats are present."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ChatftError(f"{index}: not a weight index (no 'weight_map')") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ChatftError(f"{index} lists shards that are missing: {', '.join(missing)} "
                              "(an interrupted download?)")
        return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("model-*.safetensors", "pytorch_model-*.bin"):
        shards = sorted(folder.glob(pattern))
        if shards:
            return shards
    raise ChatftError(f"{folder}: no weights (model*.safetensors or pytorch_model*.bin)")


def check_safetensors(path: str | Path) -> None:
    """Raise a :class:`ChatftError` naming ``path`` unless its size is what its header says."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ChatftError(f"{path}: truncated: {size:,} bytes, too short for its safetensors "
                              f"header; copy or download it again")
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ChatftError(f"{path}: damaged: its safetensors header is not valid; copy or "
                              f"download it again") from None
    if 8 + n + end != size:
        raise ChatftError(f"{path}: {'truncated' if size < 8 + n + end else 'damaged'}: its "
                          f"header describes {8 + n + end:,} bytes, the file has {size:,}; copy "
                          f"or download it again")


def check_weights(folder: str | Path) -> list[Path]:
    """:func:`weight_files` of ``folder``, each safetensors file checked to be whole."""
    files = weight_files(folder)
    for path in files:
        if path.suffix == ".safetensors":
            check_safetensors(path)
    return files
