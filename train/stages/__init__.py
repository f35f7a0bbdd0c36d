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
from typing import Any, Dict, List, Protocol

from core.errors import UserError
from train.config import STAGES
from train.data import PreparedData


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
