"""The merge's two schemas, each written once:

- `MergeRecipeConfig`: a mergekit-style recipe. The Hydra `merge` group (conf/merge/) is typed
  by it. merge/recipe.py's `check_recipe` takes the valid keys (and embed_mismatch's default)
  from it and checks, for a YAML file and the Hydra form alike, what types cannot say (the
  method's parameters and their values, the models each slice needs, ...).
- `MergeOptions`: how to run a merge. `launch/merge.py`'s flags are generated from its fields
  (`add_merge_options`, as mergekit does), and the Hydra form's root `MergeJobConfig` extends it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from core.errors import UserError
from core.validate import at_least, checked, non_negative, one_of, positive, validate_dataclass, writable_dir
from merge import methods

if TYPE_CHECKING:
    from omegaconf import DictConfig

# omegaconf.MISSING. Hydra and omegaconf are imported only by the Hydra form: the file form
# (`launch/merge.py CONFIG.yml OUT`) would spend ~0.08 s of CPU on them for nothing.
MISSING = "???"


@dataclass
class MergeRecipeConfig:
    merge_method: str = checked(MISSING, one_of(*methods.names()))
    """A method of merge/methods/, registered by name (docs/merge.md's table; `launch/merge.py
    --help` lists each with its parameters)."""
    base_model: Optional[str] = None
    """The base model: v0 of slerp (t=0 returns it), the origin of the task vectors of the
    task-arithmetic family, model_stock and nuslerp; its tokenizer, chat template and config are
    copied to the output."""
    model: Optional[str] = None
    """The other (e.g. fine-tuned) model: shorthand for models: [{model: ...}, {model: base}]
    when neither `models` nor `slices` is given."""
    models: Optional[List[Any]] = None
    """mergekit `models:` form: [{model: PATH, parameters: {...}}, ...]."""
    slices: Optional[List[Any]] = None
    """mergekit `slices:` form: [{sources: [{model: PATH, layer_range: [0, 32]}, ...]}]."""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """The method's parameters (merge/methods/, e.g. t for slerp; weight, density, lambda for
    ties), each a number, a gradient list or [{filter, value}, ...]; per-model ones may also sit
    in each model's own `parameters`."""
    dtype: Optional[str] = None
    """Inputs are rounded to this dtype before the math; also the output dtype. None: the
    inputs' own (promoted) dtype, as mergekit does."""
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    """Only `base` (or unset): the tokenizer is copied from base_model."""
    embed_mismatch: str = "error"
    """error, or truncate: keep the common embedding rows when vocabularies differ."""


def option(default, help: str, flag: Optional[str] = None, aliases: tuple = (), check: tuple = ()):
    """A MergeOptions field with its command-line help (and a flag name when it is not
    --<field-name>) and its value checks (core.validate)."""
    return field(default=default, metadata={"help": help, "flag": flag, "aliases": aliases, "check": check})


@dataclass
class MergeOptions:
    shard_size: str = option("2GB", "output shard size, e.g. 2GB, 500MB (a larger tensor gets a shard of its own)",
                             aliases=("--out-shard-size",))  # mergekit's name
    workers: Optional[int] = option(None, "worker processes on this machine (default: one per CPU, at most 4)",
                                    check=(at_least(1),))
    num_workers: Optional[int] = option(None, "independent workers over a shared filesystem (default: SLURM_NTASKS)",
                                        check=(at_least(1),))
    worker_rank: Optional[int] = option(None, "this worker's rank among num_workers (default: SLURM_PROCID)",
                                        check=(non_negative,))
    verify: bool = option(False, "re-read the output before publishing: every tensor present, right shape, finite")
    wait_timeout: float = option(4 * 3600.0, "seconds worker 0 waits for the other workers' shards", check=(positive,))
    chunk_elements: int = option(8 * 1024 * 1024,
                                 "elements mapped per input at a time (8M: 32 MB for two bf16 inputs); bounds memory",
                                 check=(at_least(1),))
    progress: bool = option(True, "show a progress bar", flag="--quiet")
    random_seed: int = option(0, "seed of the randomised methods (dare_*, della*): the same seed gives the same "
                                 "tensors on any number of workers or nodes")

    def __post_init__(self):
        # The CLI form builds this from argparse flags; the Hydra form is checked at composition.
        validate_dataclass(self)


def add_merge_options(parser: argparse.ArgumentParser) -> None:
    """One flag per MergeOptions field, with its default and help."""
    for f in fields(MergeOptions):
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if f.type == "bool":
            # --verify turns a False default on; --quiet turns progress (True) off.
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=f.default,
                                help=f"turn off: {meta['help']}" if f.default else meta["help"])
            continue
        kind = {"Optional[int]": int, "int": int, "float": float, "str": str}[f.type]
        parser.add_argument(flag, *meta["aliases"], dest=f.name, type=kind, default=f.default, help=meta["help"])


def options_from(cfg) -> MergeOptions:
    """MergeOptions from the composed Hydra config or the CLI's parsed arguments (same names)."""
    return MergeOptions(**{f.name: getattr(cfg, f.name) for f in fields(MergeOptions)})


@dataclass
class MergeJobConfig(MergeOptions):
    """Root of the Hydra form `launch/merge.py merge=<preset> output_dir=...` (conf/merge_job.yaml)."""

    merge: MergeRecipeConfig = MISSING
    output_dir: str = checked(MISSING, writable_dir)
    """The merged model directory (written via a hidden sibling, renamed when complete)."""


HINTS = {
    "output_dir": "output_dir=PATH (the merged model directory)",
    "merge.base_model": "merge.base_model=PATH (the model t=0 returns, e.g. the Instruct model)",
    "merge.model": "merge.model=PATH (the model to merge into merge.base_model, e.g. the fine-tuned one)",
}


def compose_merge_config(overrides: List[str]) -> DictConfig:
    """conf/merge_job.yaml + overrides; UserError (one line) on a typo or an unset key."""
    from omegaconf import OmegaConf

    from core.config import compose_config

    cfg = compose_config(overrides, "merge_job", MergeJobConfig)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if cfg.merge.models is None and cfg.merge.slices is None:
        # The shorthand form needs both models. A preset's `model: ???` does not survive
        # composition (a MISSING value merged onto the schema's None default keeps the None).
        missing += [f"merge.{key}" for key in ("base_model", "model") if cfg.merge[key] is None]
    if missing:
        key = missing[0]
        raise UserError(f"{key} is not set: add {HINTS.get(key, key + '=...')}")
    return cfg


@lru_cache(maxsize=None)
def merge_command():
    """The Hydra form of launch/merge.py (core.cli's ConfigCommand): --help, --cfg, or the merge job to run."""
    from core.cli import ConfigCommand

    return ConfigCommand(
        "merge.py", "merge_job", MergeJobConfig, compose_merge_config,
        keys=("merge.model", "merge.base_model", "output_dir", "workers", "shard_size", "verify"),
        example="merge=slerp_half merge.model=outputs/orpo-tiny merge.base_model=/models/Instruct output_dir=outputs/m",
    )


def recipe_from_config(cfg: DictConfig) -> dict:
    """The recipe of a composed `merge` node, as the mergekit-style dict a YAML file gives."""
    from omegaconf import OmegaConf

    recipe = OmegaConf.to_container(cfg.merge, resolve=True)
    return {k: v for k, v in recipe.items() if v is not None and v != {}}
