"""What a finished training stage records about itself for its model card (core/model_card.py
renders it; merge/run.py writes its own record through the same builder)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from core.model_card import installed_versions, lineage_record, write_model_card
from train.lora import adapter_summary
from train.stages import get_stage

VERSIONS = ("torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets")


def start_model(cfg: DictConfig) -> str:
    """The model this stage started from, as a user would name it."""
    if cfg.model.path is None:
        return f"random-init {cfg.model.name}"
    if cfg.model.gguf_file:
        return str(Path(cfg.model.path) / cfg.model.gguf_file)
    return str(Path(cfg.model.path).expanduser().resolve())


def stage_step(cfg: DictConfig, out: Path) -> dict:
    key = get_stage(cfg.stage.name).data
    data = {key: OmegaConf.to_container(cfg.data[key], resolve=True)} if key in cfg.data else {}
    training = OmegaConf.to_container(cfg.training, resolve=True)
    training.pop("finetune", None)  # recorded with the adapter summary
    step = {
        "kind": "stage",
        "name": cfg.stage.name,
        "output": str(out.resolve()),
        "start_model": start_model(cfg),
        "data": data,
        "hyperparameters": {"stage": OmegaConf.to_container(cfg.stage, resolve=True), "training": training,
                            "world_size": int(os.environ.get("WORLD_SIZE", 1))},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": installed_versions(VERSIONS),
        "description": [f"A domainforge **{cfg.stage.name}** stage (`launch/train.py +stage={cfg.stage.name}`) "
                        f"on `{start_model(cfg)}`; the resolved config is in `domainforge.yaml`."],
    }
    step.update(adapter_summary(cfg))
    return step


def write_stage_card(cfg: DictConfig, directory: Path, out: Path) -> None:
    """README.md + lineage.json for the stage whose final model is being written to `directory`
    (published to `out`)."""
    # A start that is no domainforge output becomes a bare "model" record in the lineage.
    write_model_card(directory, lineage_record(stage_step(cfg, out), [start_model(cfg)]), title=out.name)
