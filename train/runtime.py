"""Where and how this process trains: decided once, here, for every stage.

GPU: NCCL, and bf16 where the GPU computes in bf16 natively (compute capability 8.0+: A100,
H100, L40...), else fp16 with DeepSpeed's dynamic loss scaling (V100, T4), unless told
otherwise. CPU: DeepSpeed's CPU accelerator with gloo, bf16 where the CPU has native bf16
(AVX-512-BF16 or AMX-BF16), else fp32 (core/precision.py holds the rule). bf16 is DeepSpeed's
mixed precision on both: bf16 weights and gradients, fp32 master weights and Adam moments in
the optimizer. Measured on a 2-core Xeon with AMX (docs/BENCHMARKS.md): a bare PyTorch loop
trains SmolLM2-135M 1.98x faster in bf16 than in fp32, so the "bf16 ~20x slower on the CPU"
measured here earlier does not hold on a CPU with native bf16. The project's CPT gets it on
CPU ranks through its own LM head (train/cpu_lm_head.py; TRL's CPU fallback ran part of it in
fp32) and the one-rank gradient shortcut below.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from core.errors import UserError
from core.precision import auto_precision


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


def ensure_process_group_env() -> None:
    """Plain `python launch/train.py` has no launcher: describe a 1-process world so that
    deepspeed.zero.Init can start its process group (it otherwise goes looking for MPI)."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def gpu_has_native_bf16() -> bool:
    """Compute capability 8.0 or newer. torch's default answer also counts bf16 that is merely
    emulated (it can make a bf16 tensor on a V100 or T4): slow there, and some kernels refuse it."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def detect_runtime(precision: str = "auto") -> Runtime:
    gpu = torch.cuda.is_available()
    if precision == "auto":
        precision = auto_precision(gpu, gpu and gpu_has_native_bf16())
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"training.precision='{precision}': use auto, fp32, bf16 or fp16")
    if not gpu and precision == "fp16":
        raise UserError("training.precision=fp16 needs a GPU: use fp32 (or auto) on the CPU")
    if gpu and precision == "bf16" and not gpu_has_native_bf16():
        major, minor = torch.cuda.get_device_capability()
        raise UserError(
            f"training.precision=bf16: this GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor}) "
            "has no native bf16 (it needs 8.0+, e.g. A100 or H100): use training.precision=auto or fp16 "
            "(fp16 with dynamic loss scaling)"
        )
    return Runtime(
        device="cuda" if gpu else "cpu",
        backend="nccl" if gpu else "gloo",
        precision=precision,
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


@contextlib.contextmanager
def training_arguments_accept_cpu_bf16(runtime: Runtime):
    """Let TrainingArguments take bf16=True on a CPU run.

    transformers 5.25 refuses bf16 without a bf16 GPU ("Your setup doesn't support bf16/gpu")
    unless use_cpu=True, and use_cpu sets up gloo itself, skipping DeepSpeed's process group
    (measured: DeepSpeed then counts a world of 1 on each of 2 ranks and rejects the batch).
    Here its check is told what detect_runtime established: this CPU trains in bf16.
    """
    if runtime.device != "cpu" or not runtime.bf16:
        yield
        return
    import transformers.training_args as training_args

    original = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original


def let_accelerate_see_cpu_ranks() -> None:
    """Make accelerate count every rank when DeepSpeed runs on the CPU.

    accelerate 1.15 only picks a distributed backend for DeepSpeed when a GPU-like device is
    present; on the CPU it falls back to a 1-process world, so the HF Trainer neither shards
    the data nor sizes "auto" batches for the real world size (measured: world_size 1 on each
    of 2 ranks, and DeepSpeed then rejects train_batch_size). Here the backend becomes gloo,
    which DeepSpeed's CPU accelerator uses anyway. GPU runs never reach this.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState, "_domainforge_cpu_patch", False):
        return
    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend_name, dist_type = original(self, cpu, sagemaker_dp, backend)
        deepspeed_ranks = (
            backend_name is None
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            and int(os.environ.get("LOCAL_RANK", -1)) != -1
        )
        if deepspeed_ranks:
            return "gloo", DistributedType.MULTI_CPU
        return backend_name, dist_type

    PartialState._prepare_backend = _prepare_backend
    PartialState._domainforge_cpu_patch = True


def pass_gradients_through_on_one_rank() -> None:
    """Under ZeRO-3 with a partition group of one rank, hand each gradient on as its own partition.

    DeepSpeed 0.19.8 reduce-scatters every gradient bucket whatever the group's size: it copies
    the bucket into a flat buffer, divides it by the world size (1) and runs the collective over
    it, before copying each partition into the optimizer's gradient buffer. On one rank the
    reduced partition is the gradient itself, to the bit. Measured on one CPU rank
    (docs/BENCHMARKS.md): ~6% of a bf16 SmolLM2-135M CPT step went to that reduce-scatter.
    """
    import deepspeed.runtime.zero.stage3 as stage3
    import torch.distributed as dist

    if gradients_pass_through_on_one_rank():
        return
    original = stage3.reduce_scatter_coalesced

    def reduce_scatter_coalesced(tensors, group=None):
        if dist.get_world_size(group) == 1:
            return [tensor.view(-1) for tensor in tensors]
        return original(tensors, group)

    reduce_scatter_coalesced._domainforge_one_rank = True
    stage3.reduce_scatter_coalesced = reduce_scatter_coalesced


def gradients_pass_through_on_one_rank() -> bool:
    """Whether pass_gradients_through_on_one_rank is in place in DeepSpeed's ZeRO-3 module."""
    import deepspeed.runtime.zero.stage3 as stage3

    return getattr(stage3.reduce_scatter_coalesced, "_domainforge_one_rank", False)


def release_cpu_allreduce_buffers(runtime: Runtime) -> None:
    """Unlink the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank
    has mapped them.

    On the CPU, DeepSpeed (0.19.8) maps a 66 MB /dev/shm file per rank and never unlinks it, so
    every run left 132 MB of RAM-backed tmpfs behind on 2 ranks (measured: 18 GB after a day of
    test runs, until a later run slowed to a crawl for want of memory). Unlinking the name
    right after the all-ranks barrier keeps the mappings valid for this run, and the memory is
    returned when the processes exit, even when they are killed.
    """
    import torch.distributed as dist

    if runtime.device != "cpu" or not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier()  # every rank has opened every peer's buffer once it is past initialize()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), runtime.rank
    )
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass  # ranks on different hosts: DeepSpeed made no shared buffer


def shutdown_process_group() -> None:
    """Destroy the process group before the interpreter exits. Without it, gloo's worker threads
    are torn down at exit and a finished run can abort with "terminate called without an
    active exception" (exit 250 through the deepspeed launcher; seen once in CI, and
    pytorch/pytorch#190489), which would fail a SLURM afterok chain after a good run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
