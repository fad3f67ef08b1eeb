"""A checkpoint's manifest: every file's size and checksum, written last, checked on load.

Writing: once every process has written its files, each one hashes a share of the folder's
files (:func:`share`: the largest files first, each to the process with the least bytes so
far), forcing each to the disk as it goes, and writes its part; process 0 merges the parts
into ``MANIFEST.json`` (:func:`merge`). So hashing a 120 GB checkpoint on 8 processes costs
each of them one eighth, read back from the page cache right after the write.

Reading: :func:`verify` checks that every listed file exists with its size, and the checksums
of this process's share; every problem names the file, what the manifest expected and what was
found. Sizes alone catch truncation at once; checksums catch overwritten bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from chatft.integrity.checksum import ALGORITHM, file_digest
from chatft.integrity.disk import fsync_dir, write_durable

MANIFEST = "MANIFEST.json"
_PART = ".manifest-part-"


@dataclass(frozen=True)
class Problem:
    """One file that does not match the manifest."""

    file: str  # path relative to the checkpoint folder
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.file}: expected {self.expected}, found {self.found}"


def data_files(folder: str | Path) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every file under ``folder`` except the manifest and its
    parts, sorted by path."""
    root = Path(folder)
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name == MANIFEST or name.startswith(_PART):
                continue
            path = Path(dirpath) / name
            out.append((path.relative_to(root).as_posix(), path.stat().st_size))
    return sorted(out)


def share(files: list[tuple[str, int]], rank: int, world: int) -> list[str]:
    """The files process ``rank`` of ``world`` hashes: largest first, each to the process with
    the fewest bytes so far (ties: the lower rank). Every process computes the same split."""
    load = [0] * world
    mine = []
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        who = min(range(world), key=lambda r: (load[r], r))
        load[who] += size
        if who == rank:
            mine.append(name)
    return mine


def hash_share(folder: str | Path, rank: int, world: int) -> None:
    """Hash (and fsync) this process's share of ``folder``; write it as a part for
    :func:`merge`."""
    root = Path(folder)
    entries = {}
    for name in share(data_files(root), rank, world):
        size, digest = file_digest(root / name, fsync=True)
        entries[name] = {"size": size, ALGORITHM: digest}
    write_durable(root / f"{_PART}{rank:05d}.json", json.dumps(entries))


def merge(folder: str | Path, world: int = 1) -> dict:
    """Process 0, after every process ran :func:`hash_share` (or none did, with ``world`` 1):
    write ``MANIFEST.json`` from the parts plus whatever they do not cover (files process 0
    wrote since, hashed here), delete the parts, and put every directory of ``folder`` on the
    disk. Returns the manifest."""
    root = Path(folder)
    files: dict[str, dict] = {}
    for rank in range(world):
        part = root / f"{_PART}{rank:05d}.json"
        if part.is_file():
            files.update(json.loads(part.read_text(encoding="utf-8")))
            part.unlink()
    listed = data_files(root)
    for name, _ in listed:
        if name not in files:
            size, digest = file_digest(root / name, fsync=True)
            files[name] = {"size": size, ALGORITHM: digest}
    names = {name for name, _ in listed}
    manifest = {"algorithm": ALGORITHM,
                "total_bytes": sum(f["size"] for n, f in files.items() if n in names),
                "files": {n: f for n, f in sorted(files.items()) if n in names}}
    write_durable(root / MANIFEST, json.dumps(manifest, indent=1))
    for dirpath, _, _ in os.walk(root):
        fsync_dir(dirpath)
    return manifest


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of ``folder``; None when it has none (written before manifests existed)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files'")
        return manifest
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {"files": {}, "unreadable": True}


def verify(folder: str | Path, rank: int = 0, world: int = 1) -> list[Problem]:
    """Problems of ``folder`` against its manifest: sizes of every file, checksums of this
    process's share (all of them with ``world`` 1). Every process checks every size, but only
    process 0 returns size problems (each is reported once); checksum problems come from the
    process that hashed the file. Empty when the folder is intact or has no manifest (see
    :func:`read_manifest`)."""
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest is None:
        return []
    if manifest.get("unreadable"):
        return [Problem(MANIFEST, "a JSON manifest", "unreadable content")] if rank == 0 else []
    if manifest.get("algorithm") != ALGORITHM:
        return [Problem(MANIFEST, f"checksums of algorithm {ALGORITHM}",
                        repr(manifest.get("algorithm")))] if rank == 0 else []
    files = manifest["files"]
    problems, intact = [], []
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            problems.append(Problem(name, f"{entry['size']:,} bytes", "no such file"))
        elif (size := path.stat().st_size) != entry["size"]:
            problems.append(Problem(name, f"{entry['size']:,} bytes", f"{size:,} bytes"))
        else:
            intact.append((name, size))
    if rank != 0:
        problems = []
    for name in share(intact, rank, world):
        _, digest = file_digest(root / name)
        if digest != files[name][ALGORITHM]:
            problems.append(Problem(name, f"{ALGORITHM} {files[name][ALGORITHM]}",
                                    f"{ALGORITHM} {digest} (same size, different bytes)"))
    return problems
