"""Disk space: recognizing a full disk in the forms torch and Python report it, and the
message with free and needed bytes."""

from __future__ import annotations

import errno

import pytest

from chatft.integrity import disk


def test_out_of_space_recognizes_enospc_and_torch_short_writes():
    assert disk.out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert disk.out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                          "unexpected pos 58399168 vs 58399056"))
    try:  # torch's error raised while handling the OSError of the file write
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("wrapped")
    except ValueError as e:
        assert disk.out_of_space(e)
    assert disk.out_of_space(Exception("No space left on device (os error 28)"))  # tokenizers
    assert not disk.out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not disk.out_of_space(RuntimeError("CUDA out of memory"))


def test_ensure_space_names_folder_free_and_needed(tmp_path):
    free = disk.free_bytes(tmp_path)
    disk.ensure_space(tmp_path, 1, "checkpoint step-000004")
    with pytest.raises(disk.DiskFullError) as err:
        disk.ensure_space(tmp_path / "not" / "yet", free + 10**15, "checkpoint step-000004")
    text = str(err.value)
    assert "checkpoint step-000004" in text and str(tmp_path) in text
    assert "needed" in text and "free" in text and disk.gb(free + 10**15) in text


def test_gb_prints_decimal_sizes():
    assert [disk.gb(n) for n in (5, 1_500, 2_340_000, 117_000_000_000)] == \
        ["5 bytes", "1.5 kB", "2.34 MB", "117 GB"]
