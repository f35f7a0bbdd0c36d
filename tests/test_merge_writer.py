"""merge/io.py's ShardWriter: the bytes on disk are the bytes written, whether they go through
O_DIRECT staging buffers, through the page cache (filesystems without O_DIRECT), or through
both (a filesystem that accepts O_DIRECT at open and refuses it at write)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from merge.io import ShardWriter


def write_blocks(path, monkeypatch, refuse_direct_writes=False):
    """A shard of a header and ~1.3 MB of blocks of uneven sizes (many 64 KiB stages, an
    unaligned tail); returns the bytes it should hold and the writer."""
    monkeypatch.setattr(ShardWriter, "STAGE", 1 << 16)
    rng = np.random.default_rng(0)
    head = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a":1}'.ljust(16)
    sizes = rng.integers(1, 40_000, 60)
    blocks = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in sizes]
    total = len(head) + int(sizes.sum())
    writer = ShardWriter(path, head, total)
    if refuse_direct_writes:
        pwrite, direct = os.pwrite, writer._direct

        def refusing(fd, data, offset):
            if fd == direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            return pwrite(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", refusing)
    offset = len(head)
    for block in blocks:
        writer.write(block, offset)
        offset += block.nbytes
    writer.close()
    return head + b"".join(b.tobytes() for b in blocks), writer


def has_o_direct(folder) -> bool:
    (folder / "probe").touch()
    fd = ShardWriter._open_direct(folder / "probe")
    if fd is not None:
        os.close(fd)
    return fd is not None


def test_direct_writes_give_the_bytes_written(tmp_path, monkeypatch):
    if not has_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    want, _ = write_blocks(tmp_path / "shard", monkeypatch)
    assert (tmp_path / "shard").read_bytes() == want


def test_without_o_direct_the_page_cache_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(ShardWriter, "_open_direct", staticmethod(lambda path: None))
    want, _ = write_blocks(tmp_path / "shard", monkeypatch)
    assert (tmp_path / "shard").read_bytes() == want


def test_o_direct_refused_at_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    if not has_o_direct(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    want, _ = write_blocks(tmp_path / "shard", monkeypatch, refuse_direct_writes=True)
    assert (tmp_path / "shard").read_bytes() == want


def test_writes_out_of_file_order_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "shard", b"\x00" * 16, 1 << 16)
    try:
        if writer._direct is None:
            pytest.skip("this filesystem has no O_DIRECT: writes go to their offsets")
        with pytest.raises(ValueError, match="file order"):
            writer.write(np.zeros(8, np.uint8), 4096)
    finally:
        writer.close(sync=False)
