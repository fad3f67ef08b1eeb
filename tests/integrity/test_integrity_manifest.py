"""Manifests: how the files are shared among processes, what a manifest records, and every
kind of damage verify() names."""

from __future__ import annotations

import json
import os

import pytest

from chatft.integrity import manifest
from chatft.integrity.checksum import ALGORITHM, file_digest


def test_share_gives_the_largest_file_to_the_least_loaded_process():
    files = [("a", 10), ("b", 7), ("c", 5), ("d", 3), ("e", 1)]
    # 10 -> p0 (10, 0); 7 -> p1 (10, 7); 5 -> p1 (10, 12); 3 -> p0 (13, 12); 1 -> p1 (13, 13)
    assert manifest.share(files, 0, 2) == ["a", "d"]
    assert manifest.share(files, 1, 2) == ["b", "c", "e"]
    assert manifest.share(files, 0, 1) == ["a", "b", "c", "d", "e"]
    assert manifest.share(files, 2, 3) == ["c", "d"]  # p0: a; p1: b, e; p2: c, d


def _folder(tmp_path):
    root = tmp_path / "step-000002"
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "zero_pp_rank_0_optim_states.pt").write_bytes(os.urandom(3000))
    (root / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(os.urandom(2900))
    (root / "trainer_state.json").write_text('{"step": 2}')
    return root


def test_two_processes_hash_their_shares_and_the_merge_covers_every_file(tmp_path):
    root = _folder(tmp_path)
    for rank in (0, 1):
        manifest.hash_share(root, rank, 2)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")  # written by process 0 after the shares
    written = manifest.merge(root, 2)
    assert sorted(written["files"]) == ["engine/zero_pp_rank_0_optim_states.pt",
                                        "engine/zero_pp_rank_1_optim_states.pt",
                                        "model/config.json", "trainer_state.json"]
    assert written["total_bytes"] == 3000 + 2900 + 2 + 11
    on_disk = json.loads((root / manifest.MANIFEST).read_text())
    assert on_disk == written and on_disk["algorithm"] == ALGORITHM
    entry = on_disk["files"]["engine/zero_pp_rank_1_optim_states.pt"]
    assert (entry["size"], entry[ALGORITHM]) == file_digest(root / "engine" / "zero_pp_rank_1_optim_states.pt")
    assert not list(root.glob(".manifest-part-*"))  # parts merged and removed
    assert manifest.verify(root) == []
    assert manifest.verify(root, 0, 2) == [] and manifest.verify(root, 1, 2) == []


def test_verify_names_the_file_and_what_was_expected_and_found(tmp_path):
    root = _folder(tmp_path)
    manifest.merge(root)
    shard = root / "engine" / "zero_pp_rank_0_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[100:200] = os.urandom(100)  # same size, other bytes
    shard.write_bytes(bytes(data))
    (problem,) = manifest.verify(root)
    assert problem.file == "engine/zero_pp_rank_0_optim_states.pt"
    assert "same size, different bytes" in problem.found and ALGORITHM in problem.expected
    # with two processes only the one that hashes the file finds it
    found = [manifest.verify(root, rank, 2) for rank in (0, 1)]
    assert sorted(len(f) for f in found) == [0, 1]

    (root / "engine" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"short")
    (root / "trainer_state.json").unlink()
    problems = {p.file: p for p in manifest.verify(root)}
    assert str(problems["engine/zero_pp_rank_1_optim_states.pt"]) == \
        "engine/zero_pp_rank_1_optim_states.pt: expected 2,900 bytes, found 5 bytes"
    assert problems["trainer_state.json"].found == "no such file"
    # sizes are checked by every process but reported by process 0 only
    assert all("different bytes" in p.found for p in manifest.verify(root, 1, 2))


def test_a_folder_without_manifest_is_unverified_and_a_garbled_one_is_damaged(tmp_path):
    root = _folder(tmp_path)
    assert manifest.read_manifest(root) is None and manifest.verify(root) == []
    (root / manifest.MANIFEST).write_bytes(os.urandom(64))
    (problem,) = manifest.verify(root)
    assert problem.file == manifest.MANIFEST and problem.found == "unreadable content"


@pytest.mark.parametrize("size", [0, 1, (16 << 20) + 7])
def test_file_digest_reads_any_size_in_chunks(tmp_path, size):
    import xxhash

    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert file_digest(tmp_path / "f", fsync=True) == (size, xxhash.xxh3_128(data).hexdigest())
