"""Whether the attention kernel a model preset asks for (`model.attn_implementation`) can run.

transformers only finds out once the model is built: after every rank has tokenized the data
and the process group is up, or, on SLURM, after the job has waited in the queue. So it is
checked twice, earlier:

- before submission, on the login node (launch/submit.py, launch/pipeline.py): is the package
  installed for the interpreter the jobs will run? `importlib.util.find_spec` locates a
  top-level package without executing it, so neither flash-attn nor torch is imported there
  (and the login node needs no GPU); another interpreter (cluster.python) is asked the same
  question in a subprocess;
- at train start, before tokenizing: transformers' own test (`is_flash_attn_2_available`),
  which also needs a CUDA device and flash-attn >= 2.3.3, the GPU-side half the login node
  cannot see; then what transformers does not test and flash-attn's kernels refuse only at the
  first forward ("FlashAttention only supports Ampere GPUs or newer", "only support fp16 and
  bf16 data type"): the GPU's compute capability and the run's precision.

Kernels named by a Hub repo (`kernels-community/...`) are transformers' business and pass.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Optional

from core.errors import UserError

# attn_implementation -> (module it imports, the pip requirement that provides it)
FLASH_KERNELS = {
    "flash_attention_2": ("flash_attn", "flash-attn (or pip install -e \".[flash]\" --no-build-isolation)"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (built from flash-attention's hopper/ folder)"),
}


def module_installed(module: str, python: Optional[str] = None) -> Optional[bool]:
    """Whether `module` is importable by `python` (None or this interpreter: asked in-process,
    without importing it). None when that interpreter cannot be run here to ask."""
    if python is None or python == sys.executable:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 3)"
    try:
        code = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired):
        return None  # e.g. `python` only exists after cluster.setup: train start checks it
    return {0: True, 3: False}.get(code)


SDPA_FIX = "set model.attn_implementation=sdpa"
"""The fix without flash-attn, as launch/train.py takes it."""


def _missing(implementation: str, where: str, sdpa_fix: str) -> UserError:
    module, requirement = FLASH_KERNELS[implementation]
    return UserError(
        f"model.attn_implementation={implementation} needs the {module} package, which is not installed for "
        f"{where}: pip install {requirement}, or {sdpa_fix}"
    )


def check_attention_installed(implementation: str, python: Optional[str] = None, sdpa_fix: str = SDPA_FIX) -> None:
    """Before a job is queued: the kernel's package is installed for `python` (the jobs'
    interpreter; None: this one). A GPU is not needed to know that. `sdpa_fix`: how the
    command that was typed switches to sdpa."""
    if implementation not in FLASH_KERNELS:
        return
    installed = module_installed(FLASH_KERNELS[implementation][0], python)
    if installed is False:
        raise _missing(implementation, python or sys.executable, sdpa_fix)


FLASH_MIN_CAPABILITY = {"flash_attention_2": (8, 0), "flash_attention_3": (9, 0)}
"""The oldest GPU each kernel runs on: flash-attn 2 Ampere (8.0), flash-attn 3 Hopper (9.0)."""
FLASH_PRECISIONS = ("bf16", "fp16")
"""Its kernels take half-precision inputs only."""


def check_attention_runs_here(implementation: str, precision: str) -> None:
    """At train start, before the data is tokenized: the kernel will run on this machine
    (installed, a CUDA device, a supported version: transformers' test; a GPU new enough and a
    half-precision run: flash-attn's), for a run in `precision` (the runtime's: bf16, fp16, fp32)."""
    if implementation not in FLASH_KERNELS:
        return
    check_attention_installed(implementation)
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
    if not available[implementation]():
        raise UserError(
            f"model.attn_implementation={implementation}: {FLASH_KERNELS[implementation][0]} is installed but "
            "transformers cannot use it here (it needs a CUDA GPU, and flash-attn >= 2.3.3 for flash_attention_2): "
            "run on a GPU node, or set model.attn_implementation=sdpa"
        )
    import torch

    capability, needed = torch.cuda.get_device_capability(), FLASH_MIN_CAPABILITY[implementation]
    if tuple(capability) < needed:
        raise UserError(
            f"model.attn_implementation={implementation} needs a GPU of compute capability {needed[0]}.{needed[1]} or "
            f"newer, and this one ({torch.cuda.get_device_name()}) is {capability[0]}.{capability[1]}: "
            f"{SDPA_FIX} (PyTorch's fused attention runs on any GPU)"
        )
    if precision not in FLASH_PRECISIONS:
        raise UserError(
            f"model.attn_implementation={implementation} runs in bf16 or fp16 only, and this run trains in "
            f"{precision} (training.precision): set training.precision=auto (bf16 or fp16 on this GPU), or {SDPA_FIX}"
        )
