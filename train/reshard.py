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
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from transformers import TrainerCallback

from core.checkpoints import (
    BATCH_RECORD, CONVERSION_FAILED, UNIVERSAL_LATEST, check_resume_topology, has_universal_checkpoint,
    recorded_global_batch,
)
from core.outputs import write_atomic
from train.deepspeed_config import offloads_optimizer_to_nvme
from train.preemption import STOP_SIGNALS
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
    batch) samples of the epoch: right, as resolve_batch keeps the checkpoint's global batch
    (refusing a run that cannot), unless the checkpoint has no record of it."""
    new = training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size
    how = f"{training.per_device_train_batch_size} x {training.gradient_accumulation_steps} x {world_size} ranks"
    if recorded_global_batch(ckpt) is None:
        return (f"the global batch is now {new} ({how}); {ckpt.name} has no {BATCH_RECORD} to compare with: the "
                f"data resumes at sample global_step x {new}")
    return f"the global batch stays {new} ({how}): the run continues the same trajectory and data order"


class BatchRecordCallback(TrainerCallback):
    """Writes <checkpoint>/batch.json at every save (rank 0): the world size and batch settings,
    and the plan as configured (num_train_epochs, max_steps), so that a resume, on any world
    size, keeps the global batch (train/config.py resumed_global_batch) and the planned steps
    (core/checkpoints.py planned_max_steps)."""

    def __init__(self, training: DictConfig):
        self.plan = dict(num_train_epochs=training.num_train_epochs, max_steps=training.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            record = dict(world_size=args.world_size, per_device_train_batch_size=args.per_device_train_batch_size,
                          gradient_accumulation_steps=args.gradient_accumulation_steps, **self.plan)
            write_atomic(ckpt / BATCH_RECORD, json.dumps(record))
        return control


def load_universal(deepspeed_config: dict) -> None:
    """The DeepSpeed config change that makes engine.load_checkpoint read `latest_universal`."""
    deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True


class UniversalLoadRepair(TrainerCallback):
    """Three things DeepSpeed 0.19.8's universal load (ZeRO-3: stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) gets wrong, put right before the first
    step after it:
    - one `step` tensor is shared by every parameter group's Adam state, and torch's AdamW
      increments it in place once per group: with 2 groups (the Trainer's decay / no-decay) the
      bias correction ran 2 steps a step (measured: losses off by 8e-3 two steps after resuming);
    - every group gets group 0's hyperparameters: the no-decay group got weight decay;
    - that `step` is the CPU tensor the converter saved, also for GPU partitions: the fused AdamW
      (transformers' default optim) passes its raw pointer to the CUDA kernel, which needs it on
      the parameter's device (torch's own _init_group puts it there for fused or capturable).
    Each parameter gets its own `step`, where torch would keep it, and each group its saved
    hyperparameters back, read from the slim optimizer_state.pt the conversion leaves."""

    def __init__(self, checkpoint: str):
        latest = Path(checkpoint) / UNIVERSAL_LATEST
        self.optimizer_state = Path(checkpoint) / latest.read_text().strip() / "zero" / "optimizer_state.pt"

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        base = optimizer
        while hasattr(base, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's
            base = base.optimizer
        saved = load_optimizer_state(self.optimizer_state)["param_groups"]
        if len(saved) == len(base.param_groups):
            for group, saved_group in zip(base.param_groups, saved):
                group.update({k: v for k, v in saved_group.items() if k != "params"})
        on_device = any(group.get("fused") or group.get("capturable") for group in base.param_groups)
        for param, param_state in base.state.items():
            if torch.is_tensor(param_state.get("step")):  # DeepSpeedCPUAdam keeps a Python int
                param_state["step"] = own_step(param_state["step"], param, on_device)
        return control


def own_step(step: torch.Tensor, param: torch.Tensor, on_device: bool) -> torch.Tensor:
    """A copy of `step` for one parameter, where torch.optim.AdamW._init_group creates it: on the
    parameter's device in float32 for the fused or capturable kernels, else on the CPU."""
    if on_device:
        return step.to(param.device, torch.float32, copy=True)
    return step.to("cpu", copy=True)


def load_optimizer_state(path: Path) -> dict:
    """The universal optimizer_state.pt, memory-mapped: a copy not slimmed by this project (one
    converted before it slimmed them) holds a whole old rank's optimizer."""
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def slim_optimizer_state(zero_dir: Path) -> None:
    """Keep in the universal optimizer_state.pt only what a universal load reads from it. Under
    ZeRO-3 the converter copies a whole old rank's optimizer into it (fp32 master weights and
    both Adam moments, 12 bytes x parameters / old ranks: 48 GB for an 8B model saved on 2 GPUs),
    and every new rank loads it in full, in DeepSpeed and in UniversalLoadRepair, only for the
    loss scaler, one `step` and the param_groups; the weights and moments come from the
    per-parameter files beside it."""
    path = zero_dir / "optimizer_state.pt"
    state = load_optimizer_state(path)
    inner = state.get("optimizer_state_dict")
    if "fp32_flat_groups" not in state and not (isinstance(inner, dict) and "state" in inner):
        return  # ZeRO-1/2: the converter already left the sharded states out
    state.pop("fp32_flat_groups", None)
    if isinstance(inner, dict) and "state" in inner:
        inner["state"] = {k: {"step": v["step"]} for k, v in inner["state"].items() if "step" in v}
    slim = path.with_name(path.name + ".slim")
    torch.save(state, slim)
    os.replace(slim, path)


def convert_to_universal(ckpt: Path) -> Path:
    """Rank 0: DeepSpeed's converter into <ckpt>/.universal-tmp, then renamed into place and
    `latest_universal` written last; a crash leaves nothing that counts as converted, and a
    failure leaves no temporary folder behind."""
    tag = (ckpt / "latest").read_text().strip()
    work = ckpt / UNIVERSAL_TMP
    target = ckpt / f"{tag}_universal"
    shutil.rmtree(work, ignore_errors=True)  # an interrupted conversion
    (ckpt / CONVERSION_FAILED).unlink(missing_ok=True)
    started = time.time()
    try:
        work.mkdir()
        run_converter(ckpt / tag, work / target.name)
        slim_optimizer_state(work / target.name / "zero")
    except (RuntimeError, OSError) as err:
        shutil.rmtree(work, ignore_errors=True)
        note_conversion_failed(ckpt, str(err))
        raise
    shutil.rmtree(target, ignore_errors=True)  # renamed by a run that died before `latest_universal`
    os.replace(work / target.name, target)
    write_atomic(ckpt / UNIVERSAL_LATEST, target.name)
    shutil.rmtree(work, ignore_errors=True)
    print(f"resume: converted {ckpt / tag} to {target} in {time.time() - started:.1f}s", flush=True)
    return target


def run_converter(tag_dir: Path, output: Path) -> None:
    """`python -m deepspeed.checkpoint.ds_to_universal`, deaf to the job's stop signals: SLURM
    signals every process of the step (the time-limit warning, USR1, included), and exec resets
    the handler rank 0 has to the default action, which kills; a killed converter starts over
    in the next allocation. Ignored signals stay ignored across exec, in its workers too."""
    workers = max(1, min(4, os.cpu_count() or 1))
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(tag_dir), "--output_folder", str(output),
        "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
        # ZeRO-0/1/2: the converter asserts a `universal_checkpoint_info` that only AutoTP engines
        # save; this injects the plain (no tensor parallelism) one. ZeRO-3 ignores the flag.
        "--inject_missing_state",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=ignore_stop_signals)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {tag_dir} (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )


def ignore_stop_signals() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def note_conversion_failed(ckpt: Path, message: str) -> None:
    """The note the waiting ranks stop on; on a full disk it may not be written, and then they
    end with rank 0 (the launcher ends every rank once one fails)."""
    try:
        write_atomic(ckpt / CONVERSION_FAILED, message)
    except OSError:
        pass


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
