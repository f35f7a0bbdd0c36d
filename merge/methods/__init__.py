"""The merge-method registry: every `merge_method` by name (as mergekit's `merge_methods/`).

To add a method: a module here with a `MergeMethod` subclass (its `params`, `base_model`,
`min_models`/`max_models`, `passes` and a `job` that streams one tensor, see base.py; shared
math in numeric.py) and a module-level `METHODS` tuple of its instances, and its tests. Every
module of this package but base.py and numeric.py is registered at import; the planner, the
recipe checks, `launch/merge.py --help` and docs/merge.md's table read the declarations;
nothing else changes.
"""

from __future__ import annotations

from typing import Dict, List

from core.errors import UserError
from merge.methods.base import REQUIRED, MergeMethod, Param, TensorJob
from merge.methods.numeric import TensorContext

_METHODS: Dict[str, MergeMethod] = {}
# Modules of this package that declare no methods: the contract and the methods' shared math.
SUPPORT_MODULES = ("base", "numeric")
# Registry order (error messages, `--help`, docs/merge.md's table): these modules first, in the
# order they had when slerp.py also held linear; every other module after them, in name order.
FIRST_MODULES = ("model_stock", "nuslerp", "slerp", "linear")


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


def _value(value) -> str:
    if value is REQUIRED:
        return "required"
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe_params(method: MergeMethod) -> str:
    """`name=default` per parameter, `(per model)` where each model has its own value."""
    return ", ".join(f"{p.name}={_value(p.default)}" + (" (per model)" if p.per_model else "")
                     for p in method.params)


def methods_table() -> str:
    """docs/merge.md's table of methods, from the declarations (a test keeps the page in step)."""
    rows = ["| method | what it does | parameters (default) | base_model | models | passes before writing |",
            "| --- | --- | --- | --- | --- | --- |"]
    for m in _METHODS.values():
        kind = " (random)" if m.randomised else ""
        rows.append(f"| `{m.name}`{kind} | {m.summary} | {describe_params(m)} | {m.base_model} | {m.models_text()} | {m.passes} |")
    return "\n".join(rows)


def cli_help() -> str:
    """One line per method for `launch/merge.py --help`."""
    return "merge methods (docs/merge.md):\n" + "\n".join(f"  {m.name} ({describe_params(m)})" for m in _METHODS.values())


def _register() -> None:
    """Every method module's METHODS: FIRST_MODULES, then the others in name order."""
    import importlib
    import pkgutil

    found = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name not in SUPPORT_MODULES)
    for name in [m for m in FIRST_MODULES if m in found] + [m for m in found if m not in FIRST_MODULES]:
        for method in importlib.import_module(f"{__name__}.{name}").METHODS:
            register(method)


_register()

__all__ = ["REQUIRED", "MergeMethod", "Param", "TensorContext", "TensorJob", "cli_help", "describe_params", "get",
           "methods_table", "names", "register"]
