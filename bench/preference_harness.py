"""In-process DPO/ORPO trainers on the tiny model, one process, no DeepSpeed: for unit tests
(tests/test_dpo_reference.py, test_orpo_loss.py, test_lora.py) and bench/dpo_precompute.py.
The stage code is the real one; only the launcher is skipped."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch
from transformers import set_seed

from train.config import compose_train_config
from train.model import load_model, load_tokenizer
from train.stages import get_stage


def compose(stage: str, *overrides: str):
    # 16 pairs are plenty for a unit test and keep the reference precompute to a few forwards
    return compose_train_config([f"+stage={stage}", "data.preference.max_samples=16", *overrides])


def trainer_for(cfg, out: Path, batch_size: int = 2, max_steps: int = 2, learning_rate: float = 1e-3):
    """(stage, trainer) for `cfg` with the policy built exactly as train/run.py builds it."""
    stage = get_stage(cfg.stage.name)
    tokenizer = load_tokenizer(cfg.model)
    data = stage.prepare_data(cfg, tokenizer)
    common = dict(
        output_dir=str(out),
        report_to=["none"],
        bf16=False,
        fp16=False,
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=cfg.training.seed,
        gradient_checkpointing=False,
        disable_tqdm=True,
    )
    args = stage.trainer_args(cfg, common)
    set_seed(cfg.training.seed)
    model = load_model(cfg.model, torch.float32, tokenizer)
    return stage, stage.build_trainer(cfg, args, model, tokenizer, data, [])


def batch_of(trainer, rows: List[int]):
    """The collated batch the trainer would see for these dataset rows."""
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])
