"""Run directories: where checkpoints go, which one to resume from, and how the final model
is published so that a half-written one never looks finished.

    <output_dir>/checkpoints/checkpoint-<step>/   DeepSpeed checkpoints (every save_steps)
    <output_dir>/domainforge.yaml                 the resolved config, written when training starts
    <output_dir>/config.json, model*.safetensors, tokenizer*, domainforge.yaml
                                                  the final model; config.json is moved in last
    <output_dir>/epochs/epoch-<k>/                the model that ended epoch k (keep_epoch_models)
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME

from core.checkpoints import (  # noqa: F401  (re-exported: where the run directory is described)
    BATCH_RECORD,
    CHECKPOINTS,
    CONVERSION_FAILED,
    UNIVERSAL_LATEST,
    checkpoints_dir,
    is_complete_checkpoint,
    newest_complete_checkpoint,
    resume_checkpoint,
)
from omegaconf import DictConfig

from core.config import resolved_yaml
from core.errors import UserError
from core.outputs import epoch_model_dir, write_atomic
from core.safetensors_header import read_model_headers

FINAL_TMP = ".final-tmp"
RUN_CONFIG = "domainforge.yaml"


def write_run_config(cfg: DictConfig) -> None:
    """<output_dir>/domainforge.yaml as a run starts, so the values it trains with can be read
    while it runs. Only config.json marks a finished model (core.outputs.is_model_dir); the
    final save publishes this file again beside the model."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_CONFIG, resolved_yaml(cfg))


def set_checkpoints_aside(output_dir: str | Path) -> Optional[Path]:
    """resume=never: an earlier run's checkpoints move out of the way before this run saves its
    own. Left in place they would mix with this run's (a checkpoint-<k> beyond this run's steps
    outlives the rotation and a later resume=auto picks it; a reused checkpoint-<k> keeps the old
    run's per-rank files). Moved, not deleted: they are the user's, and a rename costs nothing."""
    root = checkpoints_dir(output_dir)
    if not (root.is_dir() and any(root.iterdir())):
        return None
    aside = root.with_name(f"{root.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(aside)
    print(f"resume=never: moved the earlier run's checkpoints to {aside} (delete it when no longer needed)",
          flush=True)
    return aside


def check_holds_weights(model_dir: Path) -> None:
    """A model directory about to be published must hold weights: config.json alone would count
    as finished and never be redone (ZeRO-3 with stage3_gather_16bit_weights_on_model_save=false,
    even through deepspeed.extra, saves only config.json and DeepSpeed shards)."""
    if any(header.tensors for header in read_model_headers(model_dir).values()):
        return
    raise UserError(
        f"the final model in {model_dir} holds no weights (no tensors in *.safetensors), so it was not published: "
        "set deepspeed.stage3_gather_16bit_weights_on_model_save=true (and drop any deepspeed.extra that turns "
        "it off), then rerun the same command: it resumes from the newest checkpoint"
    )


def publish_final_model(output_dir: str | Path) -> None:
    """Move the final model from <output_dir>/.final-tmp into place, config.json last; refused
    when it holds no weights."""
    out = Path(output_dir)
    tmp = out / FINAL_TMP
    check_holds_weights(tmp)
    files = sorted(p for p in tmp.iterdir() if p.name != "config.json")
    umask = os.umask(0)
    os.umask(umask)
    for src in files:
        if src.is_file():
            # transformers writes the weights through a private (0600) temporary file; on a
            # shared cluster the model must be readable as the user's umask allows, like the rest.
            os.chmod(src, 0o666 & ~umask)
        dst = out / src.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    os.replace(tmp / "config.json", out / "config.json")
    tmp.rmdir()


# What a checkpoint holds besides the model: DeepSpeed and Trainer state, not for evaluation.
TRAINING_STATE = (
    "trainer_state.json", "training_args.bin", "latest", UNIVERSAL_LATEST, "zero_to_fp32.py", "zero_to_torch.py",
    "scheduler.pt", BATCH_RECORD, CONVERSION_FAILED,
)


def keep_epoch_model(checkpoint: Path, target: Path) -> None:
    """Hard-link a checkpoint's model files (consolidated weights, config, tokenizer) into
    `target`, config.json last: checkpoints rotate (save_total_limit), the links stay."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = [p for p in checkpoint.iterdir()
             if p.is_file() and p.name not in TRAINING_STATE and not p.name.startswith(("rng_state", "global_step"))]
    for src in sorted(files, key=lambda p: p.name == "config.json"):
        os.link(src, tmp / src.name)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


class EpochModelCallback(TrainerCallback):
    """training.keep_epoch_models: a checkpoint at every epoch end, and its model kept in
    <output_dir>/epochs/epoch-<k>/ (the paper's CPT-epoch curve evaluates each)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_epoch_end(self, args, state, control, **kwargs):
        control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        epoch = epoch_ended(state)
        if not state.is_world_process_zero or epoch is None:
            return control
        checkpoint = checkpoints_dir(self.output_dir) / f"checkpoint-{state.global_step}"
        keep_epoch_model(checkpoint, epoch_model_dir(self.output_dir, epoch))
        return control


def epoch_ended(state) -> Optional[int]:
    """The epoch (1, 2, ...) the Trainer's state is at the end of; None within an epoch."""
    epoch = round(state.epoch or 0)
    return epoch if epoch >= 1 and abs(state.epoch - epoch) <= 1e-6 else None


def save_models_only_where_kept(trainer, keep_epoch_models: bool) -> None:
    """Checkpoints hold DeepSpeed's shards, which a resume loads, and no consolidated model:
    under ZeRO-3 each one was gathered layer by layer onto rank 0 and written while the other
    ranks waited (2 bytes per parameter: 16 GB for an 8B model at every save_steps). The final
    save calls save_model itself; with keep_epoch_models an epoch's last checkpoint keeps its
    model (EpochModelCallback links it into epochs/)."""
    save_model = trainer.save_model

    def save(output_dir=None, _internal_call=False):
        if _internal_call and not (keep_epoch_models and epoch_ended(trainer.state) is not None):
            # a checkpoint (Trainer._save_checkpoint): its shards follow; the arguments it ran
            # with stay in it, as in every HF checkpoint
            if trainer.args.should_save:
                ckpt = Path(output_dir or trainer.args.output_dir)
                ckpt.mkdir(parents=True, exist_ok=True)
                torch.save(trainer.args, ckpt / TRAINING_ARGS_NAME)
            return
        save_model(output_dir, _internal_call=_internal_call)

    trainer.save_model = save
