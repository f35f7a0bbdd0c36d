"""merge/native.py: the C loops give the numpy loops' bits on every kind of float32 (rounding
ties both ways, subnormals, the largest finite values, inf, nan), and without a C compiler
the merge falls back to numpy after one line."""

from __future__ import annotations

import numpy as np
import pytest

from merge import io, native
from merge.methods import numeric


def awkward_floats() -> np.ndarray:
    """Random bit patterns plus, for every exponent and sign, the low halves that decide
    round-to-nearest-even (ties on odd and even, one either side), and the specials."""
    rng = np.random.default_rng(0)
    highs = np.arange(1 << 16, dtype=np.uint32) << 16  # every sign, exponent and 7-bit mantissa
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    edges = (highs[:, None] | lows[None, :]).reshape(-1)
    specials = np.array([0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0x00000001,
                         0x807FFFFF, 0x00008000, 0x00018000], np.uint32)
    bits = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32), edges, specials])
    return bits.view(np.float32)


@pytest.fixture
def c_loops():
    lib = native.kernels()
    if lib is None:
        pytest.skip("no C compiler here: the numpy loops are the only ones")
    return lib


def test_c_rounding_gives_the_numpy_bits(c_loops):
    x = awkward_floats()
    with_c = numeric.Rounder("BF16")
    assert with_c._lib is not None
    numpy_only = numeric.Rounder("BF16")
    numpy_only._lib = None
    got, want = with_c(x.copy()), numpy_only(x.copy())
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_c_encoding_gives_the_numpy_bytes(c_loops, monkeypatch):
    x = awkward_floats()
    n = x.shape[0]
    got = io.encode(x, "BF16", np.empty(n * 2, np.uint8), np.empty(n, np.uint32)).copy()
    monkeypatch.setattr(io, "kernels", lambda: None)
    want = io.encode(x, "BF16", np.empty(n * 2, np.uint8), np.empty(n, np.uint32))
    assert np.array_equal(got, want)


def test_without_a_compiler_numpy_runs_after_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.kernels.cache_clear()
    try:
        assert native.kernels() is None
        assert native.kernels() is None  # decided once per process
        fallback = numeric.Rounder("BF16")
        assert fallback._lib is None
    finally:
        native.kernels.cache_clear()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "numpy" in err[0] and "no-such-cc" in err[0]
    x = awkward_floats()
    want = x.view(np.uint32) + 0x7FFF + ((x.view(np.uint32) >> 16) & 1) & np.uint32(0xFFFF0000)  # wraps as uint32
    assert np.array_equal(fallback(x.copy()).view(np.uint32), want)
