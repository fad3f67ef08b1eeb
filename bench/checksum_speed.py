"""How fast can a checkpoint be checksummed? Candidates for the manifest's checksum, timed on
one file read from the page cache (as right after a save, when each process hashes what it
wrote), against SHA-256 as the reference.

Writes a file of ``--gib`` GiB of random bytes, reads it once to warm the cache, then for each
candidate reads and hashes it ``--repeats`` times (chunks of 16 MiB, ``readinto`` one
buffer) and keeps the best pass. ``read only`` is the same loop without hashing: the floor.
Prints a table and a last line of JSON, and writes
``bench/results/checksum_speed_<label>.json`` with the command, versions and hardware.

    python bench/checksum_speed.py --label cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]  # this checkout's chatft (installed or not), bench.lib

import xxhash  # noqa: E402

from bench.lib import environment  # noqa: E402
from chatft.integrity.checksum import ALGORITHM, CHUNK, file_digest  # noqa: E402

RESULTS = REPO / "bench" / "results"
GB = 1e9


class _Crc:
    """zlib's running CRC-32 with hashlib's update()."""

    def __init__(self, fn):
        self.fn, self.value = fn, fn(b"")

    def update(self, data) -> None:
        self.value = self.fn(data, self.value)


class _Null:
    def update(self, data) -> None:
        pass


CANDIDATES = {
    "read only": _Null,
    "sha256 (hashlib)": hashlib.sha256,
    "sha1 (hashlib)": hashlib.sha1,
    "blake2b (hashlib)": hashlib.blake2b,
    "crc32 (zlib)": lambda: _Crc(zlib.crc32),
    "adler32 (zlib)": lambda: _Crc(zlib.adler32),
    "xxh64 (xxhash)": xxhash.xxh64,
    "xxh3_64 (xxhash)": xxhash.xxh3_64,
    "xxh3_128 (xxhash)": xxhash.xxh3_128,
}
REFERENCE = "sha256 (hashlib)"


def timed_pass(path: Path, make) -> float:
    h = make()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="file size in GiB (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="passes per candidate; best kept")
    p.add_argument("--dir", default=None, help="where the test file goes (default: the temp dir)")
    p.add_argument("--label", default="cpu")
    args = p.parse_args()
    hardware = environment.hardware("cpu")
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            block = os.urandom(64 << 20)
            for off in range(0, size, len(block)):
                f.write(block[:min(len(block), size - off)])
        t0 = time.perf_counter()
        file_digest(path, fsync=True)  # warms the cache; the fsync cost is the disk's
        first_pass = time.perf_counter() - t0
        rows = {}
        for name, make in CANDIDATES.items():
            best = min(timed_pass(path, make) for _ in range(args.repeats))
            rows[name] = {"seconds": round(best, 3), "gb_per_s": round(size / best / GB, 3)}
    ref = rows[REFERENCE]["seconds"]
    for r in rows.values():
        r["speedup_vs_sha256"] = round(ref / r["seconds"], 2)
    chosen = f"{ALGORITHM} (xxhash)"
    print(f"{'checksum':<20} {'GB/s':>8} {'s/GB':>8} {'vs sha256':>10}")
    for name, r in rows.items():
        mark = "  <- chatft" if name == chosen else ""
        print(f"{name:<20} {r['gb_per_s']:>8.2f} {1 / r['gb_per_s']:>8.3f} "
              f"{r['speedup_vs_sha256']:>9.1f}x{mark}")
    # The 7B line: Qwen2-7B (7.6e9 parameters) with fp32 master weights and two Adam moments
    # plus the bf16 model states: 7.6e9 x (12 + 2) bytes ~ 106 GB, one core hashing it.
    ckpt_gb = 7.6e9 * 14 / GB
    result = {
        "benchmark": "checksum_speed", "label": args.label,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "file_gib": args.gib, "repeats": args.repeats, "chunk_bytes": CHUNK,
        "first_pass_with_fsync_s": round(first_pass, 3),
        "candidates": rows, "reference": REFERENCE, "chosen": chosen,
        "seconds_for_7b_checkpoint_one_core": {n: round(ckpt_gb / r["gb_per_s"], 1)
                                               for n, r in rows.items() if n != "read only"},
        "checks": {"chosen_faster_than_reference":
                   rows[chosen]["gb_per_s"] > rows[REFERENCE]["gb_per_s"]},
        "versions": environment.versions(["xxhash"]),
        "hardware": hardware,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"checksum_speed_{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"benchmark": "checksum_speed", "chosen": chosen,
                      "gb_per_s": {n: r["gb_per_s"] for n, r in rows.items()}}))


if __name__ == "__main__":
    main()
