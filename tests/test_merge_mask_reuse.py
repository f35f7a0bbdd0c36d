"""dare_* and della* decide each keep-mask once: the norm pass keeps them as bits for the
writing pass, and della's row-aligned blocks rank each row from the block itself. Both must
give the bytes of the path that draws and ranks again."""

from __future__ import annotations

import numpy as np
import pytest

from merge import methods
from merge.methods import numeric, task_arithmetic
from merge.methods.numeric import Rounder, TensorContext
from merge.plan import TensorPlan

DARE = {"weight": [0.5, 0.7], "density": [0.5, 0.3], "lambda": 1.0, "normalize": False, "rescale": True,
        "int8_mask": False}
DELLA = {**DARE, "epsilon": [0.1, 0.2]}


def stream(method, arrays, params, shape, block, work="BF16"):
    """One tensor through its job as merge/stream.py streams it (blocks cut to `job.align`);
    returns the output and how many elements ctx.read re-read."""
    flat = [np.asarray(a, np.float32).reshape(-1) for a in arrays]
    n = flat[0].shape[0]
    plan = TensorPlan("model.layers.0.mlp.up_proj.weight", shape, work, work,
                      [(f"m{i}", "w") for i in range(len(flat))], method, dict(params), True)
    rnd = Rounder(work)
    reread = []

    def read(start, count):
        return [rnd(f[start : start + count].copy()) for f in flat]

    def reread_rows(start, count):
        reread.append(count)
        return read(start, count)

    job = methods.get(method).job(plan, TensorContext(np.float32, rnd, reread_rows, block, 3))
    if 1 < job.align <= block:
        block -= block % job.align
    for p in range(job.passes):
        for lo in range(0, n, block):
            job.reduce(p, read(lo, min(block, n - lo)), lo)
        job.end_pass(p)
    out = np.concatenate([job.combine(read(lo, min(block, n - lo)), lo).copy() for lo in range(0, n, block)])
    return out, sum(reread)


def models(shape):
    rng = np.random.default_rng(5)
    base = rng.standard_normal(shape).astype(np.float32)
    return [base] + [0.8 * base + 0.3 * rng.standard_normal(shape).astype(np.float32) for _ in range(2)]


def count_draws(monkeypatch, drawn, in_c):
    """Appends the number of words each draw takes: the C loops' masks (merge/native.py), or,
    without them, numpy's words."""
    if not in_c:
        monkeypatch.setattr(numeric, "kernels", lambda: None)
        words = numeric.random_words
        monkeypatch.setattr(numeric, "random_words", lambda key, offset, n: drawn.append(n) or words(key, offset, n))
        return
    keep, kept_bits = numeric.keep_below, numeric.kept_bits_and_norms

    def counting_keep(key, offset, n, limit):
        drawn.append(n)
        return keep(key, offset, n, limit)

    def counting_kept_bits(lib, key, offset, x, p):
        drawn.append(x.shape[0])
        return kept_bits(lib, key, offset, x, p)

    for module in (numeric, task_arithmetic):  # bernoulli's draws, della's and dare's norm pass
        monkeypatch.setattr(module, "keep_below", counting_keep)
    monkeypatch.setattr(task_arithmetic, "kept_bits_and_norms", counting_kept_bits)


@pytest.mark.parametrize("in_c", [True, False])
@pytest.mark.parametrize("method,params", [("dare_linear", DARE), ("dare_ties", DARE), ("della", DELLA),
                                           ("della_linear", DELLA)])
def test_each_random_word_is_drawn_once_and_the_bytes_stay(method, params, in_c, monkeypatch):
    shape = (24, 50)
    arrays = models(shape)
    drawn = []
    count_draws(monkeypatch, drawn, in_c)
    kept, _ = stream(method, arrays, params, shape, block=200)
    assert sum(drawn) == 2 * 24 * 50  # two models, each element once
    monkeypatch.setattr(task_arithmetic, "KEPT_MASK_BYTES", 0)  # past the cap: drawn again
    drawn.clear()
    again, _ = stream(method, arrays, params, shape, block=200)
    assert sum(drawn) == 2 * 2 * 24 * 50
    assert np.array_equal(kept, again)


def test_della_ranks_rows_from_whole_row_blocks_without_rereading():
    shape = (24, 50)
    arrays = models(shape)
    aligned, reread = stream("della", arrays, DELLA, shape, block=230)  # cut to 200: four rows
    assert reread == 0
    straddling, reread = stream("della", arrays, DELLA, shape, block=37)  # rows wider than a block
    assert reread > 0
    assert np.array_equal(aligned, straddling)
