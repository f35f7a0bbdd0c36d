"""linear (mergekit 0.1.5 `merge_methods/linear.py`): the weighted average, with the math of
merge/methods/numeric.py's `combine_linear`; it computes in float32 (float64 for f64 inputs)
and rounds once, as mergekit does.

Passes: 0 before the writing pass.
"""

from __future__ import annotations

from merge.methods.base import MergeMethod, Param, TensorJob
from merge.methods.numeric import combine_linear


class Linear(MergeMethod):
    name = "linear"
    params = (
        Param("weight", per_model=True, help="each model's weight"),
        Param("normalize", True, help="divide by the sum of the weights"),
    )
    base_model = "ignored"
    min_models = 1
    passes = "0"
    summary = "weighted average"

    def job(self, plan, ctx):
        return LinearJob(plan)


class LinearJob(TensorJob):
    def __init__(self, plan):
        self.weights = [float(w) for w in plan.params["weight"]]
        self.normalize = bool(plan.params["normalize"])

    def combine(self, xs, offset):
        return combine_linear(self.weights, self.normalize, xs)


METHODS = (Linear(),)
