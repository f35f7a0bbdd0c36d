"""What a merge method is: its declared parameters and inputs, and a per-tensor streaming job.

A method (one module in merge/methods/, registered by name in merge/methods/__init__.py)
declares, as mergekit's `merge_methods/` do:
- `params`: each `Param` with mergekit 0.1.5's name and default, whether each model has its
  own value (`per_model`, mergekit's NON_BASE/INPUT scope) and the values it accepts;
- `base_model` ("required", "optional" or "ignored"), `min_models`/`max_models` (inputs,
  base included) and whether it is `randomised`.

The recipe checks (merge/recipe.py) and the planner (merge/plan.py) read these declarations; the
planner resolves every parameter per tensor (merge/params.py: per model, slice, layer gradient
and filter, as `t`). merge/stream.py then streams the tensor through `method.job(plan, ctx)`:

    for pass in range(job.passes):          # whole-tensor reductions (norms, k-th magnitude, ...)
        for each block in offset order: job.reduce(pass, xs, offset)
        job.end_pass(pass)
    for each block in offset order: out = job.combine(xs, offset)   # then encoded and written

`xs` are the inputs' elements [offset, offset + len) in `plan.sources` order (the base model
first when the method uses one), decoded to float32 (float64 for F64 work) and rounded to the
plan's working dtype; a job may overwrite them. Memory is the block size times the inputs,
plus per-row accumulators for row-wise methods, whatever the tensor size.

Precision: mergekit 0.1.5 runs these methods (not slerp/linear, which upcast) in torch in the
working dtype, so every elementwise op of a bf16 merge rounds to bf16 and every reduction
accumulates in float32 and rounds once. `Rounder` reproduces that on float32 arrays; it and the
rest of the methods' shared math are in merge/methods/numeric.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    from merge.methods.numeric import TensorContext


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()
"""A Param default meaning: the recipe must give a value (mergekit's parameters without one)."""


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = REQUIRED
    """mergekit 0.1.5's default; REQUIRED when the recipe must set it."""
    per_model: bool = False
    """Each model has its own value (looked up in its source's parameters first); with a base
    model, only the other models have one."""
    accepts: Optional[Tuple[str, Callable[[float], bool]]] = None
    """(the accepted interval, e.g. "(0, 1]", test) for numeric values."""
    help: str = ""

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)


IN_0_1 = ("[0, 1]", lambda v: 0.0 <= v <= 1.0)
DENSITY = ("(0, 1]", lambda v: 0.0 < v <= 1.0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0.0)


class MergeMethod:
    """One merge method. Subclasses set the class attributes and implement `job`."""

    name: ClassVar[str]
    params: ClassVar[Tuple[Param, ...]] = ()
    base_model: ClassVar[str] = "required"
    """required: the base model is an input (v0 of SLERP, the origin of task vectors);
    optional: used when given; ignored: every model is an equal input (linear)."""
    min_models: ClassVar[int] = 2
    max_models: ClassVar[Optional[int]] = None
    randomised: ClassVar[bool] = False
    passes: ClassVar[str] = ""
    """How many reduction passes over the inputs precede the writing pass (for docs/merge.md)."""
    summary: ClassVar[str] = ""

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    def uses_base(self, base: Optional[str]) -> bool:
        return self.base_model == "required" or (self.base_model == "optional" and base is not None)

    def models_text(self) -> str:
        """How many models a slice takes, base included (docs/merge.md)."""
        if self.max_models is None:
            return f">= {self.min_models}"
        return str(self.min_models) if self.min_models == self.max_models else f"{self.min_models}-{self.max_models}"

    def model_count_problem(self, count: int, uses_base: bool) -> Optional[str]:
        """What is wrong with merging `count` models (base included) in one slice, or None."""
        if count < self.min_models:
            extra = " (the base and at least two others)" if self.min_models == 3 and uses_base else ""
            return f"{self.name} needs at least {self.min_models} models{extra}: add models"
        if self.max_models is not None and count > self.max_models:
            return f"{self.name} merges at most {self.max_models} models: remove models"
        return None

    def check_values(self, values: Dict[str, Any]) -> Optional[str]:
        """A problem with one tensor's resolved values taken together (e.g. della's density
        ± epsilon), as 'what is wrong: the fix'; None when they are fine."""
        return None

    def job(self, plan, ctx: "TensorContext") -> "TensorJob":
        raise NotImplementedError


class TensorJob:
    """One output tensor's merge. `passes` reductions, then `combine` per block."""

    passes = 0
    proven_finite = False
    """Set when the reductions prove no output element can be inf/nan (skips the check)."""
    align = 1
    """Blocks start and end on multiples of this many elements where it fits a block (della:
    whole rows, so a block holds every row it ranks)."""

    def reduce(self, pass_index: int, xs: List[np.ndarray], offset: int) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        pass

    def combine(self, xs: List[np.ndarray], offset: int) -> np.ndarray:
        raise NotImplementedError
