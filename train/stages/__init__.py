"""The training-stage registry: every stage `+stage=<name>` can choose, declared once in STAGES.

A stage is one `Stage(schema, data=...)` line below, beside its schema dataclass (the `stage`
node's keys); its hooks are `HOOKS` in train/stages/<name>.py and its preset is
conf/stage/<name>.yaml. This module imports no torch: login-node code (orchestration/,
launch/submit.py) reads the names, schemas and data kinds; the hooks, which import TRL, load
on first use. train/run.py calls the hooks in a fixed order:

    args    = stage.trainer_args(cfg, common_kwargs)    # a TRL config; from here on ZeRO-3 init is live
    data    = stage.prepare_data(cfg, tokenizer)        # validate + tokenize (one rank first, the
                                                        # others read its cache); UserError on bad input
    model   = load_model(...)                           # partitioned across ranks under ZeRO-3
    trainer = stage.build_trainer(cfg, args, model, tokenizer, data, callbacks)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol

from core.errors import UserError
from core.validate import at_least, checked, positive


# ---------------------------------------------------------------------------------------------
# what a stage is
# ---------------------------------------------------------------------------------------------
class StageHooks(Protocol):
    """What train/stages/<name>.py's HOOKS does (train/data/ prepares the data)."""

    def prepare_data(self, cfg, tokenizer): ...

    def trainer_args(self, cfg, common: Dict[str, Any]): ...

    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks: List): ...


@dataclass(frozen=True)
class Stage:
    """One training stage: its `stage` schema (whose `name` is the stage's name) and the
    `data.<kind>` node it trains on."""

    schema: type
    data: str
    """cpt, sft, mixed or preference: the data node this stage reads (train/data/<kind>.py)."""

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def preset(self) -> str:
        return f"conf/stage/{self.name}.yaml"

    def hooks(self) -> StageHooks:
        """train/stages/<name>.py's HOOKS (imports TRL: training processes only)."""
        return importlib.import_module(f"{__name__}.{self.name}").HOOKS

    def prepare_data(self, cfg, tokenizer):
        return self.hooks().prepare_data(cfg, tokenizer)

    def trainer_args(self, cfg, common: Dict[str, Any]):
        return self.hooks().trainer_args(cfg, common)

    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks: List):
        return self.hooks().build_trainer(cfg, args, model, tokenizer, data, callbacks)


# ---------------------------------------------------------------------------------------------
# the stages: one schema and one declaration each
# ---------------------------------------------------------------------------------------------
@dataclass
class CPTStageConfig:
    name: str = "cpt"


@dataclass
class SFTStageConfig:
    name: str = "sft"
    packing: bool = False
    """Pack several examples per row; a block-diagonal mask keeps them from attending to
    each other."""
    assistant_only_loss: bool = True
    """Loss on assistant tokens only."""


@dataclass
class MixedStageConfig:
    name: str = "mixed"
    packing: bool = True
    """Pack several examples per row (best fit); a block-diagonal mask keeps them from attending
    to each other. false: one example (a document chunk or a chat) per row."""
    assistant_only_loss: bool = True
    """Loss on the assistant tokens of the chat sources (text sources: on every token)."""


@dataclass
class DPOStageConfig:
    name: str = "dpo"
    beta: float = checked(0.1, positive)
    loss_type: str = "sigmoid"
    ref_model_path: Optional[str] = None
    """Reference model; None = the starting model (model.path)."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once, cache them on disk keyed by model and data."""
    max_prompt_length: int = checked(1024, at_least(1))
    max_length: int = checked(2048, at_least(2))


@dataclass
class ORPOStageConfig:
    name: str = "orpo"
    beta: float = checked(0.1, positive)
    """lambda, the weight of the odds-ratio term."""
    max_prompt_length: int = checked(1024, at_least(1))
    max_length: int = checked(2048, at_least(2))


STAGES: Dict[str, Stage] = {stage.name: stage for stage in (
    Stage(CPTStageConfig, data="cpt"),
    Stage(SFTStageConfig, data="sft"),
    Stage(MixedStageConfig, data="mixed"),
    Stage(DPOStageConfig, data="preference"),
    Stage(ORPOStageConfig, data="preference"),
)}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}': choose one of {', '.join(STAGES)}")
    return STAGES[name]
