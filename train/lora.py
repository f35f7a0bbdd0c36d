"""LoRA and QLoRA through PEFT, for every stage: `training.finetune=lora|qlora`.

    deepspeed launch/train.py +stage=sft training.finetune=lora
    deepspeed launch/train.py +stage=dpo training.finetune=lora lora.r=64 lora.alpha=128
    deepspeed --num_gpus 8 launch/train.py +stage=orpo model=llama3_1_8b training.finetune=qlora

The stage's TRL trainer gets a `peft_config` and wraps the model itself (get_peft_model), under
ZeRO-3 too: DeepSpeed partitions the adapters with the rest. DPO then needs no reference copy:
TRL scores the reference with the adapters disabled. At the end every rank takes part in
gathering the weights; rank 0 writes the adapter to <output_dir>/adapter/ and the merged model
(merge_and_unload) to <output_dir>, which later stages, merges and evals load like any other.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from core.errors import UserError
from train.model import model_config

ADAPTER_DIR = "adapter"


def uses_adapters(cfg) -> bool:
    return cfg.training.finetune in ("lora", "qlora")


def model_module_names(config) -> List[str]:
    """Every module name of the architecture, built on the meta device: no weights, no memory."""
    with torch.device("meta"), no_zero3_init():
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, _ in model.named_modules()]


def target_modules(cfg, config) -> List[str]:
    """lora.target_modules, or the preset for the model's `model_type`."""
    if cfg.lora.target_modules:
        return list(cfg.lora.target_modules)
    family = getattr(config, "model_type", None)
    presets = cfg.lora.family_targets
    if family not in presets:
        raise UserError(
            f"lora.target_modules is not set and model_type '{family}' has no preset in lora.family_targets "
            f"(presets: {', '.join(presets)}): set lora.target_modules=[q_proj,v_proj,...]"
        )
    return list(presets[family])


def check_finetune(cfg, gpu: bool, precision: str) -> None:
    """Everything about `training.finetune` a user can get wrong, before any weight is loaded,
    for a run in `precision` (the runtime's: bf16, fp16 or fp32)."""
    mode = cfg.training.finetune  # its values, and the lora block's ranges, are schema checks
    if mode == "full":
        return
    if mode == "qlora":
        qlora_dtypes(cfg, precision)
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "training.finetune=qlora needs bitsandbytes, which is not installed: pip install -e '.[qlora]' "
            "(or use training.finetune=lora)"
        )
    if mode == "qlora" and not gpu:
        raise UserError(
            "training.finetune=qlora needs a GPU (bitsandbytes 4-bit kernels): use training.finetune=lora on the CPU"
        )
    config = model_config(cfg.model)
    targets = target_modules(cfg, config)
    names = model_module_names(config)
    suffixes = {name.rsplit(".", 1)[-1] for name in names if name}
    unknown = [t for t in targets if t not in suffixes and t not in names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n in names if n.endswith("_proj") or n.endswith("lm_head")})
        raise UserError(
            f"lora.target_modules: {', '.join(unknown)} not in model '{cfg.model.name}' "
            f"({config.model_type}): choose from {', '.join(linear) or 'its module names'}"
        )


def peft_config(cfg):
    """The PEFT LoraConfig for this run; None for full fine-tuning."""
    if not uses_adapters(cfg):
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=target_modules(cfg, model_config(cfg.model)),
        task_type="CAUSAL_LM",
        bias="none",
    )


RUNTIME_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""The torch dtype name of each runtime precision (train/runtime.py)."""


def qlora_dtypes(cfg, precision: str) -> Tuple[torch.dtype, torch.dtype]:
    """(compute, storage) dtypes of QLoRA's 4-bit base in a run of `precision`.

    Storage is the run's dtype: a quantized model is not built under zero.Init, so DeepSpeed
    casts every floating-point parameter that differs from its own dtype
    (engine._cast_module_mixed_precision), and packed 4-bit bytes stored as bf16 in an fp16 run
    would be cast as if they were numbers. Compute is lora.qlora_compute_dtype (None: the run's);
    float32 fits any run, the other half type is refused: bf16 matmuls on a GPU without native
    bf16 (V100, T4), fp16 ones against bf16 activations."""
    run = RUNTIME_DTYPES[precision]
    compute = cfg.lora.qlora_compute_dtype or run
    if compute not in (run, "float32"):
        raise UserError(
            f"lora.qlora_compute_dtype={compute} does not match this run's precision, {precision} "
            f"(training.precision={cfg.training.precision}): set lora.qlora_compute_dtype={run} or float32, or "
            "leave it unset (lora.qlora_compute_dtype=null follows the run)"
        )
    return getattr(torch, compute), getattr(torch, run)


def quantization_config(cfg, precision: str) -> Optional[BitsAndBytesConfig]:
    """QLoRA's 4-bit base (Dettmers et al. 2023: nf4, double quantization, compute in the run's
    half precision) for a run in `precision`. The packed 4-bit weights are stored in the run's
    dtype (bnb_4bit_quant_storage; qlora_dtypes says why), as PEFT's DeepSpeed guide requires
    for ZeRO-3: DeepSpeed partitions and gathers them like the model's other parameters."""
    if cfg.training.finetune != "qlora":
        return None
    compute_dtype, storage_dtype = qlora_dtypes(cfg, precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.lora.qlora_quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=cfg.lora.qlora_double_quant,
        bnb_4bit_quant_storage=storage_dtype,
    )


@contextlib.contextmanager
def no_zero3_init():
    """Build a model as a plain module even while a ZeRO-3 TrainingArguments is alive
    (transformers otherwise wraps every construction in deepspeed.zero.Init)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def gathered_state_dict(trainer) -> Dict[str, torch.Tensor]:
    """The full PEFT model state dict on rank 0 ({} elsewhere). All ranks must call it: under
    ZeRO-3 DeepSpeed gathers every partitioned tensor (stage3_gather_16bit_weights_on_model_save)."""
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def save_adapter_and_merged(trainer, out_dir: Path) -> None:
    """<out_dir>/adapter/ (PEFT adapter) and the merged full model in <out_dir>. Every rank
    calls this; rank 0 writes."""
    state = gathered_state_dict(trainer)
    if not trainer.is_world_process_zero():
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.save_pretrained(str(out_dir / ADAPTER_DIR), state_dict=state)
    merged = merged_model(peft_model, state)
    merged.save_pretrained(str(out_dir))
    if merged.generation_config is not None and peft_model.get_base_model().generation_config is not None:
        peft_model.get_base_model().generation_config.save_pretrained(str(out_dir))


def merged_model(peft_model, state: Dict[str, torch.Tensor]):
    """The plain full-precision model of `peft_model` with its adapters merged (PEFT's
    merge_and_unload), from `state`, its gathered state dict. A QLoRA base is dequantized
    first, so the result has no trace of bitsandbytes and loads with AutoModelForCausalLM."""
    from peft import get_peft_model

    base_config = copy.deepcopy(peft_model.get_base_model().config)
    if getattr(base_config, "quantization_config", None) is not None:
        state = dequantized_state_dict(peft_model, state)
        del base_config.quantization_config  # the merged model is a plain one
    adapter_config = peft_model.peft_config["default"]
    # The same PEFT structure built on the meta device, the gathered tensors assigned into it
    # (no second copy of the weights), then PEFT's merge_and_unload.
    with torch.device("meta"), no_zero3_init():
        skeleton = get_peft_model(AutoModelForCausalLM.from_config(base_config), adapter_config)
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    tied = {n for n in missing if "lm_head" in n} if getattr(base_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"merging the adapter: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    merged = skeleton.merge_and_unload()
    if tied:
        merged.tie_weights()
    return merged


def dequantized_state_dict(peft_model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` with each bitsandbytes 4-bit weight replaced by its dequantized [out, in] tensor
    in the model's dtype, and bitsandbytes' quant-state entries (`weight.absmax`, `quant_map`,
    `nested_*`, `quant_state.*`) dropped.

    Without ZeRO-3, `state` holds those entries beside each packed weight, and they are read
    from it (bitsandbytes' own state_dict writes them consistent with the packed bytes). Under
    ZeRO-3, DeepSpeed's gather returns only the packed storage tensor of each 4-bit parameter
    (in bnb_4bit_quant_storage's dtype); the quantization constants then come from the live
    module's `weight.quant_state`, which partitioning leaves whole on every rank."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    out = dict(state)
    for name, module in peft_model.named_modules():
        weight = getattr(module, "weight", None)
        live_state = getattr(weight, "quant_state", None)
        key = f"{name}.weight"
        if live_state is None or key not in state:  # PEFT's lora wrapper shows its base layer's weight too
            continue
        extras = {k: out.pop(k) for k in [k for k in out if k.startswith(key + ".")]}
        packed = state[key]
        device = live_state.absmax.device
        quant_state = (
            QuantState.from_dict({k[len(key) + 1:]: v for k, v in extras.items()}, device=device)
            if extras else live_state
        )
        out[key] = dequantize_4bit(packed.to(device), quant_state).to(device="cpu", dtype=quant_state.dtype)
    return out


def adapter_summary(cfg) -> dict:
    """What the model card records about the adapters."""
    if not uses_adapters(cfg):
        return {"finetune": cfg.training.finetune}
    lora = OmegaConf.to_container(cfg.lora, resolve=True)
    lora.pop("family_targets", None)
    lora["target_modules"] = target_modules(cfg, model_config(cfg.model))
    if cfg.training.finetune != "qlora":
        for key in [k for k in lora if k.startswith("qlora_")]:
            lora.pop(key)
    return {"finetune": cfg.training.finetune, "lora": lora}
