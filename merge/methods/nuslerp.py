"""nuslerp (mergekit 0.1.5 `merge_methods/nuslerp.py`): SLERP of two models with t from their
weights (t = weight_2 / (weight_1 + weight_2), 0.5 when they sum to ~0); with a base model,
of the two task vectors (model - base), added back to the base.

`nuslerp_flatten` (default): one angle for the whole tensor; else one per row
(dim -1), or per column (dim 0) with `nuslerp_row_wise`. Ops round to the working dtype, as
mergekit's torch code does; two vectors count as colinear when 1 - cos² <= 1e-16 (then LERP).

Passes: 1 reduction (norms, and the dot in f32/f64 work) before the writing pass; 2 for
bf16/f16 work, where the dot of the normalised vectors is summed after rounding them as
mergekit does. Per-row accumulators are one float64 per row.
"""

from __future__ import annotations

import numpy as np

from merge.methods.base import NON_NEGATIVE, MergeMethod, Param, TensorJob
from merge.methods.numeric import Groups


class NuSlerp(MergeMethod):
    name = "nuslerp"
    params = (
        Param("weight", per_model=True, accepts=NON_NEGATIVE, help="t = weight_2 / (weight_1 + weight_2)"),
        Param("nuslerp_row_wise", False, help="one angle per column (vectors along dim 0) without flatten"),
        Param("nuslerp_flatten", True, help="one angle for the whole tensor"),
    )
    base_model = "optional"
    min_models = 2
    max_models = 3
    passes = "1 (2 for bf16/f16 work)"
    summary = "SLERP of two models (or of their task vectors with a base) with t from weights"

    def models_text(self):
        return "2 (+ base)"

    def model_count_problem(self, count, uses_base):
        if count - (1 if uses_base else 0) != 2:
            return "nuslerp merges exactly two models (plus base_model when given): give two"
        return None

    def job(self, plan, ctx):
        return NuSlerpJob(plan, ctx)


class NuSlerpJob(TensorJob):
    def __init__(self, plan, ctx):
        self.rnd = ctx.rnd
        self.base = plan.has_base
        w = [float(x) for x in plan.params["weight"]]
        total = w[0] + w[1]
        self.t = 0.5 if abs(total) < 1e-6 else w[1] / total
        p = plan.params
        mode = "flat" if p["nuslerp_flatten"] else ("first" if p["nuslerp_row_wise"] else "last")
        self.groups = Groups(plan.shape, mode)
        self.exact_dot = self.rnd.active  # 16-bit work: normalise first, as mergekit rounds
        self.passes = 2 if self.exact_dot else 1
        g = self.groups.count
        self.sq0, self.sq1, self.dot = np.zeros(g), np.zeros(g), np.zeros(g)

    def vectors(self, xs):
        if not self.base:
            return xs[0], xs[1]
        b = xs[0]
        fused = self.rnd.fused
        if fused is not None:  # merge/native.py: the same bits in one pass
            for x in xs[1:]:
                fused.sub_round_bf16(x.ctypes.data, b.ctypes.data, x.shape[0])
            return xs[1], xs[2]
        return self.rnd(np.subtract(xs[1], b, out=xs[1])), self.rnd(np.subtract(xs[2], b, out=xs[2]))

    def reduce(self, pass_index, xs, offset):
        v0, v1 = self.vectors(xs)
        index = self.groups.index(offset, v0.shape[0])
        if pass_index == 0:
            self.groups.add_squares(self.sq0, index, v0, self.rnd.fused)
            self.groups.add_squares(self.sq1, index, v1, self.rnd.fused)
            if not self.exact_dot:
                self.groups.add(self.dot, index, np.multiply(v0, v1, dtype=np.float64))
            return
        rnd = self.rnd
        if rnd.fused is not None:  # the three ops below, rounded alike, in one pass
            (n0, n1), stride = Groups.operands(index, self.n0, self.n1)
            rnd.fused.nuslerp_dot_terms(v0.ctypes.data, v1.ctypes.data, n0.ctypes.data, n1.ctypes.data, stride,
                                        v0.shape[0])
            self.groups.add(self.dot, index, v0, rnd.fused)
            return
        u0 = rnd(v0 / Groups.pick(self.n0, index))
        u1 = rnd(v1 / Groups.pick(self.n1, index))
        self.groups.add(self.dot, index, rnd(np.multiply(u0, u1, out=u0)))

    def end_pass(self, pass_index):
        rnd = self.rnd
        if pass_index == 0:
            self.n0 = np.maximum(rnd.array(np.sqrt(self.sq0)), np.float32(1e-7))
            self.n1 = np.maximum(rnd.array(np.sqrt(self.sq1)), np.float32(1e-7))
            if self.exact_dot:
                return
            cos = (self.dot / (self.n0.astype(np.float64) * self.n1)).astype(np.float32)
        else:
            cos = rnd.array(self.dot)
        cos = np.clip(cos, -1, 1)
        self.colinear = rnd(np.float32(1) - rnd(cos * cos)) <= 1e-16
        theta = rnd(np.arccos(np.where(self.colinear, np.float32(0), cos)).astype(np.float32))
        sin_theta = rnd(np.sin(theta))
        self.sin_theta = np.where(self.colinear, np.float32(1), sin_theta)
        self.s0 = rnd(np.sin(rnd(np.float32(1 - self.t) * theta)))
        self.s1 = rnd(np.sin(rnd(np.float32(self.t) * theta)))

    def combine(self, xs, offset):
        rnd = self.rnd
        base = xs[0] if self.base else None
        v0, v1 = self.vectors(xs)
        index = self.groups.index(offset, v0.shape[0])
        if rnd.fused is not None:
            return self.fused_combine(base, v0, v1, index)
        colinear = Groups.pick(self.colinear, index)
        if np.all(colinear):
            a, b = np.float32(1 - self.t), np.float32(self.t)
            scale = np.float32(1)
        else:
            a, b = Groups.pick(self.s0, index), Groups.pick(self.s1, index)
            scale = Groups.pick(self.sin_theta, index)
        lerp = None
        if np.any(colinear) and not np.all(colinear):  # rows of both kinds in this block
            lerp = rnd(rnd(v0 * np.float32(1 - self.t)) + rnd(v1 * np.float32(self.t)))
        rnd(np.multiply(v0, a, out=v0))
        rnd(np.multiply(v1, b, out=v1))
        rnd(np.add(v0, v1, out=v0))
        if not np.all(colinear):
            rnd(np.divide(v0, scale, out=v0))
        if lerp is not None:
            np.copyto(v0, lerp, where=colinear)
        if base is not None:
            np.add(base, v0, out=base)
            return base
        return v0

    def fused_combine(self, base, v0, v1, index):
        """combine's ops, rounded alike, in one pass (merge/native.py), into v0."""
        (a, b, scale, colinear), stride = Groups.operands(index, self.s0, self.s1, self.sin_theta, self.colinear)
        self.rnd.fused.nuslerp_combine(
            v0.ctypes.data, v1.ctypes.data, None if base is None else base.ctypes.data, a.ctypes.data, b.ctypes.data,
            scale.ctypes.data, colinear.ctypes.data, stride, np.float32(1 - self.t), np.float32(self.t), v0.shape[0])
        return v0


METHODS = (NuSlerp(),)
