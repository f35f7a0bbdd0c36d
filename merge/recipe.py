"""A merge recipe (a mergekit YAML file, or the Hydra `merge` node as a dict) -> a checked
`MergeSpec`, without opening a model.

The keys are merge/config.py's `MergeRecipeConfig`; the methods, their parameters and the values
these accept are merge/methods/'s declarations. As in mergekit 0.1.5 (`mergekit/config.py`),
`models:` is one slice over every model's full layer range (the base model added if absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from core.errors import UserError
from merge import methods
from merge.config import MergeRecipeConfig
from merge.io import DTYPE_NAMES
from merge.methods import MergeMethod


@dataclass
class Source:
    model: str
    layer_range: Optional[Tuple[int, int]]
    """None: every layer of the model (the `models:` form)."""
    parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    sources: List[Source]
    parameters: Dict[str, Any] = field(default_factory=dict)
    base_model: Optional[str] = None


@dataclass
class MergeSpec:
    merge_method: str
    slices: List[Slice]
    base_model: Optional[str]
    parameters: Dict[str, Any]
    dtype: Optional[str]
    """safetensors name of the dtype inputs are loaded as (None: promoted input dtype)."""
    out_dtype: Optional[str]
    embed_mismatch: str
    raw: Dict[str, Any]
    """The config as given, for the card and the fingerprint."""


def load_merge_config(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"merge config '{path}' does not exist: give the path of a mergekit YAML file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"merge config '{path}' is not valid YAML{where}: fix the syntax") from err
    if not isinstance(raw, dict):
        raise UserError(f"merge config '{path}' must be a YAML mapping with merge_method and slices or models")
    return raw


def _dtype(raw: Dict[str, Any], key: str) -> Optional[str]:
    value = raw.get(key)
    if value is None:
        return None
    if str(value) not in DTYPE_NAMES:
        raise UserError(f"{key} '{value}' is not supported: use bfloat16, float16, float32 or float64")
    return DTYPE_NAMES[str(value)]


def _params(value: Any, where: str, method: MergeMethod) -> Dict[str, Any]:
    """A `parameters:` mapping checked against the method's declared parameters and values."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}.parameters must be a mapping like {{{method.params[0].name}: ...}}")
    for name, setting in value.items():
        param = method.param(name)
        if param is None:
            raise UserError(
                f"{where}.parameters.{name} is not a parameter of {method.name}: it takes "
                + ", ".join(p.name for p in method.params)
            )
        field_name = f"{where}.parameters.{name}"
        if param.is_bool:
            for flag in _values(setting, field_name):
                if not isinstance(flag, bool):
                    raise UserError(f"{field_name} has {flag!r}: {name} is true or false")
            continue
        for number in _numbers(setting, field_name):
            if param.accepts and not param.accepts[1](number):
                rule = param.accepts[0]
                if name == "weight":
                    raise UserError(f"{field_name} has {number}: {method.name} does not take negative weights; "
                                    f"use weights {rule}")
                raise UserError(f"{field_name} has {number}, outside {rule}: give {name} within {rule}")
    return dict(value)


def _values(setting: Any, where: str) -> List[Any]:
    """Every leaf value of a setting (scalar, gradient or filter list), unchecked."""
    if isinstance(setting, dict):
        if "value" not in setting or set(setting) - {"filter", "value"}:
            raise UserError(f"{where}: each entry needs 'value' and optionally 'filter', got {sorted(setting)}")
        return _values(setting["value"], where)
    if isinstance(setting, list) and setting:
        return [v for item in setting for v in _values(item, where)]
    return [setting]


def _numbers(setting: Any, where: str) -> List[float]:
    """Every number in a parameter setting (scalar, gradient or filter list)."""
    if isinstance(setting, bool):
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, dict):
        if "value" not in setting or set(setting) - {"filter", "value"}:
            raise UserError(f"{where}: each entry needs 'value' and optionally 'filter', got {sorted(setting)}")
        return _numbers(setting["value"], where)
    if isinstance(setting, list) and setting:
        out = []
        for item in setting:
            out += _numbers(item, where)
        return out
    raise UserError(f"{where}: expected a number, a list of numbers or a list of {{filter, value}}, got {setting!r}")


def recipe_keys() -> List[str]:
    return [f.name for f in fields(MergeRecipeConfig)]


def expand_model_shorthand(raw: Dict[str, Any]) -> Dict[str, Any]:
    """`model: X` (the Hydra presets' form) is `models: [{model: X}, {model: base_model}]`."""
    raw = dict(raw)
    model = raw.pop("model", None)
    if model is None:
        return raw
    if raw.get("models") or raw.get("slices"):
        raise UserError("the merge config gives 'model' and also 'models' or 'slices': use one form")
    raw["models"] = [{"model": model}, {"model": raw.get("base_model")}]
    return raw


def check_recipe(raw: Dict[str, Any]) -> MergeSpec:
    """Every check of a mergekit-style recipe (keys: merge/config.py's MergeRecipeConfig) that
    needs no model file: keys, method, parameters and their values, models per slice, dtypes.
    The pipeline planner calls it at plan time, and every merge before it plans."""
    unknown = sorted(set(raw) - set(recipe_keys()))
    if unknown:
        raise UserError(f"unknown merge config key '{unknown[0]}': valid keys are {', '.join(recipe_keys())}")
    raw = expand_model_shorthand(raw)
    method = methods.get(raw.get("merge_method"))
    if bool(raw.get("slices")) == bool(raw.get("models")):
        raise UserError("the merge config needs exactly one of 'slices' or 'models' (both given or neither)")
    base = raw.get("base_model")
    base = str(base) if base is not None else None
    mismatch = raw.get("embed_mismatch", MergeRecipeConfig.embed_mismatch)
    if mismatch not in ("error", "truncate"):
        raise UserError(f"embed_mismatch '{mismatch}' is not supported: use error or truncate")
    if raw.get("tokenizer_source") not in (None, "base"):
        raise UserError("tokenizer_source: only 'base' is supported (the tokenizer is copied from base_model)")

    slices = []
    if raw.get("models"):
        models = raw["models"]
        if not isinstance(models, list):
            raise UserError("models must be a list of {model: PATH}")
        sources = []
        for i, m in enumerate(models):
            m = m if isinstance(m, dict) else {"model": m}
            if "model" not in m:
                raise UserError(f"models[{i}] needs a 'model' path")
            sources.append(Source(str(m["model"]), None, _params(m.get("parameters"), f"models[{i}]", method)))
        if base is not None and base not in [s.model for s in sources]:
            sources.append(Source(base, None))  # mergekit adds the base model to the inputs
        slices.append(Slice(sources))
    else:
        if not isinstance(raw["slices"], list):
            raise UserError("slices must be a list of {sources: [{model, layer_range}, ...]}")
        for i, s in enumerate(raw["slices"]):
            if not isinstance(s, dict) or not s.get("sources"):
                raise UserError(f"slices[{i}] needs 'sources': a list of {{model, layer_range}}")
            sources = []
            for j, src in enumerate(s["sources"]):
                where = f"slices[{i}].sources[{j}]"
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise UserError(f"{where} needs 'model' and 'layer_range: [start, end]'")
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
                    raise UserError(f"{where}.layer_range must be two integers [start, end], got {lr!r}")
                sources.append(Source(str(src["model"]), (lr[0], lr[1]), _params(src.get("parameters"), where, method)))
            slice_base = s.get("base_model")
            slices.append(Slice(sources, _params(s.get("parameters"), f"slices[{i}]", method),
                                str(slice_base) if slice_base is not None else None))
    spec = MergeSpec(
        merge_method=method.name,
        slices=slices,
        base_model=base,
        parameters=_params(raw.get("parameters"), "merge config", method),
        dtype=_dtype(raw, "dtype"),
        out_dtype=_dtype(raw, "out_dtype"),
        embed_mismatch=mismatch,
        raw=raw,
    )
    for i, s in enumerate(slices):
        check_slice_models(method, i, s, s.base_model or base)
        check_required_params(method, i, s, s.base_model or base, spec.parameters)
    return spec


def check_slice_models(method: MergeMethod, i: int, s: Slice, base: Optional[str]) -> None:
    """The slice has the models the method takes: the base among them when it needs one."""
    if method.base_model == "required" and base is None:
        raise UserError(f"merge_method {method.name} needs base_model: set it to the model "
                        + ("that t=0 returns" if method.name == "slerp" else "the others' task vectors start from"))
    models = [src.model for src in s.sources]
    for m in models:
        if models.count(m) > 1:
            raise UserError(f"slices[{i}] lists {m} twice: give each model once")
    uses_base = method.uses_base(base)
    if uses_base and base not in models:
        raise UserError(f"slices[{i}]: base_model '{base}' is not among its sources {models}: "
                        "add it as a source of every slice")
    if method.name == "slerp" and len(models) != 2:
        raise UserError(f"slices[{i}]: slerp merges exactly two models, one of them base_model '{base}'; got {models}")
    problem = method.model_count_problem(len(models), uses_base)
    if problem:
        raise UserError(f"slices[{i}]: {problem}; got {len(models)}: {models}")


def check_required_params(method: MergeMethod, i: int, s: Slice, base: Optional[str], top: Dict[str, Any]) -> None:
    """A parameter without a default is set for every model (or once, when shared) somewhere."""
    uses_base = method.uses_base(base)
    for p in method.params:
        if p.default is not methods.REQUIRED:
            continue
        if not p.per_model:
            if p.name not in s.parameters and p.name not in top:
                raise UserError(f"merge_method {method.name} needs parameters.{p.name}: add it to parameters")
            continue
        for src in s.sources:
            if uses_base and src.model == base:
                continue
            if p.name not in src.parameters and p.name not in s.parameters and p.name not in top:
                raise UserError(f"slices[{i}]: model {src.model} has no {p.name}: add parameters: "
                                f"{{{p.name}: ...}} to it (or to the slice's or the top-level parameters)")
