"""slerp (mergekit 0.1.5 `merge_methods/slerp.py`): the math is merge/methods/numeric.py's; it
computes in float32 (float64 for f64 inputs) and rounds once, as mergekit does.

Passes: 1 (the norms and dot) before the writing pass.
"""

from __future__ import annotations

import math

import numpy as np

from merge.methods.base import IN_0_1, MergeMethod, Param, TensorJob
from merge.methods.numeric import SlerpStats, combine, slerp_coefficients


class Slerp(MergeMethod):
    name = "slerp"
    params = (Param("t", accepts=IN_0_1, help="0 returns base_model, 1 the other model"),)
    base_model = "required"
    min_models = max_models = 2
    passes = "1"
    summary = "spherical interpolation of two models, v0 = base_model"

    def job(self, plan, ctx):
        return SlerpJob(plan, ctx)


class SlerpJob(TensorJob):
    passes = 1

    def __init__(self, plan, ctx):
        self.t = float(plan.params["t"])
        self.compute = ctx.compute
        self.stats = SlerpStats()

    def reduce(self, pass_index, xs, offset):
        self.stats.add(*xs)

    def end_pass(self, pass_index):
        s = self.stats
        self.coefficients = slerp_coefficients(self.t, s.sq0, s.sq1, s.dot, self.compute)
        # |c0·x_i + c1·y_i| <= |c0|·|x| + |c1|·|y|: with finite norms far below the compute
        # dtype's max, no element can be inf/nan, and the per-block check is skipped.
        c0, c1 = (abs(float(c)) for c in self.coefficients)
        bound = c0 * math.sqrt(s.sq0) + c1 * math.sqrt(s.sq1)
        self.proven_finite = math.isfinite(bound) and bound < 0.5 * float(np.finfo(self.compute).max)

    def combine(self, xs, offset):
        return combine(*self.coefficients, *xs)


METHODS = (Slerp(),)
