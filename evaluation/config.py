"""The evaluation job's schema, written once: conf/eval_job.yaml and the presets in conf/eval/
only set values, and `launch/eval.py MODEL_DIR key=value ...` is the same form with the
model directory given first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from core.cli import ConfigCommand
from core.config import compose_config
from core.errors import UserError
from core.validate import Check, at_least, checked, non_negative, one_of, positive, writable_dir

BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BATCH_SIZE = Check(lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                   "must be a positive integer or auto")


@dataclass
class EvalJobConfig:
    """Root of `python launch/eval.py [MODEL_DIR] model_dir=... tasks=[...]` (conf/eval_job.yaml)."""

    model_dir: str = MISSING
    """A Hugging Face model directory (config.json), or the directory holding
    `model_args.gguf_file`. Results go to <model_dir>/eval/<task>.json unless output_dir is set."""
    tasks: List[str] = field(default_factory=list)
    """lm-eval task, group or tag names: the bundled ones (evaluation/tasks/), any task in an
    include_path folder, or lm-eval's built-ins (mmlu, arc_easy, ...) where their data is reachable."""
    eval_sets: List[str] = field(default_factory=list)
    """Paper-format JSONL files (docs/eval.md): each runs under both protocols, as tasks
    `<file stem>_loglik` and `<file stem>_gen`."""
    include_path: List[str] = field(default_factory=list)
    """Folders of extra lm-eval task YAMLs; evaluation/tasks/ is always included."""
    output_dir: Optional[str] = checked(None, writable_dir)
    """Where the <task>.json files go; None: <model_dir>/eval."""
    backend: str = checked("hf", one_of(*BACKENDS))
    """hf (transformers, any device) or vllm (GPUs; pip install vllm)."""
    batch_size: Any = checked(16, BATCH_SIZE)
    """Requests per forward pass: an int, or "auto" (lm-eval finds the largest that fits)."""
    device: Optional[str] = None
    """cpu, cuda, cuda:1, ...; None: cuda when there is a GPU, else cpu."""
    dtype: str = checked("auto", one_of(*DTYPES))
    """auto (training's rule, core/precision.py: bfloat16 where the GPU or CPU computes it
    natively, else float16 on GPUs and float32 on CPUs), float32, bfloat16 or float16."""
    limit: Optional[float] = checked(None, positive)
    """Evaluate only the first N questions of each task (N >= 1), or this share of them (< 1)."""
    num_fewshot: Optional[int] = checked(None, non_negative)
    """Few-shot examples per prompt; None: each task's own setting (0 for the bundled ones)."""
    chat_template: Optional[bool] = None
    """Render prompts with the model's chat template; None: when the tokenizer has one."""
    system_instruction: Optional[str] = None
    """A system prompt for every question (with a chat template: a system turn)."""
    parallelize: Optional[bool] = None
    """hf: true: one process splits the model's layers over every visible GPU (lm-eval's
    parallelize); false: every launched process (one per GPU: srun in a SLURM job,
    `torchrun --nproc_per_node N` by hand) holds a full copy and scores a share of the questions.
    None: false when the weights (parameters x dtype bytes) take at most 80% of one GPU's memory,
    else true (evaluation/parallel.py)."""
    gpu_memory_gb: Optional[float] = checked(None, positive)
    """Memory of one GPU in GB (1e9 bytes) for the choices above; None: the first visible GPU's."""
    data_parallel: Optional[int] = checked(None, at_least(1))
    """vllm: model replicas (data_parallel_size; needs ray when > 1). None: the visible GPUs divided
    by tensor_parallel. With hf, the number of launched processes decides it."""
    tensor_parallel: Optional[int] = checked(None, at_least(1))
    """vllm: GPUs one replica is split over (tensor_parallel_size). None: 1 when the weights fit one
    GPU, else the smallest power of two of GPUs that holds them."""
    max_length: Optional[int] = checked(4096, at_least(1))
    """Longest prompt + answer in tokens, passed as lm-eval's max_length (vllm: also its
    max_model_len), never past the model's own context. batch_size=auto probes at this length:
    unbounded, it probes at the model's full context (131072 for Llama-3.1) through repeated
    out-of-memory attempts. None: the model's context."""
    model_args: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for lm-eval's model class, e.g. {gguf_file: X.gguf},
    {attn_implementation: sdpa}, {gpu_memory_utilization: 0.8} (vllm)."""
    skip_scored: bool = False
    """Skip each task that already has its <task>.json in the output folder, so a rerun of a killed
    evaluation scores only what is missing (pipeline evaluation steps set it). A file kept this way
    is not checked against the model or settings: without it, every task is scored again."""
    log_samples: bool = True
    """Also write each task's per-question inputs and outputs to <task>.samples.jsonl. The small
    per-item scores of a multiple-choice task (<task>.items.jsonl, which the study report reads)
    are written either way."""
    seed: int = checked(1234, non_negative)
    """Seed for few-shot sampling and any sampling in generation (the bundled tasks are greedy)."""


def check(cfg: DictConfig) -> None:
    """What one field's checks cannot say (they run first, in compose_config)."""
    if cfg.backend == "hf" and cfg.data_parallel not in (None, 1):
        raise UserError("data_parallel is for backend=vllm: with hf, start one process per GPU "
                        "(`torchrun --nproc_per_node N launch/eval.py ...`; pipelines and SLURM jobs do) "
                        "and drop data_parallel")
    if cfg.backend == "hf" and cfg.tensor_parallel not in (None, 1):
        raise UserError("tensor_parallel is for backend=vllm: with hf, parallelize=true splits the model "
                        "over the GPUs; drop tensor_parallel")
    if cfg.backend == "vllm" and cfg.parallelize:
        raise UserError("parallelize is for backend=hf: with vllm, set tensor_parallel=N")


def compose_eval_config(overrides: List[str]) -> DictConfig:
    """conf/eval_job.yaml + overrides; UserError (one line) on a typo or an unset key."""
    cfg = compose_config(overrides, "eval_job", EvalJobConfig, check=check)
    if OmegaConf.is_missing(cfg, "model_dir"):
        raise UserError("model_dir is not set: python launch/eval.py MODEL_DIR [tasks=[...]]")
    if not cfg.tasks and not cfg.eval_sets:
        raise UserError("no tasks: give tasks=[name,...], eval_sets=[file.jsonl] or a preset eval=<name> (conf/eval/)")
    return cfg


def eval_overrides(argv: List[str]) -> List[str]:
    """launch/eval.py's arguments as overrides: a leading MODEL_DIR becomes model_dir=MODEL_DIR."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        return [f"model_dir={argv[0]}", *argv[1:]]
    return list(argv)


EVAL_COMMAND = ConfigCommand(
    "eval.py", "eval_job", EvalJobConfig, compose_eval_config,
    keys=("model_dir", "tasks", "eval_sets", "limit", "batch_size", "dtype", "device", "backend", "output_dir"),
    example="outputs/sft-tiny eval=domain limit=50",
)
"""launch/eval.py's command line (after eval_overrides): --help, --cfg, or the config to evaluate."""
