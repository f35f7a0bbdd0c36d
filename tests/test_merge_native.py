"""merge/native.py: the C loops give the numpy loops' bits on every kind of float32 (rounding
ties both ways, subnormals, the largest finite values, inf, nan), nuslerp's and model_stock's
fused chains and the task-arithmetic family's write give their numpy ops' bits in every
mode, and without a C compiler the merge falls back to numpy after one line."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.merge import run_job

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


def test_c_decoding_gives_the_numpy_floats(c_loops, monkeypatch):
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)  # every bf16 bit pattern
    got = io.decode(raw, "BF16", np.empty(1 << 16, np.float32)).copy()
    monkeypatch.setattr(io, "kernels", lambda: None)
    want = io.decode(raw, "BF16", np.empty(1 << 16, np.float32))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(want.view(np.uint32), np.arange(1 << 16, dtype=np.uint32) << 16)


@pytest.mark.parametrize("n", [1, 7, 8, 127, 128, 129, 1000, 8191, 8192, 8193, 100_003, 262_144])
def test_c_sums_give_numpy_sums(c_loops, n):
    """numpy's pairwise sums, of float32 values cast piece by piece and of a float64 array,
    rebuilt in C: the same float64 bits at every size the blocking changes at."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 4, n)).astype(np.float32)
    mask = rng.random(n) < 0.5
    groups = numeric.Groups((n,), "flat")
    got, want = np.zeros(1), np.zeros(1)
    groups.add(got, None, x, c_loops)
    groups.add(want, None, x)
    assert got[0] == want[0]
    got, want = np.zeros(1), np.zeros(1)
    groups.add_squares(got, None, x, c_loops)
    groups.add_squares(want, None, x)
    assert got[0] == want[0]
    sums = np.empty(2)
    c_loops.sum_abs_kept(x.ctypes.data, mask.ctypes.data, n, np.getbufsize(), sums.ctypes.data)
    a = np.abs(x)
    assert sums[0] == float(np.sum(a, dtype=np.float64))
    assert sums[1] == float(np.sum(np.multiply(a, mask), dtype=np.float64))


def task_vector_models(rows: int, width: int) -> list:
    """base, a and b of awkward magnitudes (1e-38 .. 1e15, bf16 rounding ties, a few subnormal
    and zero task vectors); b's task vector is 2x a's in every third row, so per-row angles
    meet both colinear rows (LERP) and the rest in one block."""
    rng = np.random.default_rng(1)
    scale = (10.0 ** rng.integers(-15, 15, (rows, 1))).astype(np.float32)
    base = rng.standard_normal((rows, width)).astype(np.float32) * scale
    a = base + rng.standard_normal((rows, width)).astype(np.float32) * scale * np.float32(0.1)
    b = base + rng.standard_normal((rows, width)).astype(np.float32) * scale * np.float32(0.1)
    b[::3] = base[::3] + 2 * (a[::3] - base[::3])
    ties = awkward_floats()[1 << 20 :][: rows * width // 4]
    ties = ties[np.isfinite(ties) & (np.abs(ties) < 1e15)]
    a.reshape(-1)[: ties.size] = ties
    a[1] = base[1]  # a zero task vector row
    a[2] = base[2] + np.float32(1e-39)
    return [base, a, b]


FUSED_CASES = [
    ("nuslerp", {"weight": [0.5, 0.5], "nuslerp_flatten": True, "nuslerp_row_wise": False}, True),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": False}, True),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True}, True),
    ("nuslerp", {"weight": [0.5, 0.25], "nuslerp_flatten": False, "nuslerp_row_wise": False}, False),
    ("model_stock", {"filter_wise": False}, True),
    ("model_stock", {"filter_wise": True}, True),
]
TA = {"weight": [0.5, 0.75, 0.25], "density": [1.0, 0.5, 0.7], "normalize": False, "rescale": False, "lambda": 1.0,
      "int8_mask": False}
FUSED_CASES += [  # the task-arithmetic family: three models (the general loops; two take their own)
    ("task_arithmetic", {**TA, "lambda": 0.7}, True),
    ("task_arithmetic", {**TA, "normalize": True, "weight": [0.5, 0.75]}, True),
    ("ties", {**TA, "normalize": True, "lambda": 0.6}, True),
    ("ties", {**TA, "weight": [0.5, 0.5], "density": [0.5, 0.5]}, True),
    ("dare_ties", {**TA, "rescale": True, "lambda": 1.5}, True),
    ("dare_linear", {**TA, "rescale": True, "normalize": True}, True),
    ("breadcrumbs_ties", {**TA, "gamma": [0.01, 0.01, 0.05]}, True),
    ("della", {**TA, "rescale": True, "normalize": True, "epsilon": [0.1, 0.1, 0.2], "density": [0.5, 0.5, 0.4]}, True),
]


@pytest.mark.parametrize("method,params,has_base", FUSED_CASES)
def test_fused_chains_give_the_numpy_bits(c_loops, monkeypatch, method, params, has_base):
    models = task_vector_models(48, 96)
    if method == "model_stock" or len(params.get("weight", ())) == 3:
        models.append(models[2][::-1].copy())  # three models: three pairs
    if not has_base:
        models = models[1:]
    run = lambda: run_job(method, models, params, shape=(48, 96), work="BF16", block=1000, has_base=has_base)
    fused_job, fused = run()
    assert fused_job.rnd.fused is not None
    monkeypatch.setattr(numeric.Rounder, "fused", property(lambda self: None))
    numpy_job, numpy_ops = run()
    assert np.isfinite(numpy_ops).mean() > 0.99
    assert np.array_equal(fused.view(np.uint32), numpy_ops.view(np.uint32))
    for sums in ("sq0", "sq1", "dot", "sq", "dots", "before", "after"):  # the float64 reductions, before they are rounded
        if hasattr(numpy_job, sums):
            assert np.array_equal(np.asarray(getattr(fused_job, sums)), np.asarray(getattr(numpy_job, sums))), sums


def test_nuslerp_rows_meet_both_branches():
    """The fused-chain test's per-row nuslerp has colinear rows and others in one block."""
    params = {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": False}
    job, _ = run_job("nuslerp", task_vector_models(48, 96), params, shape=(48, 96), work="BF16", block=1000)
    assert job.colinear.any() and not job.colinear.all()


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


TOP = (1 << 64) - 1
PHILOX_COUNTERS = [[0, 0, 0, 0], [5, 0, 0, 0], [TOP - 2, 0, 0, 0], [TOP, TOP - 1, 0, 0], [TOP, TOP, TOP, 7],
                   [123456789, 42, 7, 0]]


def philox_keys() -> list:
    """random_key's keys (words past 2^63 among them, which numpy takes through float64) and
    small and extreme ones."""
    return [numeric.random_key(s, f"model.layers.{s}.mlp.up_proj.weight", s % 3) for s in range(6)] + [
        [0, 0], [1, 2], [TOP, TOP], [1 << 63, 1]]


@pytest.mark.parametrize("counter", PHILOX_COUNTERS)
def test_c_philox_draws_numpys_words(c_loops, counter):
    """Philox4x64-10 in C gives np.random.Philox's random_raw for every key and counter (carries
    across counter words included), at lengths around the 4-word block."""
    for key in philox_keys():
        k0, k1 = numeric.philox_key(tuple(key))
        for n in (1, 2, 3, 4, 5, 9, 1000, 100_001):
            out = np.empty(n, np.uint64)
            c_loops.philox_raw(k0, k1, np.array(counter, np.uint64).ctypes.data, n, out.ctypes.data)
            want = np.random.Philox(key=key, counter=np.array(counter, np.uint64)).random_raw(n)
            assert np.array_equal(out, want), (key, counter, n)


def test_c_philox_keep_reads_words_low_half_first(c_loops):
    """philox_keep's words are random_raw's uint64 split low half first, from any word of a
    block, also across a counter carry."""
    key = numeric.random_key(3, "w", 1)
    k0, k1 = numeric.philox_key(tuple(key))
    for counter in PHILOX_COUNTERS:
        words = np.random.Philox(key=key, counter=np.array(counter, np.uint64)).random_raw(40).view(np.uint32)
        limit = np.random.default_rng(1).integers(0, 1 << 32, 80, dtype=np.uint64).astype(np.uint32)
        for skip in (0, 1, 7, 8, 13):
            n = 80 - skip
            keep = np.empty(n, np.bool_)
            c_loops.philox_keep(k0, k1, np.array(counter, np.uint64).ctypes.data, skip, n, limit.ctypes.data, 1,
                                keep.ctypes.data)
            assert np.array_equal(keep, words[skip:] < limit[:n]), (counter, skip)


KEEP_OFFSETS = [0, 1, 3, 7, 8, 9, 13, 1001, (1 << 33) + 5]
KEEP_LENGTHS = [1, 2, 7, 8, 9, 100, 100_003]


@pytest.mark.parametrize("numpy_only", [False, True])
def test_keep_masks_are_the_numpy_draws(c_loops, monkeypatch, numpy_only):
    """bernoulli's masks (one threshold) and della's (a threshold per element, from its rank
    table) equal the numpy words against the thresholds, in C and in the numpy fallback, at
    offsets inside a block and past 2^32 words."""
    if numpy_only:
        monkeypatch.setattr(numeric, "kernels", lambda: None)
    rng = np.random.default_rng(2)
    table = rng.integers(0, 1 << 32, 100_003, dtype=np.uint64).astype(np.uint32)
    for key in philox_keys()[:6]:
        for offset in KEEP_OFFSETS:
            for n in KEEP_LENGTHS:
                words = np.random.Philox(key=key, counter=[offset // 8, 0, 0, 0]).random_raw(n // 2 + 8)
                words = words.view(np.uint32)[offset % 8 : offset % 8 + n]
                for p in (0.1, 0.5, np.float32(0.9)):
                    assert np.array_equal(numeric.bernoulli(key, offset, n, p), words < numeric.thresholds(p))
                limit = table[:n]
                assert np.array_equal(numeric.keep_below(key, offset, n, limit), words < limit)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_norm_pass_in_one_c_loop_gives_the_numpy_bits(c_loops, monkeypatch, method):
    """dare's masks drawn with their l1 norms and packed in one C loop (keep_norms): the numpy
    steps' masks, norms and output, on blocks of several of numpy's buffer pieces that start at
    odd words."""
    params = {**TA, "rescale": True, "weight": [0.5, 0.75], "density": [0.5, 0.3]}
    models = task_vector_models(300, 301)
    run = lambda: run_job(method, models, params, shape=(300, 301), work="BF16", block=20_003)
    c_job, c_out = run()
    monkeypatch.setattr(numeric.Rounder, "fused", property(lambda self: None))
    numpy_job, numpy_out = run()
    assert c_job.before == numpy_job.before and c_job.after == numpy_job.after
    assert 0 < c_job.after[0] < c_job.before[0]
    assert np.array_equal(c_out.view(np.uint32), numpy_out.view(np.uint32))
