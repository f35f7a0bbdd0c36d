"""Hydra schema of `launch/merge.py merge=<preset> output_dir=...` (conf/merge_job.yaml).

The `merge` group holds a mergekit-style recipe; presets in conf/merge/ name the models as
keys (`merge.model`, `merge.base_model`) so that a pipeline can set them after training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from merge.plan import parse_size
from merge.run import MergeOptions


@dataclass
class MergeRecipeConfig:
    merge_method: str = "slerp"
    """slerp or linear."""
    base_model: str = MISSING
    """Model directory that t=0 returns; its tokenizer, chat template and config are copied."""
    model: Optional[str] = None
    """The other (e.g. fine-tuned) model. Shorthand for models: [{model: ...}, {model: base}]
    when neither `models` nor `slices` is given."""
    models: Optional[List[Any]] = None
    """mergekit `models:` form: [{model: PATH, parameters: {...}}, ...]."""
    slices: Optional[List[Any]] = None
    """mergekit `slices:` form: [{sources: [{model: PATH, layer_range: [0, 32]}, ...]}]."""
    parameters: Dict[str, Any] = field(default_factory=dict)
    """t (slerp) as a number, a gradient list or [{filter, value}, ...]; weight (linear)."""
    dtype: Optional[str] = "bfloat16"
    """Inputs are rounded to this dtype before the math; also the output dtype."""
    out_dtype: Optional[str] = None
    embed_mismatch: str = "error"
    """error, or truncate: keep the common embedding rows when vocabularies differ."""


@dataclass
class MergeJobConfig:
    merge: MergeRecipeConfig = MISSING
    output_dir: str = MISSING
    """The merged model directory (written via a hidden sibling, renamed when complete)."""
    workers: Optional[int] = None
    """Worker processes on this machine; null: one per available CPU, at most 4."""
    num_workers: Optional[int] = None
    """Independent workers over a shared filesystem; default SLURM_NTASKS."""
    worker_rank: Optional[int] = None
    """This process's rank among num_workers; default SLURM_PROCID."""
    shard_size: str = "2GB"
    verify: bool = False
    wait_timeout: float = 14400.0
    """Seconds worker 0 waits for the other workers' shards."""
    progress: bool = True


def register_merge_configs() -> None:
    ConfigStore.instance().store(name="merge_job_schema", node=MergeJobConfig)


HINTS = {
    "output_dir": "output_dir=PATH (the merged model directory)",
    "merge.base_model": "merge.base_model=PATH (the model t=0 returns, e.g. the Instruct model)",
    "merge.model": "merge.model=PATH (the model to merge into merge.base_model, e.g. the fine-tuned one)",
}


def compose_merge_config(overrides: List[str]) -> DictConfig:
    """conf/merge_job.yaml + overrides; UserError (one line) on a typo or an unset key."""
    from train.config import compose_config
    from train.errors import UserError

    register_merge_configs()
    cfg = compose_config(overrides, "merge_job", schema=MergeJobConfig)  # errors name merge/config.py
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise UserError(f"{key} is not set: add {HINTS.get(key, key + '=...')}")
    return cfg


def recipe_from_config(cfg: DictConfig) -> dict:
    """The mergekit-style dict of a composed `merge` node."""
    recipe = OmegaConf.to_container(cfg.merge, resolve=True)
    model = recipe.pop("model", None)
    if not recipe.get("models") and not recipe.get("slices"):
        if model is None:
            from train.errors import UserError

            raise UserError(f"merge.model is not set: add {HINTS['merge.model']}")
        recipe["models"] = [{"model": model}, {"model": recipe["base_model"]}]
    return {k: v for k, v in recipe.items() if v is not None and not (k in ("models", "slices") and not v)}


def options_from_config(cfg) -> MergeOptions:
    """MergeOptions from the composed Hydra config or the CLI's parsed arguments (same names)."""
    return MergeOptions(
        shard_size=parse_size(cfg.shard_size),
        workers=cfg.workers,
        num_workers=cfg.num_workers,
        worker_rank=cfg.worker_rank,
        verify=cfg.verify,
        wait_timeout=cfg.wait_timeout,
        progress=cfg.progress,
    )
