"""Training stages. Each stage module defines a `STAGE` object with the three hooks below;
train/run.py calls them in a fixed order:

    args    = stage.trainer_args(cfg, common_kwargs)    # a TRL config; from here on ZeRO-3 init is live
    data    = stage.prepare_data(cfg, tokenizer)        # validate + tokenize (one rank first, the
                                                        # others read its cache); UserError on bad input
    model   = load_model(...)                           # partitioned across ranks under ZeRO-3
    trainer = stage.build_trainer(cfg, args, model, tokenizer, data, callbacks)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol

from core.errors import UserError
from train.config import STAGES


@dataclass
class PreparedData:
    """What a stage trains on, ready for its trainer."""

    train_dataset: Any
    data_collator: Optional[Callable] = None
    stats: Dict[str, float] = field(default_factory=dict)
    """Logged once at the start (e.g. packing_efficiency, num_tokens, truncated_rows, and a
    mix's per-source shares mix/<name>/rows and mix/<name>/tokens)."""
    eval_dataset: Any = None
    """The eval split, prepared like train_dataset (same collator); None: no evaluation."""
    eval_prompts: List[Any] = field(default_factory=list)
    """Raw prompts of the first training.log_completions eval rows, for logged completions."""


class Stage(Protocol):
    name: str

    def prepare_data(self, cfg, tokenizer) -> PreparedData: ...

    def trainer_args(self, cfg, common: Dict[str, Any]): ...

    def build_trainer(self, cfg, args, model, tokenizer, data: PreparedData, callbacks: List): ...


def get_stage(name: str) -> Stage:
    """The stage registered in train/config.py as STAGE_SCHEMAS[name]: train/stages/<name>.py."""
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}': choose one of {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}").STAGE
