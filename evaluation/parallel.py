"""How one evaluation uses the GPUs of its node, decided when the job starts (the model it scores
may not exist when the job is submitted):

- a model whose weights fit one GPU: every launched process holds a full copy and scores a share
  of the questions (lm-eval's data parallelism; rank 0 gathers and writes the results);
- one that does not (or parallelize=true): one process splits the model's layers over every
  visible GPU (lm-eval's `parallelize=True`); the other launched processes exit at once;
- backend=vllm: one process, vLLM's own tensor_parallel_size x data_parallel_size.

The launcher starts one process per GPU (srun in the SLURM job, torch.distributed.run in a local
pipeline) with RANK / LOCAL_RANK / WORLD_SIZE set; `plan_layout` only decides how many of them work.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

WEIGHTS_SHARE = 0.8
"""Share of one GPU's memory the weights may take and still count as fitting it: the rest holds the
activations and KV cache of the batches (batch_size=auto grows them into it)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
"""config.json keys that give a model's context, in the order lm-eval's resolve_max_length reads them."""
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Launched:
    """The process group a launcher started this process in (torch.distributed's env:// variables)."""

    rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> "Launched":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


@dataclass(frozen=True)
class Layout:
    processes: int
    """Processes that each hold a model copy and score a share: the launched world, or 1."""
    model_args: Dict[str, Any]
    """Arguments of lm-eval's model class that place the model: parallelize (hf), tensor_parallel_size
    and data_parallel_size (vllm), max_length (both)."""
    reason: str
    """One line for the log: why this layout."""


def model_context(model_dir: Path) -> Optional[int]:
    """The context length config.json states (text_config too, for multimodal configs); None if none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    for section in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def bounded_max_length(max_length: Optional[int], model_dir: Path) -> Optional[int]:
    """eval.max_length, never past the model's own context; None: lm-eval's choice (the model's context)."""
    context = model_context(model_dir)
    if max_length is None:
        return None
    return min(max_length, context) if context else max_length


def weight_bytes(parameters: Optional[int], dtype: str) -> Optional[int]:
    return None if parameters is None else parameters * DTYPE_BYTES[dtype]


def gpus_for_weights(weights: Optional[int], gpu_memory: Optional[int]) -> int:
    """GPUs one model copy needs: 1 when unknown or when it fits one."""
    if not weights or not gpu_memory:
        return 1
    return max(1, math.ceil(weights / (WEIGHTS_SHARE * gpu_memory)))


def plan_layout(cfg: DictConfig, weights: Optional[int], max_length: Optional[int], gpus: int,
                gpu_memory: Optional[int], launched: Launched) -> Layout:
    """The layout for `weights` bytes (None: unknown, e.g. a GGUF file) on `gpus` GPUs of
    `gpu_memory` bytes each, with `launched.world_size` processes started."""
    bound = {"max_length": max_length} if max_length else {}
    need = gpus_for_weights(weights, gpu_memory)
    size = f"{weights / 1e9:.1f} GB of weights" if weights else "weights of unknown size"
    memory = f"{gpu_memory / 1e9:.0f} GB GPUs" if gpu_memory else "no GPU memory known"
    if cfg.backend == "vllm":
        tp = cfg.tensor_parallel or min(2 ** math.ceil(math.log2(need)), max(gpus, 1))
        dp = cfg.data_parallel or max(1, gpus // tp)
        return Layout(1, {"tensor_parallel_size": tp, "data_parallel_size": dp, **bound},
                      f"vllm: {dp} replica(s) x {tp} GPU(s) ({size}, {memory})")
    split = cfg.parallelize if cfg.parallelize is not None else (gpus > 1 and need > 1)
    if split:
        return Layout(1, {"parallelize": True, **bound},
                      f"one process, the model split over {gpus} GPU(s) ({size}, {memory})")
    return Layout(launched.world_size, {"parallelize": False, **bound},
                  f"{launched.world_size} process(es), one model copy each ({size}, {memory})")


def gpu_count() -> int:
    """GPUs this machine shows (CUDA_VISIBLE_DEVICES applies); torch is imported only here."""
    import torch

    return torch.cuda.device_count()


def leave_single_process() -> None:
    """Rank 0 of a launched group goes on alone: without the group's variables, accelerate (and
    so lm-eval) sees one process and waits for no one."""
    for key in DISTRIBUTED_ENV:
        os.environ.pop(key, None)
