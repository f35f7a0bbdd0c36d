"""What `auto` precision means on this machine: one rule for training, evaluation and the
augment rewriter, decided here (no torch, so the GPU answer comes from the caller).

    GPU with native bf16 (compute capability 8.0+)   bf16
    older GPU (V100, T4)                              fp16 (training: dynamic loss scaling)
    CPU with native bf16 (AVX-512-BF16 or AMX-BF16)   bf16
    any other CPU                                     fp32

On a 2-core Xeon with AVX-512-BF16 and AMX (torch 2.13, oneDNN), a bare PyTorch loop trains
SmolLM2-135M at 1.98x its fp32 speed under bf16 autocast (docs/BENCHMARKS.md); without those
instructions torch emulates bf16 and runs slower than fp32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of x86 CPUs that compute bf16 matrix products natively."""

CPU_BF16_ENV = "DOMAINFORGE_CPU_BF16"
"""1 or 0: take this as the CPU's answer instead of probing it (e.g. a CPU whose bf16 units
the probe does not know, or runs that must stay fp32 under `auto`)."""

TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def cpu_has_native_bf16() -> bool:
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return _cpu_flags_have_bf16(CPUINFO)


@functools.lru_cache(maxsize=None)
def _cpu_flags_have_bf16(cpuinfo: Path) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux: no probe, the safe answer
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def auto_precision(gpu: bool, gpu_has_native_bf16: bool = False) -> str:
    """bf16, fp16 or fp32 for `auto` (see the table above); the caller asks torch about the GPU."""
    if gpu:
        return "bf16" if gpu_has_native_bf16 else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def auto_torch_dtype_name(gpu: bool, gpu_has_native_bf16: bool = False) -> str:
    """The same rule as a torch dtype name (bfloat16, float16, float32), for loading a model."""
    return TORCH_DTYPE_NAMES[auto_precision(gpu, gpu_has_native_bf16)]
