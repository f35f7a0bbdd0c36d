"""The DeepSpeed JSON, generated from conf/deepspeed/<preset>.yaml.

Batch sizes, clipping and precision are "auto": the HF integration fills them from the
TrainingArguments, so precision is decided once (train/runtime.py) and cannot disagree.
"""

from __future__ import annotations

from typing import Any, Dict

from omegaconf import OmegaConf

from core.errors import UserError


def build_deepspeed_config(ds_cfg) -> Dict[str, Any]:
    if ds_cfg.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_stage={ds_cfg.zero_stage}: use 0, 1, 2 or 3")
    if ds_cfg.offload_param and ds_cfg.zero_stage != 3:
        raise UserError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
    zero: Dict[str, Any] = {
        "stage": ds_cfg.zero_stage,
        "overlap_comm": ds_cfg.overlap_comm,
        "contiguous_gradients": ds_cfg.contiguous_gradients,
        "reduce_bucket_size": ds_cfg.reduce_bucket_size,
    }
    if ds_cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds_cfg.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds_cfg.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=ds_cfg.stage3_gather_16bit_weights_on_model_save,
        )
    if ds_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: Dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        # fp16 (GPUs without native bf16): dynamic loss scaling, loss_scale 0 (DeepSpeed's
        # default, stated so the JSON says how fp16 gradients are kept from underflowing).
        "fp16": {"enabled": "auto", "loss_scale": 0},
        "zero_optimization": zero,
        # The HF Trainer builds torch's AdamW (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    extra = OmegaConf.to_container(ds_cfg.extra, resolve=True) if ds_cfg.extra else {}
    return _deep_merge(config, extra)


def offloads_optimizer_to_nvme(ds_cfg) -> bool:
    """Set through deepspeed.extra only; its checkpoints cannot change world size (core/checkpoints.py)."""
    offload = build_deepspeed_config(ds_cfg)["zero_optimization"].get("offload_optimizer") or {}
    return offload.get("device") == "nvme"


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _deep_merge(dict(base[key]), value)
        else:
            base[key] = value
    return base
