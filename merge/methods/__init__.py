"""The merge-method registry: every `merge_method` by name (as mergekit's `merge_methods/`).

To add a method: a module here with a `MergeMethod` subclass (its `params`, `base_model`,
`min_models`/`max_models`, `passes` and a `job` that streams one tensor, see base.py), listed
in `_register` below, and its tests. The planner, the recipe checks and docs/merge.md's table
read the declarations; nothing else changes.
"""

from __future__ import annotations

from typing import Dict, List

from core.errors import UserError
from merge.methods.base import REQUIRED, MergeMethod, Param, TensorContext, TensorJob

_METHODS: Dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method


def get(name: str) -> MergeMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown merge_method '{name}': use one of {', '.join(_METHODS)}") from None


def names() -> List[str]:
    return list(_METHODS)


def _register() -> None:
    from merge.methods import model_stock, nuslerp, slerp, task_arithmetic

    for method in (slerp.Slerp(), slerp.Linear(), *task_arithmetic.family(), model_stock.ModelStock(),
                   nuslerp.NuSlerp()):
        register(method)


_register()

__all__ = ["REQUIRED", "MergeMethod", "Param", "TensorContext", "TensorJob", "get", "names", "register"]
