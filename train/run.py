"""One training stage, end to end, in a fixed order:

    setup (config, runtime, tokenizer, data checks)  ->  start (the resolved config in
    <output_dir>/domainforge.yaml)  ->  train (TRL trainer under DeepSpeed)  ->  save
    (consolidated weights + tokenizer + resolved config + model card, published atomically;
    with LoRA the adapter and the merged model)  ->  push (hub.push=true)

Every user error is raised before the run directory is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from core.checkpoints import planned_max_steps
from core.config import resolved_yaml
from core.errors import UserError
from core.lock import OutputLock
from core.hub import check_hub, push_to_hub
from core.outputs import is_model_dir
from train.checkpoint import (
    FINAL_TMP,
    RUN_CONFIG,
    EpochModelCallback,
    checkpoints_dir,
    set_checkpoints_aside,
    publish_final_model,
    resume_checkpoint,
    save_models_only_where_kept,
    write_run_config,
)
from train.attention import check_attention_runs_here
from train.config import check_schedule_of_samples, derive_gradient_accumulation, resolve_batch
from train.data.mix import has_eval_split
from train.deepspeed_config import build_deepspeed_config
from train.lora import check_finetune, quantization_config, save_adapter_and_merged, uses_adapters
from train.model_card import write_stage_card
from train.model import (
    load_model,
    load_tokenizer,
    max_positions,
    report_parameter_share,
)
from train.preemption import exit_if_preempted, preemption_callback
from train.reshard import BatchRecordCallback, UniversalLoadRepair, load_universal, prepare_resume
from train.runtime import (
    Runtime,
    detect_runtime,
    ensure_process_group_env,
    let_accelerate_see_cpu_ranks,
    gradients_pass_through_on_one_rank,
    pass_gradients_through_on_one_rank,
    release_cpu_allreduce_buffers,
    shutdown_process_group,
    training_arguments_accept_cpu_bf16,
)
from train.stages import get_stage
from train.tracking import PromptCompletionsCallback, ThroughputCallback, configure_wandb, report_to
from train.value_probe import value_probe_callback

log = logging.getLogger("domainforge")


def train(cfg: DictConfig) -> None:
    """Train the stage of a composed config (train.config.compose_train_config), publish it, and
    leave the process group."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # torch.distributed's deprecation notices repeat on every collective; they are not ours to fix.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed.*")
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true.*")
    run_stage(cfg)
    shutdown_process_group()  # every rank is past save_final_model's barrier


def run_name(cfg: DictConfig) -> str:
    return cfg.logging.run_name or f"{cfg.stage.name}-{cfg.model.name}"


def common_trainer_kwargs(cfg: DictConfig, runtime: Runtime, evaluate: bool = False) -> Dict[str, Any]:
    """TrainingArguments shared by every stage; each stage adds its own to its TRL config.
    `evaluate`: the data has an eval split, evaluated every training.eval_steps."""
    t = cfg.training
    kwargs: Dict[str, Any] = dict(
        output_dir=str(checkpoints_dir(cfg.output_dir)),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=derive_gradient_accumulation(t, runtime.world_size),
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=runtime.bf16,  # TRL configs default bf16=True: always say it explicitly
        fp16=runtime.fp16,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name
        activation_checkpointing_kwargs={"use_reentrant": reentrant_checkpointing(cfg)},
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=cfg.logging.logging_steps,
        logging_first_step=True,
        report_to=report_to(cfg.logging),
        run_name=run_name(cfg),
        seed=t.seed,
        data_seed=t.seed,
        ddp_timeout=t.ddp_timeout,
        dataloader_num_workers=t.dataloader_num_workers,
        include_num_input_tokens_seen="all",
        deepspeed=build_deepspeed_config(cfg.deepspeed),
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.eval_steps,
        per_device_eval_batch_size=t.per_device_train_batch_size,
    )
    kwargs.update(OmegaConf.to_container(t.extra_args, resolve=True))
    return kwargs


def reentrant_checkpointing(cfg: DictConfig) -> bool:
    """Non-reentrant activation checkpointing (PyTorch's recommendation, the paper's configs),
    except for adapters under ZeRO-3: TRL's SFT and DPO trainers force reentrant there
    (huggingface/trl#2514); saying it here keeps ORPO's experimental trainer, which does not
    check, and the resolved arguments consistent with them."""
    return uses_adapters(cfg) and cfg.deepspeed.zero_stage == 3


def keep_planned_steps(kwargs: Dict[str, Any], resume_from: str, training: DictConfig, announce: bool) -> None:
    """A resume trains the optimizer steps its checkpoint planned (core/checkpoints.py
    planned_max_steps): the schedule's length, warm-up and epoch count stay the checkpoint's."""
    planned = planned_max_steps(resume_from, training.num_train_epochs, training.max_steps)
    if planned is None:
        return
    kwargs["max_steps"] = planned
    if announce:
        print(f"resume: {Path(resume_from).name} planned {planned} optimizer steps "
              f"(training.num_train_epochs={training.num_train_epochs:g}): the run keeps them", flush=True)


def check_limits(cfg: DictConfig) -> None:
    limit = max_positions(cfg.model)
    if limit and cfg.training.max_seq_length > limit:
        raise UserError(
            f"training.max_seq_length={cfg.training.max_seq_length} exceeds model '{cfg.model.name}' "
            f"limit of {limit} positions (max_position_embeddings): set training.max_seq_length<={limit}"
        )


SAMPLE_UNITS = {"cpt": "blocks", "sft": "sequences", "mixed": "sequences", "preference": "pairs"}
"""What one training row of each data kind is, for the schedule's error line."""


def check_data_schedule(cfg: DictConfig, data, runtime: Runtime, kind: str) -> None:
    """Now that the number of training rows is known: the warm-up ends before the last optimizer
    step (a stream has no length: its training.max_steps was checked at composition)."""
    if hasattr(data.train_dataset, "__len__"):
        training = cfg.training
        if data.stats.get("packed_epochs", 1) > 1:  # the epochs are in the data: the trainer makes one pass
            training = OmegaConf.merge(training, {"num_train_epochs": 1})
        check_schedule_of_samples(training, len(data.train_dataset), runtime.world_size, SAMPLE_UNITS[kind])


def run_stage(cfg: DictConfig) -> Path:
    """Train `cfg.stage` and publish the final model into `cfg.output_dir`; returns that path."""
    ensure_process_group_env()
    runtime = detect_runtime(cfg.training.precision)
    # transformers would say so only once every rank has tokenized and the process group is up.
    check_attention_runs_here(cfg.model.attn_implementation, runtime.precision)
    stage = get_stage(cfg.stage.name)
    out = Path(cfg.output_dir)
    # One run per output_dir: rank 0 holds the lock for the whole run; the other ranks of the
    # same run never take it (they stop with rank 0 if it is refused: the launcher ends them).
    with OutputLock(out, "output_dir") if runtime.is_main else contextlib.nullcontext():
        if is_model_dir(out):  # checked under the lock: a run that just finished has published
            raise UserError(
                f"output_dir={out} already holds a finished model: choose another output_dir, or delete it to retrain"
            )
        train_stage(cfg, runtime, stage)
        # Push: only once the local model is complete, so a failed upload cannot damage it.
        if cfg.hub.push and runtime.is_main:
            print(f"pushed {out} to the Hub: {push_to_hub(out, cfg.hub)}", flush=True)
    return out


def train_stage(cfg: DictConfig, runtime: Runtime, stage) -> None:
    # From here SIGUSR1/SIGTERM (SLURM preemption, time limit) stop at a step end with a checkpoint.
    preemption = preemption_callback()

    # Setup: everything a user can get wrong is checked before the run directory exists.
    check_hub(cfg.hub)
    tokenizer = load_tokenizer(cfg.model)
    check_limits(cfg)
    check_finetune(cfg, gpu=runtime.device == "cuda", precision=runtime.precision)
    resume_from = resume_checkpoint(cfg.output_dir, cfg.resume)
    # Accumulation for this world size; a resume keeps the checkpoint's global batch.
    resolve_batch(cfg.training, runtime.world_size, resume_from)
    universal = prepare_resume(resume_from, cfg, runtime)  # another world size: converted once
    if runtime.device == "cpu":
        let_accelerate_see_cpu_ranks()
        pass_gradients_through_on_one_rank()
    evaluate = has_eval_split(cfg.data[stage.data])
    kwargs = common_trainer_kwargs(cfg, runtime, evaluate)
    if resume_from:
        keep_planned_steps(kwargs, resume_from, cfg.training, runtime.is_main)
    if universal:
        load_universal(kwargs["deepspeed"])
    with training_arguments_accept_cpu_bf16(runtime):
        args = stage.trainer_args(cfg, kwargs)  # starts the process group
    release_cpu_allreduce_buffers(runtime)
    # Data once per cache: the first rank tokenizes into the datasets cache, then the first rank
    # of each other node (a node-local cache), then every other rank reads the cache: TRL's order
    # (trl.trainer.utils.global_then_local_main_first), built from transformers' form, which
    # releases the waiting ranks when the first one fails (accelerate's leaves them to crash in
    # the barrier with a traceback); they then fail on the same bad data with the same one line.
    # A bad dataset fails here, before the run directory exists.
    with args.main_process_first(local=False, desc="data"), args.main_process_first(local=True, desc="data"):
        data = stage.prepare_data(cfg, tokenizer)
    check_data_schedule(cfg, data, runtime, stage.data)  # every rank, before the run directory and the model
    value_probe = value_probe_callback(cfg, tokenizer, data.stats.get("packed_epochs", 1))

    if runtime.is_main:
        if cfg.resume == "never":
            set_checkpoints_aside(cfg.output_dir)
        write_run_config(cfg)  # past every setup check: the run directory starts here
    set_seed(cfg.training.seed)
    configure_wandb(cfg.logging, run_name(cfg), cfg.output_dir)
    # From here on transformers builds models inside deepspeed.zero.Init (ZeRO-3).
    quantized = quantization_config(cfg, runtime.precision)
    model = load_model(cfg.model, runtime.torch_dtype, tokenizer, quantization_config=quantized)
    report_parameter_share(model)
    throughput = ThroughputCallback({**data.stats, "global_batch_size": cfg.training.global_batch_size})
    callbacks = [preemption, BatchRecordCallback(cfg.training)]
    if cfg.training.keep_epoch_models:
        callbacks.append(EpochModelCallback(cfg.output_dir))
    if value_probe:
        callbacks.append(value_probe)
    if universal:
        callbacks.append(UniversalLoadRepair(resume_from))
    trainer = stage.build_trainer(cfg, args, model, tokenizer, data, callbacks)
    save_models_only_where_kept(trainer, cfg.training.keep_epoch_models)
    # First in line, so the loggers after it (console, W&B) see the values it adds.
    trainer.callback_handler.callbacks.insert(0, throughput)
    if cfg.training.log_completions > 0:
        trainer.add_callback(PromptCompletionsCallback(trainer, data.eval_prompts, cfg.training.completion_tokens))

    # Train.
    if runtime.is_main:
        # What train/runtime.py decided, with the backend the process group really runs on.
        import torch.distributed as dist

        backend = dist.get_backend() if dist.is_initialized() else "no process group"
        skipped = (runtime.world_size == 1 and cfg.deepspeed.zero_stage == 3 and gradients_pass_through_on_one_rank())
        print(f"runtime: {runtime.world_size} rank(s) on {runtime.device}, {backend}, {runtime.precision}"
              + ("; ZeRO-3 gradients skip the one-rank reduce-scatter" if skipped else ""), flush=True)
    if resume_from and runtime.is_main:
        print(f"resuming from {resume_from}", flush=True)
    trainer.train(resume_from_checkpoint=resume_from)
    exit_if_preempted()  # stopped by a signal: the checkpoint is saved; exit 75 to be requeued

    # Save: all ranks take part (ZeRO-3 gathers the shards), rank 0 writes.
    save_final_model(trainer, tokenizer, cfg)


# Test hook: seconds to sleep once the final model is in .final-tmp and before it is published,
# so a test can kill a run mid-save (as merge's DOMAINFORGE_MERGE_PAUSE_AFTER_SHARD).
SAVE_PAUSE_ENV = "DOMAINFORGE_TRAIN_PAUSE_BEFORE_PUBLISH"


def save_final_model(trainer, tokenizer, cfg: DictConfig) -> None:
    """Write the final model into <output_dir>/.final-tmp, then publish it (config.json last).
    A crash or a full disk before the publish leaves the checkpoints as they were; the rerun
    resumes from the newest one and saves again."""
    out = Path(cfg.output_dir)
    tmp = out / FINAL_TMP
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier, interrupted save
    if uses_adapters(cfg):
        save_adapter_and_merged(trainer, tmp)  # tmp/adapter/ + the merged model in tmp
    else:
        trainer.save_model(str(tmp))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp)
        (tmp / RUN_CONFIG).write_text(resolved_yaml(cfg))
        write_stage_card(cfg, tmp, out)
        pause = float(os.environ.get(SAVE_PAUSE_ENV, "0") or 0)
        if pause:
            print(f"final model written to {tmp}; publishing in {pause:g}s", flush=True)
            time.sleep(pause)
        publish_final_model(out)
        print(f"saved final model to {out}", flush=True)
    trainer.accelerator.wait_for_everyone()
