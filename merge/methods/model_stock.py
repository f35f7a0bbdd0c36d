"""model_stock (mergekit 0.1.5 `merge_methods/model_stock.py`, arXiv 2403.19522).

With base w0 and models w1..wN (N >= 2), offsets o_i = w_i - w0 and cos = the mean over pairs
of cos(o_a, o_b) (per row with `filter_wise`, else over the flattened tensor):
t = N·cos / (1 + (N-1)·cos) (0 where the denominator vanishes), and the result is
t·mean(w_i) + (1-t)·w0. Ops round to the working dtype, as mergekit's torch code does.

Passes: 1 reduction (the offsets' squared norms and pairwise dots, per row with filter_wise)
before the writing pass.
"""

from __future__ import annotations

import ctypes
from itertools import combinations

import numpy as np

from merge.methods.base import MergeMethod, Param, TensorJob
from merge.methods.numeric import Groups


class ModelStock(MergeMethod):
    name = "model_stock"
    params = (Param("filter_wise", False, help="one t per row (dim -1) instead of one per tensor"),)
    base_model = "required"
    min_models = 3
    passes = "1"
    summary = "interpolates the models' mean towards the base by the angle between their offsets"

    def job(self, plan, ctx):
        return ModelStockJob(plan, ctx)


class ModelStockJob(TensorJob):
    passes = 1

    def __init__(self, plan, ctx):
        self.rnd = ctx.rnd
        self.n = len(plan.sources) - 1
        self.groups = Groups(plan.shape, "last" if plan.params["filter_wise"] else "flat")
        g = self.groups.count
        self.sq = [np.zeros(g) for _ in range(self.n)]
        self.pairs = list(combinations(range(self.n), 2))
        self.dots = [np.zeros(g) for _ in self.pairs]
        self._product = np.empty(0, np.float32)

    def offsets(self, xs):
        w0 = xs[0]
        fused = self.rnd.fused
        if fused is not None:  # merge/native.py: the same bits in one pass
            for x in xs[1:]:
                fused.sub_round_bf16(x.ctypes.data, w0.ctypes.data, x.shape[0])
            return xs[1:]
        return [self.rnd(np.subtract(x, w0, out=x)) for x in xs[1:]]

    def product(self, a, b):
        """rnd(a·b), an elementwise op in the working dtype, into a reused buffer."""
        fused = self.rnd.fused
        if fused is None:
            return self.rnd(np.multiply(a, b))
        if self._product.shape[0] < a.shape[0]:
            self._product = np.empty(a.shape[0], np.float32)
        out = self._product[: a.shape[0]]
        fused.mul_round_bf16(a.ctypes.data, b.ctypes.data, out.ctypes.data, a.shape[0])
        return out

    def reduce(self, pass_index, xs, offset):
        index = self.groups.index(offset, xs[0].shape[0])
        os_ = self.offsets(xs)
        for i, o in enumerate(os_):
            self.groups.add_squares(self.sq[i], index, o, self.rnd.fused)  # torch.norm: float accumulation
        for k, (a, b) in enumerate(self.pairs):
            self.groups.add(self.dots[k], index, self.product(os_[a], os_[b]), self.rnd.fused)

    def end_pass(self, pass_index):
        rnd = self.rnd
        norms = [rnd.array(np.sqrt(sq)) for sq in self.sq]
        cos_sum = np.zeros(self.groups.count, np.float32)
        for (a, b), dot in zip(self.pairs, self.dots):
            product = np.maximum(rnd(norms[a] * norms[b]), np.float32(1e-6))
            cos = np.clip(rnd(rnd.array(dot) / product), -1, 1)
            cos_sum += cos
        cos = rnd(cos_sum / np.float32(len(self.pairs)))  # torch mean: float accumulation, one rounding
        n = np.float32(self.n)
        denominator = rnd(np.float32(1) + rnd((n - 1) * cos))
        singular = np.abs(denominator) < 1e-6
        safe = np.where(singular, np.float32(1), denominator)
        self.t = np.where(singular, np.float32(0), rnd(rnd(n * cos) / safe)).astype(np.float32)
        self.one_minus_t = rnd(np.float32(1) - self.t)

    def combine(self, xs, offset):
        rnd = self.rnd
        index = self.groups.index(offset, xs[0].shape[0])
        w0, ws = xs[0], xs[1:]
        if rnd.fused is not None:  # the ops below, rounded alike, in one pass (merge/native.py)
            (t, one_minus_t), stride = Groups.operands(index, self.t, self.one_minus_t)
            models = (ctypes.c_void_p * len(ws))(*[w.ctypes.data for w in ws])
            rnd.fused.model_stock_combine(w0.ctypes.data, models, len(ws), np.float32(self.n), t.ctypes.data,
                                          one_minus_t.ctypes.data, stride, w0.shape[0])
            return ws[0]
        average = ws[0]
        for w in ws[1:]:
            rnd(np.add(average, w, out=average))
        rnd(np.divide(average, np.float32(self.n), out=average))
        t, one_minus_t = Groups.pick(self.t, index), Groups.pick(self.one_minus_t, index)
        rnd(np.multiply(average, t, out=average))
        rnd(np.multiply(w0, one_minus_t, out=w0))
        return np.add(average, w0, out=average)


METHODS = (ModelStock(),)
