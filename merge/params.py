"""A method parameter's value for one output tensor, as mergekit 0.1.5 resolves it
(`mergekit/config.py`):
- a parameter is looked up in the slice's `parameters`, then the top-level `parameters`
  (per-model parameters such as linear `weight` first in the source's own `parameters`);
- a value is a number, a gradient (list of anchors, linearly interpolated at d·(K-1), d the
  layer's depth in its slice) or a list of {filter, value}: the first entry whose filter is a
  substring of the tensor name (or that has no filter) wins.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from core.errors import UserError


def evaluate_setting(tensor_name: str, setting: Any, depth: float) -> Optional[float]:
    """A parameter's value for one tensor at layer depth d in [0, 1] (mergekit semantics)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        return setting
    if isinstance(setting, list) and setting:
        if all(isinstance(v, (bool, int, float)) for v in setting):
            # a gradient: anchors spread evenly over the slice, linear in between
            scaled = depth * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], depth)
    return None


def resolve(name: str, tensor_name: str, depth: float, scopes: Sequence[Dict[str, Any]], default=None):
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(tensor_name, scope[name], depth)
            if value is not None:
                return value
    if default is None:
        raise UserError(
            f"parameters.{name} gives no value for tensor '{tensor_name}': add an entry without a filter"
        )
    return default
