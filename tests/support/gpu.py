"""When tests/gpu/ is collected (tests/conftest.py's collection hook asks this), and what the GPU
suite checks a QLoRA run's merged model against."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

from tests.support.env import REPO
from tests.support.selection import marker_requested

GPU_SUITE = REPO / "tests" / "gpu"


def gpu_suite_requested(args: List[str], markexpr: str, cwd: Path) -> bool:
    """tests/gpu/ is collected only when asked for: a path inside it on the command line, or a
    `-m` expression that selects `gpu`. A CPU-only `python -m pytest` (CI) then neither runs
    nor skips it; `python -m pytest tests/gpu -m gpu` does, and skips each test without CUDA."""
    if marker_requested(markexpr, "gpu"):
        return True
    for arg in args:
        path = (cwd / arg.split("::")[0]).resolve()
        if path == GPU_SUITE or GPU_SUITE in path.parents:
            return True
    return False


QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
"""The weights a 4-bit load turns into bitsandbytes' Linear4bit (every Linear but lm_head)."""


def qlora_merge_reference(base_dir: Path, adapter_dir: Path, quant_type: str, double_quant: bool,
                          device: str = "cpu") -> Dict[str, Tuple["torch.Tensor", "torch.Tensor"]]:
    """{plain weight name: (base, delta)} in float32 for each 4-bit layer of a QLoRA run: the base
    weight after bitsandbytes' 4-bit round trip (what Linear4bit holds once the model loads, blocks
    of 64), and the adapter's delta lora_B @ lora_A * lora_alpha / r (zero where none). The run's
    merged model must hold base + delta."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from safetensors.torch import load_file

    from tests.support.models import load_dir

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("use_dora"), config  # delta as written below
    scale = config["lora_alpha"] / config["r"]
    adapter = {k: v.to(device, torch.float32) for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    reference = {}
    for name, weight in load_dir(base_dir).items():
        if not QUANTIZED.fullmatch(name):
            continue
        weight = weight.to(device)
        packed, state = quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant,
                                      quant_storage=weight.dtype)
        base = dequantize_4bit(packed, state).float()
        lora = f"base_model.model.{name.removesuffix('.weight')}"
        delta = torch.zeros_like(base)
        if f"{lora}.lora_A.weight" in adapter:
            delta = scale * adapter[f"{lora}.lora_B.weight"] @ adapter[f"{lora}.lora_A.weight"]
        reference[name] = (base.cpu(), delta.cpu())
    return reference
