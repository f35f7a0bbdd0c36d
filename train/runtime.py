"""Where and how this process trains: decided once, here, for every stage.

GPU: NCCL, bf16 (unless told otherwise). CPU: DeepSpeed's CPU accelerator with gloo, fp32
(bf16 autocast on the CPU measured ~20x slower than fp32, see shared ENVIRONMENT notes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from train.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: nccl or gloo
    precision: str  # fp32, bf16 or fp16
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def fp16(self) -> bool:
        return self.precision == "fp16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)


def detect_runtime(precision: str = "auto") -> Runtime:
    gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if gpu else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"training.precision='{precision}': use auto, fp32, bf16 or fp16")
    if not gpu and precision == "fp16":
        raise UserError("training.precision=fp16 needs a GPU: use fp32 (or auto) on the CPU")
    return Runtime(
        device="cuda" if gpu else "cpu",
        backend="nccl" if gpu else "gloo",
        precision=precision,
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )
