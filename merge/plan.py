"""A mergekit YAML -> a per-tensor merge plan and an output shard layout, from headers only.

Semantics follow mergekit 0.1.5 (`mergekit/plan.py`, `mergekit/config.py`):
- `models:` is one slice over every model's full layer range (the base model added if absent);
- within a slice of N layers, layer i has depth d = i/(N-1) (d = 1 when N = 1); tensors
  outside the layers (embeddings, final norm, lm_head) use d = 0;
- a parameter is looked up in the slice's `parameters`, then the top-level `parameters`
  (per-model parameters such as linear `weight` first in the source's own `parameters`);
- a value is a number, a gradient (list of anchors, linearly interpolated at d·(K-1)) or a
  list of {filter, value}: the first entry whose filter is a substring of the tensor name (or
  that has no filter) wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from core.errors import UserError
from merge import methods
from merge.config import MergeRecipeConfig
from merge.methods import MergeMethod
from merge.io import DTYPE_NAMES, ITEMSIZE, ModelReader, promote, shard_header

LAYER_NAME = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)\.(?P<rest>.+)$")


# ---------------------------------------------------------------------------------------------
# the merge config
# ---------------------------------------------------------------------------------------------
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
    The pipeline planner calls it at plan time; `parse_merge_config` is the same check."""
    unknown = sorted(set(raw) - set(recipe_keys()))
    if unknown:
        raise UserError(f"unknown merge config key '{unknown[0]}': valid keys are {', '.join(recipe_keys())}")
    raw = expand_model_shorthand(raw)
    method = methods.get(raw.get("merge_method"))
    if bool(raw.get("slices")) == bool(raw.get("models")):
        raise UserError("the merge config needs exactly one of 'slices' or 'models' (both given or neither)")
    base = raw.get("base_model")
    base = str(base) if base is not None else None
    if method.base_model == "required" and base is None:
        raise UserError(f"merge_method {method.name} needs base_model: set it to the model "
                        + ("that t=0 returns" if method.name == "slerp" else "the others' task vectors start from"))
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


def parse_merge_config(raw: Dict[str, Any]) -> MergeSpec:
    """Validate a mergekit-style config without touching the models (see check_recipe)."""
    return check_recipe(raw)


def check_slice_models(method: MergeMethod, i: int, s: Slice, base: Optional[str]) -> None:
    """The slice has the models the method takes: the base among them when it needs one."""
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


# ---------------------------------------------------------------------------------------------
# parameter values per tensor
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the per-tensor plan
# ---------------------------------------------------------------------------------------------
@dataclass
class TensorPlan:
    name: str
    shape: Tuple[int, ...]
    work_dtype: str
    """Inputs are rounded to this dtype before the math (mergekit's `dtype`)."""
    out_dtype: str
    sources: List[Tuple[str, str]]
    """(model path, tensor name); for slerp the base model first (v0)."""
    method: str
    params: Dict[str, Any] = field(default_factory=dict)
    """Each of the method's parameters resolved for this tensor; a per-model one is a list in
    `sources` order (without the base model when the method uses one)."""
    has_base: bool = False
    """sources[0] is the base model (v0 of SLERP, the origin of the task vectors)."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.out_dtype]


@dataclass
class MergePlan:
    spec: MergeSpec
    tensors: List[TensorPlan]
    base_model: str
    """The model whose config, tokenizer and generation config the output gets."""
    vocab_rows: Optional[int] = None
    """Set when embed_mismatch: truncate cut the vocabulary to this many rows."""
    warnings: List[str] = field(default_factory=list)


def _is_vocab(name: str) -> bool:
    return "embed" in name or "lm_head" in name


@dataclass
class ModelLayout:
    """A model's tensor names, split into numbered layers and the rest."""

    layers: Dict[int, Dict[str, str]]
    """{layer index: {name within the layer: full tensor name}}."""
    others: List[str]
    """Tensors outside the layers: embeddings, final norm, lm_head."""
    num_layers: int


def model_layout(reader: ModelReader) -> ModelLayout:
    layers: Dict[int, Dict[str, str]] = {}
    others = []
    for name in reader.tensors:
        m = LAYER_NAME.match(name)
        if m:
            layers.setdefault(int(m["index"]), {})[m["rest"]] = name
        else:
            others.append(name)
    count = (reader.config or {}).get("num_hidden_layers") or (max(layers) + 1 if layers else 0)
    return ModelLayout(layers, others, int(count))


class MergePlanner:
    """Plans a merge in named steps, as mergekit's MergePlanner does:

        plan()                      every slice, embeddings first and norm/head last
          plan_non_layer(slice)     tensors outside the layers, at depth 0
          plan_slice(slice)         check the layer ranges, then each layer at its depth
            plan_layer(...)         the tensors of one output layer
              plan_tensor(...)      shapes, dtypes and t (or weights) for one output tensor
    """

    def __init__(self, spec: MergeSpec, open_model):
        self.spec = spec
        self.open_model = open_model
        self.tensors: List[TensorPlan] = []
        self.warnings: List[str] = []
        self.vocab_rows: Optional[int] = None
        self.out_layer = 0
        self._layouts: Dict[str, ModelLayout] = {}

    def layout(self, model: str) -> ModelLayout:
        if model not in self._layouts:
            self._layouts[model] = model_layout(self.open_model(model))
        return self._layouts[model]

    def plan(self) -> MergePlan:
        slices = self.spec.slices
        self.plan_non_layer(slices[0], lambda n: "embed" in n)
        for i, s in enumerate(slices):
            self.plan_slice(i, s)
        self.plan_non_layer(slices[-1], lambda n: "embed" not in n)
        base = self.spec.base_model or slices[0].sources[0].model
        return MergePlan(self.spec, self.tensors, base, self.vocab_rows, self.warnings)

    def plan_non_layer(self, s: Slice, keep) -> None:
        """Tensors outside the layers: from the first slice (embeddings) or the last (norm, head)."""
        models = [src.model for src in s.sources]
        per_model = [set(self.layout(m).others) for m in models]
        for name in sorted(set().union(*per_model)):
            if not keep(name):
                continue
            for m, have in zip(models, per_model):
                if name not in have:
                    other = next(o for o, h in zip(models, per_model) if name in h)
                    tied = " (tie_word_embeddings differs between them)" if "lm_head" in name else ""
                    raise UserError(
                        f"tensor '{name}' is in {other} but missing from {m}{tied}: both models must share one architecture"
                    )
            self.plan_tensor(name, [name] * len(models), models, s, 0.0)

    def layer_ranges(self, i: int, s: Slice) -> List[Tuple[int, int]]:
        """Each source's layer range, checked against its model and against each other."""
        ranges = []
        for src in s.sources:
            count = self.layout(src.model).num_layers
            lr = src.layer_range if src.layer_range is not None else (0, count)
            if not (0 <= lr[0] < lr[1] <= count):
                raise UserError(
                    f"layer_range {list(lr)} of {src.model} is outside the model, which has {count} layers: "
                    f"use a range within [0, {count}]"
                )
            ranges.append(lr)
        if len({b - a for a, b in ranges}) != 1:
            raise UserError(
                f"slices[{i}]: the sources span different numbers of layers {[list(r) for r in ranges]}; "
                "give every source a layer_range of the same length"
            )
        return ranges

    def plan_slice(self, i: int, s: Slice) -> None:
        ranges = self.layer_ranges(i, s)
        n_layers = ranges[0][1] - ranges[0][0]
        for offset in range(n_layers):
            depth = offset / (n_layers - 1) if n_layers > 1 else 1.0
            self.plan_layer(s, [r[0] + offset for r in ranges], depth)
            self.out_layer += 1

    def plan_layer(self, s: Slice, indices: List[int], depth: float) -> None:
        """Output layer `self.out_layer` from layer indices[k] of source k."""
        models = [src.model for src in s.sources]
        per_model = [self.layout(m).layers.get(index, {}) for m, index in zip(models, indices)]
        if not per_model[0]:
            raise UserError(
                f"layer {indices[0]} of {models[0]} has no tensors although its config.json "
                "counts it (num_hidden_layers): the checkpoint is incomplete; re-save or re-download it"
            )
        for m, index, layer in zip(models, indices, per_model):
            for rest in sorted(set().union(*per_model) - set(layer)):
                other = next(o for o, l in zip(models, per_model) if rest in l)
                name = next(l[rest] for l in per_model if rest in l)
                raise UserError(
                    f"tensor '{name}' is in {other} but layer {index} of {m} has no '{rest}': "
                    "both models must share one architecture"
                )
        for rest in per_model[0]:
            names = [layer[rest] for layer in per_model]
            prefix = LAYER_NAME.match(names[0])["prefix"]
            self.plan_tensor(f"{prefix}{self.out_layer}.{rest}", names, models, s, depth)

    def common_shape(self, names: List[str], models: List[str], infos) -> Tuple[int, ...]:
        """The output shape; vocabularies of different sizes are cut only with embed_mismatch: truncate."""
        shape = infos[0].shape
        for m, n, inf in zip(models[1:], names[1:], infos[1:]):
            if inf.shape == shape:
                continue
            if _is_vocab(n) and inf.shape[1:] == shape[1:] and len(shape) >= 1:
                if self.spec.embed_mismatch != "truncate":
                    raise UserError(
                        f"vocabulary mismatch: '{n}' has {shape[0]} rows in {models[0]} and {inf.shape[0]} in {m}; "
                        "merge models with the same tokenizer, or set embed_mismatch: truncate to keep the common rows"
                    )
                rows = min(shape[0], inf.shape[0])
                self.warnings.append(f"embed_mismatch: truncate: '{n}' cut to its first {rows} rows "
                                     f"({models[0]}: {shape[0]}, {m}: {inf.shape[0]})")
                shape = (rows,) + tuple(shape[1:])
                self.vocab_rows = rows
            else:
                raise UserError(
                    f"shape mismatch for '{n}': {list(shape)} in {models[0]} vs {list(inf.shape)} in {m}; "
                    "both models must share one architecture"
                )
        return tuple(shape)

    def work_dtype(self, names: List[str], models: List[str], infos) -> str:
        for m, n, inf in zip(models, names, infos):
            if inf.dtype not in ITEMSIZE:
                raise UserError(f"'{n}' in {m} is {inf.dtype}: only floating-point weights (BF16, F16, F32, F64) merge")
        if self.spec.dtype is not None:
            return self.spec.dtype
        work = infos[0].dtype
        for inf in infos[1:]:
            work = promote(work, inf.dtype)
        return work

    def plan_tensor(self, out_name: str, names: List[str], models: List[str], s: Slice, depth: float) -> None:
        spec = self.spec
        method = methods.get(spec.merge_method)
        infos = [self.open_model(m).info(n) for m, n in zip(models, names)]
        shape = self.common_shape(names, models, infos)
        work = self.work_dtype(names, models, infos)
        plan = TensorPlan(out_name, shape, work, spec.out_dtype or work, list(zip(models, names)), spec.merge_method)
        base = s.base_model or spec.base_model
        sources = list(s.sources)
        if method.uses_base(base):
            first = models.index(base)  # the base model goes first (v0, the task vectors' origin)
            order = [first] + [k for k in range(len(models)) if k != first]
            plan.sources = [plan.sources[k] for k in order]
            sources = [sources[k] for k in order]
            plan.has_base = True
        per_model_sources = sources[1:] if plan.has_base else sources
        for p in method.params:
            default = None if p.default is methods.REQUIRED else p.default
            if p.per_model:
                value = [resolve(p.name, out_name, depth, [src.parameters, s.parameters, spec.parameters], default)
                         for src in per_model_sources]
                value = [bool(v) if p.is_bool else float(v) for v in value]
            else:
                value = resolve(p.name, out_name, depth, [s.parameters, spec.parameters], default)
                value = bool(value) if p.is_bool else float(value)
            plan.params[p.name] = value
        problem = method.check_values(plan.params)
        if problem:
            raise UserError(f"tensor '{out_name}': {problem}")
        self.tensors.append(plan)


def plan_merge(spec: MergeSpec, open_model) -> MergePlan:
    """Every output tensor with its sources and t, checked against the models' headers.

    `open_model(path) -> ModelReader` (cached by the caller)."""
    return MergePlanner(spec, open_model).plan()


# ---------------------------------------------------------------------------------------------
# output shards
# ---------------------------------------------------------------------------------------------
@dataclass
class ShardPlan:
    filename: str
    tensors: List[TensorPlan]
    offsets: List[int]
    """Absolute byte offset of each tensor in the file."""
    head: bytes
    size: int


_SIZE_UNITS = {
    "": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "B": 10**9,  # mergekit's --out-shard-size 5B means five billion
    "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text) -> int:
    """Bytes from '2GB', '500MB', '1.5GiB', '5B' (mergekit's 5 billion) or a plain number."""
    if isinstance(text, int) and text > 0:
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m[2].upper() if m else None
    if not m or unit not in _SIZE_UNITS or float(m[1]) <= 0:
        raise UserError(f"shard size '{text}' is not a size: write e.g. 2GB, 500MB or 1GiB")
    return int(float(m[1]) * _SIZE_UNITS[unit])


def plan_output_shards(tensors: List[TensorPlan], max_shard_bytes: int) -> List[ShardPlan]:
    """Pack tensors in order into shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own), named as transformers names them."""
    groups: List[List[TensorPlan]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    shards = []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        head, offsets = shard_header([(t.name, t.out_dtype, t.shape, t.nbytes) for t in group], {"format": "pt"})
        shards.append(ShardPlan(name, group, offsets, head, len(head) + sum(t.nbytes for t in group)))
    return shards
