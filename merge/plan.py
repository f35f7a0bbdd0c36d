"""A checked recipe (merge/recipe.py) -> a per-tensor merge plan, from the models' headers only.

Semantics follow mergekit 0.1.5 (`mergekit/plan.py`): within a slice of N layers, layer i has
depth d = i/(N-1) (d = 1 when N = 1); tensors outside the layers (embeddings, final norm,
lm_head) use d = 0; every parameter is resolved per tensor at its depth (merge/params.py).
merge/shards.py then lays the planned tensors out in output shards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from core.errors import UserError
from merge import methods
from merge.io import ITEMSIZE, ModelReader, promote
from merge.params import resolve
from merge.recipe import MergeSpec, Slice

LAYER_NAME = re.compile(r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)\.(?P<rest>.+)$")


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
