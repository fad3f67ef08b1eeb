"""Loading pickled checkpoint files without running code from them.

``torch.load(..., weights_only=False)`` runs whatever a pickle asks for: a crafted
``engine_state.pt`` can call ``os.system``. chatft loads its own files with
``weights_only=True`` (they hold only tensors, numbers, strings, lists and dicts). DeepSpeed's
files also pickle a few of DeepSpeed's own classes (:data:`DEEPSPEED_GLOBALS`, found by saving
real ZeRO-0/2/3 checkpoints, with and without CPU offload, and by reading DeepSpeed's optimizer
``state_dict`` code for fp16's loss scaler); they go through DeepSpeed's loader inside
:func:`deepspeed_loading`, which first scans every file and then forces every ``torch.load``
to ``weights_only`` with exactly that allow-list.

The scan (:func:`scan`) reads the pickle's opcodes without executing any of them and names
the first global it refuses, so a refused file is reported as file + global, and nothing from
it ran.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from chatft.errors import ChatftError

#: Classes DeepSpeed pickles into its checkpoint files besides what torch allows by default:
#: the ZeRO optimizers' loss scaler (static in fp32/bf16, dynamic in fp16), its ZeRO stage
#: enum, and the fragment addresses of ZeRO-1/2's parameter map.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(ChatftError):
    """A checkpoint file pickles something that is not data: loading it could run code."""


class DamagedCheckpointError(ChatftError):
    """A checkpoint file cannot be read at all (truncated, overwritten, not a torch file)."""


def scan(path: str | Path, allowed: Iterable[str] = ()) -> None:
    """Refuse ``path`` if its pickle names a global beyond torch's safe set and ``allowed``.
    Reads the opcodes only; nothing is executed."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to parse means an unreadable file
        raise DamagedCheckpointError(f"{path}: not a readable torch checkpoint file (truncated "
                                     f"or damaged?): {_first_line(e)}") from None
    refused = sorted(set(found) - set(allowed))
    if refused:
        raise UnsafeCheckpointError(
            f"{path}: refused to load: its pickle calls {', '.join(refused)}, which no chatft or "
            f"DeepSpeed checkpoint contains; loading it could run code, so nothing from it was "
            f"executed. Use checkpoints you wrote yourself (or delete this one)")


def load_data(path: str | Path, map_location: Any = "cpu") -> Any:
    """A file chatft wrote: scanned, then loaded with ``weights_only=True``."""
    scan(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path}: refused to load: {_first_line(e)}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise DamagedCheckpointError(f"{path}: cannot be read (truncated or damaged?): "
                                     f"{_first_line(e)}") from None


def _deepspeed_classes() -> list[Any]:
    import importlib

    out = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: not pickled there
            continue
    return out


@contextmanager
def deepspeed_loading(files: Iterable[str | Path]) -> Iterator[None]:
    """Scan ``files`` (DeepSpeed's checkpoint files) with :data:`DEEPSPEED_GLOBALS` allowed,
    then, inside the block, force every ``torch.load`` (DeepSpeed's own calls included) to
    ``weights_only=True`` with those classes allowed. A refusal inside the block becomes an
    :class:`UnsafeCheckpointError`."""
    for f in files:
        scan(f, DEEPSPEED_GLOBALS)
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD",
                                                   "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refused to load a DeepSpeed checkpoint file: "
                                    f"{_first_line(e)}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
