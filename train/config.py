"""Structured schemas for every Hydra group in conf/, and the one way to compose them. The
`stage` group's schemas sit with the stage registry (train/stages/__init__.py).

YAML files only set values; the dataclasses below say which keys exist and their types, so a
typo'd key (`training.lerning_rate=1e-4`) or a wrong type fails at composition time, before
any model is built, with a message that names the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.cli import ConfigCommand
from core.checkpoints import recorded_global_batch
from core.config import CONF_DIR, PRESET_FILE, REPO_ROOT, compose_config, presets, schema_file, unknown_preset
from core.errors import UserError
from core.validate import (
    Check, at_least, checked, either, non_negative, one_of, open_unit_interval, positive, unit_interval, writable_dir,
)
from core.hub import HubConfig
from core.wandb_runs import DEFAULT_WANDB_PROJECT
from train.stages import STAGES


# ---------------------------------------------------------------------------------------------
# model / data / deepspeed / logging / training
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = MISSING
    """Short name used in run names and default output paths."""
    path: Optional[str] = None
    """A Hugging Face model directory (or a directory holding `gguf_file`). None: build the
    architecture in `arch` with random weights (the `tiny` preset)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside `path`; it is dequantized once to a safetensors cache directory."""
    tokenizer_path: Optional[str] = None
    """Where the tokenizer lives when it is not beside the weights (random-init models)."""
    arch: Optional[Dict[str, Any]] = None
    """transformers config kwargs (with `model_type`) for random-init models."""
    attn_implementation: str = "sdpa"
    """sdpa or eager on the CPU; flash_attention_2 on GPUs that have it installed."""
    demo_data_ok: bool = True
    """Whether training on the bundled demo corpus (data/materials/, ~59k CPT tokens) makes sense
    for this model; false on the 7B+ presets, whose stages then refuse it unless data.allow_demo=true."""


@dataclass
class SourceConfig:
    """One source of a mix (`data.<kind>.sources`)."""

    path: str = MISSING
    """A file, glob, directory or saved HF dataset, as for `data.<kind>.path`."""
    weight: Optional[float] = checked(None, positive)
    """Relative sampling weight (> 0): the source's expected share of the mixed rows is
    weight / sum of weights. None: 1, unless the mix uses `fraction`."""
    fraction: Optional[float] = checked(None, unit_interval)
    """alignment-handbook `dataset_mixer` semantics: take this fraction (0 < f <= 1) of the
    source's rows, then concatenate every source and shuffle. Set on every source or none."""
    columns: Dict[str, str] = field(default_factory=dict)
    """Rename the source's columns to the stage's, e.g. {question: prompt, answer: completion}."""
    name: Optional[str] = None
    """Name in the logged mix shares (`mix/<name>/rows`); default: the file or folder name."""
    split: str = "train"
    """Split of a saved DatasetDict."""
    max_samples: Optional[int] = checked(None, at_least(1))
    """Use only the first N rows of this source."""
    format: Optional[str] = checked(None, one_of("text", "chat"))
    """`data.mixed` sources only: text (raw documents, column `text`, loss on every token) or chat
    (`messages` or `prompt` + `completion`, loss on the assistant turns)."""


@dataclass
class DatasetConfig:
    path: Optional[str] = None
    """One source: a .jsonl/.json/.parquet/.txt file, a glob of them, a directory of them, or a
    saved HF dataset directory (`datasets.save_to_disk`). Set this or `sources`, not both."""
    sources: List[SourceConfig] = field(default_factory=list)
    """A weighted mix of sources (train/data/mix.py). Set this or `path`, not both."""
    columns: Dict[str, str] = field(default_factory=dict)
    """Rename the columns of `path` (and `eval_path`) to the stage's, e.g. {question: prompt}."""
    split: str = "train"
    streaming: bool = False
    """Stream the corpus instead of loading it (for corpora larger than RAM). Needs
    training.max_steps, since a stream has no length."""
    max_samples: Optional[int] = checked(None, at_least(1))
    """Use only the first N rows (of the mix, with `sources`) (smoke tests)."""
    stopping_strategy: str = checked("first_exhausted", one_of("first_exhausted", "all_exhausted"))
    """How a weighted mix ends (datasets.interleave_datasets): first_exhausted (when the first
    source runs out: no row repeats, shares follow the weights) or all_exhausted (when the last
    one does: smaller sources repeat)."""
    eval_fraction: Optional[float] = checked(None, open_unit_interval)
    """Hold out this fraction (0 < f < 1) of the rows for evaluation (train_test_split with
    training.seed). Set this or `eval_path`."""
    eval_path: Optional[str] = None
    """An evaluation set in the same formats as `path` (always loaded in memory)."""
    general: Optional[str] = None
    """`data.mixed` only: general documents (column `text`) replayed beside every source, so that
    the domain does not wash out what the model knew (train/data/mixed.py). None: no replay."""
    general_share: float = checked(0.0, Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    """`data.mixed` only: the share of each source's training tokens that `general` adds beside
    it (0.1: 1 general token per 9 of the source's). 0: no replay."""


@dataclass
class DataConfig:
    name: str = MISSING
    cpt: DatasetConfig = field(default_factory=DatasetConfig)
    """Raw domain text, column `text`."""
    sft: DatasetConfig = field(default_factory=DatasetConfig)
    """Chat Q&A: column `messages`, or `prompt` + `completion`."""
    preference: DatasetConfig = field(default_factory=DatasetConfig)
    """Preference pairs: `prompt`, `chosen`, `rejected` (strings or chat messages)."""
    mixed: DatasetConfig = field(default_factory=DatasetConfig)
    """Raw text and chat Q&A in one run (`+stage=mixed`): `sources`, each with a `format`."""
    num_proc: Optional[int] = checked(None, at_least(1))
    """Processes that tokenize the data (in the rank that prepares it, while the others wait).
    None: the task's cores (os.sched_getaffinity), at most 16; a map over fewer than
    ROWS_PER_PROCESS rows a process uses fewer (train/data/__init__.py: map_processes)."""
    allow_demo: bool = False
    """Train a model whose preset says model.demo_data_ok=false on the bundled demo corpus anyway."""


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    zero_stage: int = checked(3, one_of(0, 1, 2, 3))
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer states in CPU memory."""
    offload_param: bool = False
    """ZeRO-Infinity style parameter offload to CPU memory (stage 3 only)."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: Any = "auto"
    stage3_prefetch_bucket_size: Any = "auto"
    stage3_param_persistence_threshold: Any = "auto"
    stage3_gather_16bit_weights_on_model_save: bool = checked(True, Check(
        lambda v: v is True,
        "must be true: with false, ZeRO-3 saves models with no weights (DeepSpeed shards only), and such a "
        "model cannot be published"))
    """Gather the partitioned weights into one 16-bit state dict when a model is saved (the final
    model and the one in each checkpoint). Must stay true: false saves no weights at all."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw keys merged into the generated DeepSpeed JSON (expert use)."""


@dataclass
class LoggingConfig:
    backend: str = checked("none", one_of("none", "wandb"))
    """none or wandb."""
    mode: str = checked("offline", one_of("online", "offline", "disabled"))
    """wandb mode: online, offline or disabled."""
    project: str = DEFAULT_WANDB_PROJECT
    entity: Optional[str] = None
    """W&B team or user; None: the login's default entity."""
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_name: Optional[str] = None
    """Default: <stage>-<model>."""
    dir: Optional[str] = checked(None, writable_dir)
    """Where wandb writes its run folder; default: output_dir."""
    logging_steps: int = checked(1, at_least(1))


DDP_TIMEOUT_S = 3 * 3600
"""training.ddp_timeout's default. transformers' 30 minutes end real runs: a 70B final save
writes 140 GB of 16-bit weights from rank 0 (~25 min at 100 MB/s on a shared file system, more
for a QLoRA base dequantized first), and tokenizing a corpus of billions of tokens takes rank 0
an hour or more, while every other rank waits in a barrier. 3 h covers both with room; it only
delays the report of a rank that hangs alive."""


@dataclass
class TrainingConfig:
    learning_rate: float = checked(2e-5, positive)
    """The full fine-tuning rate. With adapters (finetune=lora|qlora) the run trains at
    lora.learning_rate instead, or, when that is unset, at ADAPTER_LR_MULTIPLIER x this value
    unless this key is given on the command line (compose_train_config)."""
    num_train_epochs: float = checked(1.0, positive)
    max_steps: int = checked(-1, either(-1, positive))
    """>0 overrides num_train_epochs."""
    per_device_train_batch_size: int = checked(1, at_least(1))
    """Sequences (preference stages: pairs) per rank per forward pass: bounded by GPU memory."""
    global_batch_size: Optional[int] = checked(None, at_least(1))
    """Sequences per optimizer step over all ranks, kept whatever the world size: the run derives
    gradient_accumulation_steps = global / (per_device_train_batch_size x ranks) when it starts
    (and `submit.py --dry-run` for the cluster's ranks), and refuses a world size that cannot keep
    it. None: per_device_train_batch_size x gradient_accumulation_steps x ranks."""
    gradient_accumulation_steps: Optional[int] = checked(None, at_least(1))
    """Micro-batches per optimizer step on each rank. None: derived from global_batch_size, or 1
    without it; set both only if they agree."""
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = checked(0.0, non_negative)
    """Steps of linear warm-up; a value below 1 is a fraction of all steps (transformers 5)."""
    weight_decay: float = checked(0.0, non_negative)
    max_grad_norm: float = checked(1.0, non_negative)
    """0 turns gradient clipping off."""
    max_seq_length: int = checked(2048, at_least(8))
    """Tokens per training sequence (CPT block size, SFT truncation length)."""
    precision: str = checked("auto", one_of("auto", "fp32", "bf16", "fp16"))
    """auto, fp32, bf16 or fp16. auto: bf16 on GPUs with native bf16 (compute capability 8.0+),
    fp16 with dynamic loss scaling on older ones (V100, T4); on the CPU bf16 where it has native
    bf16 (AVX-512-BF16 or AMX), else fp32 (core/precision.py). bf16 on an older GPU is refused
    (train/runtime.py); fp16 on the CPU too."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of storing them
    (transformers' activation checkpointing, non-reentrant; reentrant for adapters under ZeRO-3,
    as TRL requires): ~30% more compute for a fraction of the activation memory. The paper's
    presets turn it on."""
    save_steps: int = checked(500, at_least(1))
    """DeepSpeed checkpoint every N optimizer steps (and at the end)."""
    save_total_limit: Optional[int] = checked(2, at_least(1))
    keep_epoch_models: bool = False
    """Also keep the model that ends each epoch, in <output_dir>/epochs/epoch-<k>/ (a model
    directory; checkpoints rotate, these stay): the paper's CPT-epoch curve evaluates each."""
    value_probe: Optional[str] = None
    """A JSONL file of documents with `text` and `value` (data/materials/facts_held.jsonl): before
    training and after every epoch, the mean loss on each value's tokens inside its document goes
    to <output_dir>/value_loss.jsonl (train/value_probe.py), the storage probe the study reads."""
    seed: int = checked(42, non_negative)
    ddp_timeout: int = checked(DDP_TIMEOUT_S, at_least(1))
    """Seconds a rank waits for the others at a barrier or collective before the run fails
    (transformers' ddp_timeout, there 1800). The other ranks wait while the first rank of the
    run tokenizes the corpus, and while rank 0 gathers and writes the final model (DDP_TIMEOUT_S
    says why 3 h); a rank that dies ends the run at once anyway (the launcher stops the rest)."""
    dataloader_num_workers: int = checked(0, non_negative)
    eval_steps: int = checked(500, at_least(1))
    """Evaluate on the eval split (data.<kind>.eval_fraction or eval_path) every N optimizer
    steps: eval_loss (and the preference stages' eval rewards) go to the console,
    trainer_state.json and W&B."""
    log_completions: int = checked(0, non_negative)
    """At every evaluation, log greedy completions of the first N eval prompts to W&B as a
    table (`completions`, TRL's LogCompletionsCallback). 0: off. Needs an eval split and W&B."""
    completion_tokens: int = checked(48, at_least(1))
    """New tokens per logged completion."""
    finetune: str = checked("full", one_of("full", "lora", "qlora"))
    """full: train every weight; lora: train low-rank adapters (PEFT) on the `lora` block's
    target modules, then save the adapter and the merged model; qlora: lora on a 4-bit (nf4)
    base, GPU only (bitsandbytes)."""
    extra_args: Dict[str, Any] = field(default_factory=dict)
    """Raw keyword arguments passed to the TRL config (expert use)."""


def derive_gradient_accumulation(training: DictConfig, world_size: int) -> int:
    """gradient_accumulation_steps for `world_size` ranks: global_batch_size / (per-device batch x
    ranks) when a global batch is set, else the set value or 1. A global batch this world size
    cannot keep, or an explicit accumulation that disagrees with it, is refused in one line."""
    per_device, accumulation, total = (training.per_device_train_batch_size, training.gradient_accumulation_steps,
                                       training.global_batch_size)
    if total is None:
        return accumulation or 1
    if total % (per_device * world_size):
        raise UserError(
            f"training.global_batch_size={total} is not a multiple of training.per_device_train_batch_size="
            f"{per_device} x {world_size} rank(s): {batch_settings_that_fit(total, per_device, world_size)}"
        )
    derived = total // (per_device * world_size)
    if accumulation is not None and accumulation != derived:
        raise UserError(
            f"training.gradient_accumulation_steps={accumulation} disagrees with training.global_batch_size={total}, "
            f"which needs {derived} on {world_size} rank(s) of training.per_device_train_batch_size={per_device}: set "
            "only one: training.gradient_accumulation_steps=null keeps the global batch, "
            "training.global_batch_size=null the accumulation"
        )
    return derived


def batch_settings_that_fit(total: int, per_device: int, world_size: int) -> str:
    """The nearest settings that would work: another per-device batch that keeps the global
    batch on these ranks, or the nearest global batches this per-device batch allows."""
    keeps = per_device_batches_that_keep(total, per_device, world_size)
    step = per_device * world_size
    lower, upper = total // step * step, (total // step + 1) * step
    globals_ = " or ".join(f"training.global_batch_size={g}" for g in (lower, upper) if g > 0)
    if not keeps:
        return f"no per-device batch keeps {total} on {world_size} rank(s); use {globals_}"
    per_devices = " or ".join(f"training.per_device_train_batch_size={p}" for p in keeps)
    return f"use {per_devices} (to keep {total}), or {globals_}"


def per_device_batches_that_keep(total: int, per_device: int, world_size: int) -> List[int]:
    """The (at most two) per-device batches nearest `per_device` that make `total` on `world_size` ranks."""
    keeps = [p for p in range(1, total // world_size + 1) if total % (p * world_size) == 0]
    return sorted(sorted(keeps, key=lambda p: (abs(p - per_device), -p))[:2])


def resolve_batch(training: DictConfig, world_size: int, resumed_from: Optional[str | Path] = None) -> int:
    """Write the derived gradient_accumulation_steps and the effective global_batch_size into
    `training` (so the resolved config, logs and model card record them); returns the latter.
    A resume keeps the global batch of the checkpoint it resumes from (resumed_global_batch)."""
    kept = resumed_global_batch(training, world_size, resumed_from) if resumed_from else None
    if kept is not None:
        training.global_batch_size = kept
    training.gradient_accumulation_steps = derive_gradient_accumulation(training, world_size)
    training.global_batch_size = training.per_device_train_batch_size * training.gradient_accumulation_steps * world_size
    return training.global_batch_size


SCHEDULERS_WITHOUT_WARMUP = ("constant", "reduce_lr_on_plateau")
"""transformers' schedulers that ignore warmup_steps."""


def warmup_length(training: DictConfig, steps: int) -> int:
    """Warm-up optimizer steps of a run of `steps` (TrainingArguments.get_warmup_steps)."""
    if training.lr_scheduler_type in SCHEDULERS_WITHOUT_WARMUP:
        return 0
    warmup = training.warmup_steps
    return int(warmup) if warmup >= 1 else math.ceil(steps * warmup)


def optimizer_steps(training: DictConfig, samples: int, world_size: int) -> int:
    """The optimizer steps the HF Trainer runs on `samples` training rows (blocks, pairs) over
    `world_size` ranks: training.max_steps, or the epochs of an even-batched dataloader
    (transformers Trainer.set_initial_training_values: every rank takes ceil(batches / ranks)
    batches, and an epoch's last partial accumulation is a step too)."""
    if training.max_steps > 0:
        return training.max_steps
    batches_per_rank = math.ceil(math.ceil(samples / training.per_device_train_batch_size) / world_size)
    per_epoch = max(math.ceil(batches_per_rank / derive_gradient_accumulation(training, world_size)), 1)
    return math.ceil(training.num_train_epochs * per_epoch)


def check_schedule(training: DictConfig, steps: int, length: str) -> None:
    """A run whose warm-up does not end before its last optimizer step is refused: its steps run
    at a fraction of the learning rate (a one-step run with any warm-up, at 0). `length` says
    where `steps` comes from (the keys that set it)."""
    warmup = warmup_length(training, steps)
    if warmup == 0 or steps > warmup:
        return
    lr_zero = "its only step would train at learning rate 0; " if steps == 1 else ""
    raise UserError(
        f"the learning-rate warm-up (training.warmup_steps={training.warmup_steps:g}: {warmup} optimizer step(s)) "
        f"does not end before the run does ({steps} optimizer step(s): {length}): {lr_zero}lower "
        "training.warmup_steps, or give the run more steps: more training.num_train_epochs or training.max_steps, "
        "or a smaller training.global_batch_size / training.per_device_train_batch_size"
    )


def check_schedule_of_samples(training: DictConfig, samples: int, world_size: int, unit: str = "rows") -> None:
    """check_schedule for a run on `samples` training rows over `world_size` ranks."""
    steps = optimizer_steps(training, samples, world_size)
    if training.max_steps > 0:
        length = f"training.max_steps={training.max_steps}"
    else:
        accumulation = derive_gradient_accumulation(training, world_size)
        length = (f"{samples} {unit} / (training.per_device_train_batch_size={training.per_device_train_batch_size} "
                  f"x {accumulation} accumulation x {world_size} rank(s)) x training.num_train_epochs="
                  f"{training.num_train_epochs:g}")
    check_schedule(training, steps, length)


def check_max_steps_schedule(cfg: DictConfig) -> None:
    """At composition: a run of training.max_steps steps is checked without its data."""
    if cfg.training.max_steps > 0:
        check_schedule(cfg.training, cfg.training.max_steps, f"training.max_steps={cfg.training.max_steps}")


def resumed_global_batch(training: DictConfig, world_size: int, ckpt: str | Path) -> Optional[int]:
    """The global batch a resume from `ckpt` keeps (its batch.json; None for a checkpoint without
    one), refused in one line where this run asks for another or `world_size` ranks of its
    per-device batch cannot make it. The Trainer derives the steps per epoch from the new
    dataloader, and from them max_steps, the epochs already trained and the learning-rate
    schedule: with another global batch a resumed run would end early (and publish), or run
    long on a stretched schedule, and resume at the wrong sample."""
    kept = recorded_global_batch(ckpt)
    if kept is None:
        return None
    per_device = training.per_device_train_batch_size
    asked = training.global_batch_size or (
        training.gradient_accumulation_steps and per_device * training.gradient_accumulation_steps * world_size)
    if asked and asked != kept:
        raise UserError(
            f"resume: {ckpt} was trained with training.global_batch_size={kept} and this run asks for {asked} on {world_size} "
            f"rank(s) ({batch_keys(training)}): a resume keeps its checkpoint's global batch, or the steps per epoch, "
            f"the epoch count and the learning-rate schedule would change: set training.global_batch_size={kept} "
            "and training.gradient_accumulation_steps=null, or resume=never to start over"
        )
    if kept % (per_device * world_size):
        keeps = per_device_batches_that_keep(kept, per_device, world_size)
        sizes = sorted((w for w in range(1, kept + 1) if kept % w == 0), key=lambda w: abs(w - world_size))[:2]
        fix = (" or ".join(f"training.per_device_train_batch_size={p}" for p in keeps) + " keeps it" if keeps else
               "no per-device batch can; run on " + " or ".join(str(w) for w in sorted(sizes)) + " ranks")
        raise UserError(
            f"resume: {ckpt} was trained with training.global_batch_size={kept}, which {world_size} rank(s) of "
            f"training.per_device_train_batch_size={per_device} cannot make: {fix}, or resume=never to start over"
        )
    return kept


def batch_keys(training: DictConfig) -> str:
    keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size")
    return ", ".join(f"training.{k}={training[k]}" for k in keys if training[k] is not None)


ADAPTER_LR_MULTIPLIER = 10.0
"""LoRA trains ~10x faster than full fine-tuning: alignment-handbook's Zephyr-7B recipes run
full SFT at 2e-5 and QLoRA SFT at 2e-4, full DPO at 5e-7 and QLoRA DPO at 5e-6; QLoRA's own
7B-13B rate (Dettmers et al. 2023) is 2e-4 against the paper's full-SFT 2e-5."""

LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """PEFT LoRA for `training.finetune=lora|qlora`; ignored by full fine-tuning."""

    r: int = checked(16, at_least(1))
    """Adapter rank."""
    alpha: int = checked(32, positive)
    """Scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = checked(0.05, Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    """Dropout on the adapter's input."""
    target_modules: Optional[List[str]] = None
    """Module names (suffixes, e.g. q_proj) that get adapters; None: the model family's preset
    in `family_targets`."""
    family_targets: Dict[str, List[str]] = field(
        default_factory=lambda: {
            "llama": list(LLAMA_LIKE_TARGETS),
            "mistral": list(LLAMA_LIKE_TARGETS),
            "qwen2": list(LLAMA_LIKE_TARGETS),
            "gemma": list(LLAMA_LIKE_TARGETS),
        }
    )
    """Default target modules per config.json `model_type`: every attention and MLP projection."""
    learning_rate: Optional[float] = checked(None, positive)
    """Learning rate of adapter runs, replacing training.learning_rate (a full fine-tuning
    rate); a training.learning_rate typed on the command line wins over a preset's value here.
    None: that typed rate, else ADAPTER_LR_MULTIPLIER x the stage preset's rate
    (set_adapter_learning_rate)."""
    qlora_quant_type: str = checked("nf4", one_of("nf4", "fp4"))
    """QLoRA base weights: bitsandbytes 4-bit type (nf4 or fp4)."""
    qlora_compute_dtype: Optional[str] = checked(None, one_of(None, "bfloat16", "float16", "float32"))
    """QLoRA matmul dtype. None: the run's precision (bfloat16 under bf16, float16 under fp16, e.g.
    V100/T4). float32 fits any run; the other half type than the run's is refused (train/lora.py:
    qlora_dtypes). The packed 4-bit weights are stored in the run's dtype whatever this is."""
    qlora_double_quant: bool = True
    """QLoRA: quantize the quantization constants too (~0.4 bit per weight saved)."""


@dataclass
class TrainJobConfig:
    """Root of `launch/train.py`: conf/config.yaml composes the groups onto this."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logging: LoggingConfig = MISSING
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """No preset group: the schema's defaults, with each stage preset's values on top."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapters for training.finetune=lora|qlora; presets in conf/lora/ (lora=<name>)."""
    hub: HubConfig = field(default_factory=HubConfig)
    """Upload the finished model to the Hugging Face Hub (hub.push=true hub.repo_id=...)."""
    stage: Any = None
    """Added by `+stage=cpt|sft|dpo|orpo`."""
    output_dir: str = checked(MISSING, writable_dir)
    """Run directory: checkpoints, then the final model. The same on every rank."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never: start over
    (the earlier checkpoints in output_dir move to checkpoints.before-<time>/ when training starts); or a
    checkpoint-<step> directory to continue from."""


def register_stage_schemas() -> None:
    """`+stage=<name>` files start from their schema: `defaults: [/schema/stage/<name>@stage]`."""
    cs = ConfigStore.instance()
    for name, stage in STAGES.items():
        cs.store(group="schema/stage", name=name, node=stage.schema)


def strip_launcher_args(argv: List[str]) -> List[str]:
    """Drop `--local_rank=N` / `--local_rank N`, which the deepspeed launcher appends."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def check_stage(cfg: DictConfig) -> None:
    """A stage is chosen, and its node holds only its schema's keys (`+stage.x=...` adds any)."""
    stage = cfg.get("stage")
    if stage is None:
        raise UserError(
            "no stage chosen: add +stage=<name> with one of " + ", ".join(STAGES)
            + " (e.g. deepspeed launch/train.py +stage=cpt)"
        )
    schema = STAGES[stage.name].schema
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(stage, resolve=False))
    except OmegaConfBaseException as err:
        key = re.search(r"Key '([^']+)'", str(err))
        raise UserError(
            f"unknown config key 'stage.{key.group(1) if key else '?'}' (not a field of {schema.__name__}): "
            f"check the spelling; valid keys are the fields in {schema_file(schema)}"
        ) from err


def typed_keys(argv: List[str]) -> set:
    """The config keys given on the command line (`key=v`, `+key=v`, `++key=v`)."""
    return {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}


def set_adapter_learning_rate(cfg: DictConfig, argv: List[str]) -> None:
    """With adapters, training.learning_rate becomes the rate the run trains at. The first that
    applies: lora.learning_rate typed on the command line; training.learning_rate typed there
    (the user's word wins over every preset); lora.learning_rate from a lora preset; the stage
    preset's full fine-tuning rate x ADAPTER_LR_MULTIPLIER. A pipeline's overrides count as
    typed. The resolved config records the rate used."""
    if cfg.training.finetune not in ("lora", "qlora"):
        return
    typed = typed_keys(argv)
    adapter_rate = cfg.lora.learning_rate
    if adapter_rate is not None and ("lora.learning_rate" in typed or "training.learning_rate" not in typed):
        cfg.training.learning_rate = adapter_rate
    elif "training.learning_rate" not in typed:
        cfg.training.learning_rate = cfg.training.learning_rate * ADAPTER_LR_MULTIPLIER


def stage_as_choice(argv: List[str]) -> List[str]:
    """`+stage=<name>` (the documented form) chooses conf/config.yaml's `stage` default, which
    sits before the size preset so that the size's batch settings apply over the stage's."""
    return [arg[1:] if arg.startswith("+stage=") else arg for arg in argv]


def size_choice(argv: List[str]) -> List[str]:
    """A typed `size=<name>` names a preset (conf/config.yaml's size default is optional: most
    models have none, so Hydra would pass over a misspelt one in silence), and brings its
    per-stage part, conf/size/stage/<name>_<stage>.yaml, where there is one."""
    sizes = [arg.split("=", 1)[1] for arg in argv if arg.startswith("size=") and not PRESET_FILE.match(arg)]
    stages = [arg.split("=", 1)[1] for arg in argv if arg.startswith("stage=")]
    for size in sizes:
        if size not in presets(CONF_DIR, "size"):
            raise UserError(unknown_preset("size", size, CONF_DIR))
    if sizes and stages and not any(arg.startswith("size/stage=") for arg in argv):
        return [*argv, f"size/stage={sizes[-1]}_{stages[-1]}"]
    return argv


def compose_train_config(argv: List[str]) -> DictConfig:
    """The training job's config from `launch/train.py` arguments."""
    register_stage_schemas()
    argv = size_choice(stage_as_choice(strip_launcher_args(argv)))
    cfg = compose_config(argv, "config", TrainJobConfig, check=check_stage)
    set_adapter_learning_rate(cfg, argv)
    check_demo_data(cfg)
    check_max_steps_schedule(cfg)
    return cfg


DEMO_DATA_DIR = REPO_ROOT / "data" / "materials"


def demo_data_paths(dataset: DictConfig) -> List[str]:
    """The paths of `dataset` (a data.<kind> node) inside the bundled demo corpus."""
    paths = [dataset.path] if dataset.path else [source.path for source in dataset.sources]
    return [p for p in paths if Path(p).expanduser().resolve().is_relative_to(DEMO_DATA_DIR)]


def check_demo_data(cfg: DictConfig) -> None:
    """A large model (model.demo_data_ok=false) on the bundled toy corpus is almost always a
    forgotten data.<kind>.path: refused before anything loads, unless data.allow_demo=true."""
    kind = STAGES[cfg.stage.name].data
    demo = demo_data_paths(cfg.data[kind])
    if cfg.model.demo_data_ok or cfg.data.allow_demo or not demo:
        return
    raise UserError(
        f"model={cfg.model.name} would train on the bundled demo data {Path(demo[0]).relative_to(REPO_ROOT)} "
        f"(data.{kind}): give your own with data.{kind}.path=<file, glob or directory>, or accept the demo data "
        "with data.allow_demo=true"
    )


TRAIN_COMMAND = ConfigCommand(
    "train.py", "config", TrainJobConfig, compose_train_config,
    keys=("model.path", "output_dir", "data.cpt.path", "data.sft.path", "data.preference.path",
          "training.learning_rate", "training.num_train_epochs", "training.max_steps",
          "training.per_device_train_batch_size", "training.global_batch_size", "training.gradient_accumulation_steps",
          "training.max_seq_length", "training.finetune", "resume"),
    example="+stage=sft model=smollm2_135m data.sft.path=my_chats.jsonl training.learning_rate=1e-5",
)
"""launch/train.py's command line: --help, --cfg, or the config to train."""
