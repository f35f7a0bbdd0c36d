"""What both runners (local.py, slurm.py) check of a plan before any step runs or any job queues:
every step's config, what the jobs' interpreter has installed, resumable checkpoints and the
models no step produces. Each refuses in one line, naming the step."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from core.checkpoints import check_resume_topology, newest_complete_checkpoint, resume_checkpoint
from core.errors import UserError
from orchestration.config import training_world_size
from orchestration.planner import is_gguf_cache
from orchestration.steps import STEP_KINDS, Plan, Step
from train.attention import check_attention_installed
from train.config import derive_gradient_accumulation, resumed_global_batch
from train.deepspeed_config import offloads_optimizer_to_nvme


def validate_step_configs(plan: Plan) -> None:
    """Compose each step's config now, so a typo'd override or task name fails before any job runs."""
    checked_kinds: List[str] = []
    for step in plan.steps:
        kind = STEP_KINDS[step.kind]
        try:
            config = step.config
            if kind.check is not None and not (kind.check_once and step.kind in checked_kinds):
                kind.check(config)
                checked_kinds.append(step.kind)
        except UserError as err:
            raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err


PIPELINE_SDPA_FIX = "add model.attn_implementation=sdpa to this command (every training step gets it)"


def check_step_environment(plan: Plan, steps: List[Step], python: Optional[str] = None) -> None:
    """What the jobs' interpreter (`python`; None: this one) must have installed, checked before any
    job runs: the attention kernel each training step's model asks for (train/attention.py)."""
    checked: List[str] = []
    for step in steps:
        if step.kind != "train":
            continue
        implementation = step.config.model.attn_implementation
        if implementation in checked:
            continue
        try:
            check_attention_installed(implementation, python, PIPELINE_SDPA_FIX)
        except UserError as err:
            raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err
        checked.append(implementation)


def check_resumes(steps: List[Step], cluster: DictConfig) -> None:
    """A training step that will resume from a checkpoint (resume=auto finds one, or a path)
    must be able to load it on this cluster's world size and ZeRO stage, and keep its global
    batch there: refused now, not once the job has queued. A changed world size alone is
    converted when the job starts."""
    for step in steps:
        if step.kind != "train" or step.is_complete():
            continue
        if newest_complete_checkpoint(step.output_dir) is None and not any(a.startswith("resume=") for a in step.args):
            continue  # nothing to resume from: no need to compose the step's config
        cfg = step.config
        try:
            ckpt = resume_checkpoint(cfg.output_dir, cfg.resume)
            if ckpt is not None:
                check_resume_topology(
                    ckpt, cfg.deepspeed.zero_stage, training_world_size(cluster),
                    offloads_optimizer_to_nvme(cfg.deepspeed),
                )
                resumed_global_batch(cfg.training, training_world_size(cluster), ckpt)
        except UserError as err:
            raise UserError(f"step '{step.name}': {err}") from err


def check_global_batches(steps: List[Step], cluster: DictConfig) -> None:
    """A training step's training.global_batch_size must divide over this cluster's ranks: refused
    now, not once the job has queued (the job derives its accumulation the same way)."""
    world_size = training_world_size(cluster)
    for step in steps:
        if step.kind != "train" or step.is_complete():
            continue
        try:
            derive_gradient_accumulation(step.config.training, world_size)
        except UserError as err:
            raise UserError(f"step '{step.name}': {err}") from err


def check_outside_models(plan: Plan, steps: List[Step]) -> None:
    """Models that no step of this pipeline produces must already exist, before jobs queue."""
    produced = {str(s.output_dir) for s in plan.steps}
    for step in steps:
        for path in step.merge_models or [step.input_dir]:
            if path is None or path in produced or (Path(path) / "config.json").is_file():
                continue
            if is_gguf_cache(path):
                continue  # the first step that loads the GGUF preset (a stage, or an augment's tokenizer) converts it
            fix = "pipeline.models.<name>=<local dir>" if step.kind == "merge" else "pipeline.start=<local dir>"
            raise UserError(
                f"pipeline {plan.pipeline}: step '{step.name}' reads {path}, which is not a local model directory "
                f"(no config.json): download the model and set {fix}"
            )
