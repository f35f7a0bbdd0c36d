"""Resuming on another world size, e.g. a job resubmitted with more nodes.

A ZeRO checkpoint holds one optimizer partition (and under ZeRO-3 one parameter partition)
per data-parallel rank, and DeepSpeed loads it only on the world size that wrote it
(ZeRORuntimeException "The checkpoint being loaded used a DP world size of ..."). When the
world size changed, the checkpoint is converted once into DeepSpeed's universal checkpoint
(`python -m deepspeed.checkpoint.ds_to_universal`: every parameter's fp32 weights and Adam
moments as whole tensors) and the engine loads it with `checkpoint.load_universal: true`,
which re-partitions model and optimizer state for the new world size:

    checkpoint-8/global_step8/              as written (2 ranks)
    checkpoint-8/global_step8_universal/    written once, by rank 0, into .universal-tmp/ and
    checkpoint-8/latest_universal           renamed into place: a rerun reuses it

Wiring in train/run.py:

    universal = prepare_resume(resume_from, cfg, runtime)  # before the DeepSpeed config is built
    if universal: load_universal(deepspeed_config); callbacks.append(UniversalLoadRepair(resume_from))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from core.checkpoints import (
    BATCH_RECORD, CONVERSION_FAILED, UNIVERSAL_LATEST, check_resume_topology, recorded_global_batch,
)
from core.outputs import write_atomic
from train.deepspeed_config import offloads_optimizer_to_nvme
from train.runtime import Runtime

UNIVERSAL_TMP = ".universal-tmp"
UNIVERSAL_TIMEOUT_ENV = "DOMAINFORGE_UNIVERSAL_TIMEOUT"  # seconds the other ranks wait for rank 0


def prepare_resume(resume_from: Optional[str], cfg: DictConfig, runtime: Runtime) -> bool:
    """Whether the run must load `resume_from` as a universal checkpoint; converts it first if
    so. Every rank reads the same files and decides the same; rank 0 converts, the others wait."""
    if resume_from is None:
        return False
    ckpt = Path(resume_from)
    topology = check_resume_topology(
        ckpt, cfg.deepspeed.zero_stage, runtime.world_size, offloads_optimizer_to_nvme(cfg.deepspeed)
    )
    if topology.world_size is None or topology.world_size == runtime.world_size:
        return False
    if runtime.is_main:
        print(
            f"resume: {ckpt.name} was written on {topology.world_size} ranks and this run has "
            f"{runtime.world_size}: loading it as a DeepSpeed universal checkpoint",
            flush=True,
        )
        print(f"resume: {describe_batch_change(ckpt, cfg.training, runtime.world_size)}", flush=True)
    if not has_universal_checkpoint(ckpt):
        if runtime.is_main:
            convert_to_universal(ckpt)
        else:
            wait_for_universal_checkpoint(ckpt)
    return True


def describe_batch_change(ckpt: Path, training: DictConfig, world_size: int) -> str:
    """The data position after a world-size change. The Trainer skips global_step x
    gradient_accumulation_steps batches on every rank, i.e. global_step x (the NEW global
    batch) samples of the epoch: right when the global batch is kept, off otherwise."""
    new = training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size
    how = f"{training.per_device_train_batch_size} x {training.gradient_accumulation_steps} x {world_size} ranks"
    old = recorded_global_batch(ckpt)
    if old is None:
        return (f"the global batch is now {new} ({how}); {ckpt.name} has no {BATCH_RECORD} to compare with: the "
                f"data resumes at sample global_step x {new}")
    if old == new:
        return f"the global batch stays {new} ({how}): the run continues the same trajectory and data order"
    return (
        f"the global batch changes from {old} to {new} ({how}): training goes on with the new batch, and the "
        f"data resumes at sample global_step x {new} instead of global_step x {old} (samples are skipped or "
        f"repeated this epoch); set training.global_batch_size={old} to continue the same trajectory"
    )


class BatchRecordCallback(TrainerCallback):
    """Writes <checkpoint>/batch.json at every save (rank 0): the world size and batch settings,
    so that a resume on another world size can say what happens to the global batch."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            record = dict(world_size=args.world_size, per_device_train_batch_size=args.per_device_train_batch_size,
                          gradient_accumulation_steps=args.gradient_accumulation_steps)
            write_atomic(ckpt / BATCH_RECORD, json.dumps(record))
        return control


def load_universal(deepspeed_config: dict) -> None:
    """The DeepSpeed config change that makes engine.load_checkpoint read `latest_universal`."""
    deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


class UniversalLoadRepair(TrainerCallback):
    """Two things DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) gets wrong, put right before the first
    step after it:
    - one `step` tensor is shared by every parameter group's Adam state, and torch's AdamW
      increments it in place once per group: with 2 groups (the Trainer's decay / no-decay) the
      bias correction ran 2 steps a step (measured: losses off by 8e-3 two steps after resuming);
    - every group gets group 0's hyperparameters: the no-decay group got weight decay.
    Each group gets its own `step` and its own saved hyperparameters back."""

    def __init__(self, checkpoint: str):
        latest = Path(checkpoint) / UNIVERSAL_LATEST
        self.optimizer_state = Path(checkpoint) / latest.read_text().strip() / "zero" / "optimizer_state.pt"

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        base = optimizer
        while hasattr(base, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's
            base = base.optimizer
        for param_state in base.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        saved = torch.load(self.optimizer_state, map_location="cpu", weights_only=False)["param_groups"]
        if len(saved) == len(base.param_groups):
            for group, saved_group in zip(base.param_groups, saved):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        return control


def has_universal_checkpoint(ckpt: Path) -> bool:
    latest = ckpt / UNIVERSAL_LATEST
    return latest.is_file() and (ckpt / latest.read_text().strip() / "zero").is_dir()


def convert_to_universal(ckpt: Path) -> Path:
    """Rank 0: DeepSpeed's converter into <ckpt>/.universal-tmp, then renamed into place and
    `latest_universal` written last; a crash leaves nothing that counts as converted."""
    tag = (ckpt / "latest").read_text().strip()
    work = ckpt / UNIVERSAL_TMP
    target = ckpt / f"{tag}_universal"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted conversion
    (ckpt / CONVERSION_FAILED).unlink(missing_ok=True)
    work.mkdir()
    workers = max(1, min(4, os.cpu_count() or 1))
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt / tag), "--output_folder", str(work / target.name),
        "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
        # ZeRO-0/1/2: the converter asserts a `universal_checkpoint_info` that only AutoTP engines
        # save; this injects the plain (no tensor parallelism) one. ZeRO-3 ignores the flag.
        "--inject_missing_state",
    ]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"ds_to_universal failed on {ckpt / tag} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        write_atomic(ckpt / CONVERSION_FAILED, message)
        raise RuntimeError(message)
    shutil.rmtree(target, ignore_errors=True)  # renamed by a run that died before `latest_universal`
    os.replace(work / target.name, target)
    write_atomic(ckpt / UNIVERSAL_LATEST, target.name)
    shutil.rmtree(work, ignore_errors=True)
    print(f"resume: converted {ckpt / tag} to {target} in {time.time() - started:.1f}s", flush=True)
    return target


def wait_for_universal_checkpoint(ckpt: Path, poll_s: float = 1.0) -> None:
    """Ranks other than 0: wait for rank 0's conversion, on the filesystem every node sees (no
    collective: the process group does not exist yet, and a long conversion would outlast its
    timeout). A failure marker older than this process is an earlier run's, not this one's."""
    started = time.time()
    timeout = float(os.environ.get(UNIVERSAL_TIMEOUT_ENV, 6 * 3600))
    failed = ckpt / CONVERSION_FAILED
    while not has_universal_checkpoint(ckpt):
        if failed.is_file() and failed.stat().st_mtime >= started - 1:
            raise RuntimeError(f"rank 0 could not convert {ckpt}: {failed.read_text()}")
        if time.time() - started > timeout:
            raise RuntimeError(f"rank 0 did not convert {ckpt} within {timeout:.0f}s ({UNIVERSAL_TIMEOUT_ENV})")
        time.sleep(poll_s)
