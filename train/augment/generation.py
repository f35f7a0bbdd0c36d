"""Text generation for the model-based augment methods: a prompt rendered for the model, and the
backends that generate from a batch of prompts (transformers `generate`, vLLM's offline engine),
chosen by augment.rewrite.backend. The heavy libraries load when a generator is made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from core.errors import UserError
from core.precision import auto_torch_dtype_name
from train.data.chat import fold_system_turn

Generate = Callable[[List[str]], List[Tuple[str, int]]]
"""Rendered prompts -> (rewrite, generated tokens) each."""


def render_prompt(tokenizer, user: str, system_prompt: Optional[str]) -> str:
    """The model's input for one user prompt: through the chat template when the tokenizer has one
    (a base model's tokenizer gets the plain text)."""
    if not getattr(tokenizer, "chat_template", None):
        return user
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(fold_system_turn(tokenizer, messages), tokenize=False,
                                         add_generation_prompt=True)


class TransformersGenerator:
    """Batched `generate` with left padding (decoder-only models continue from the right edge)."""

    def __init__(self, model_dir: Path, tokenizer, rewrite, seed: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        device = "cpu"
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))}"
        dtype_name = rewrite.dtype
        if dtype_name == "auto":  # training's rule (core/precision.py)
            gpu = device != "cpu"
            dtype_name = auto_torch_dtype_name(gpu, gpu and torch.cuda.is_bf16_supported(including_emulation=False))
        dtype = getattr(torch, dtype_name)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.rewrite, self.device, self.seed = rewrite, device, seed

    def __call__(self, prompts: List[str]) -> List[Tuple[str, int]]:
        torch, tok = self.torch, self.tokenizer
        # A chat-rendered prompt already holds its special tokens.
        batch = tok(prompts, return_tensors="pt", padding=True,
                    add_special_tokens=not getattr(tok, "chat_template", None)).to(self.device)
        sampling = self.rewrite.temperature > 0
        if sampling:
            torch.manual_seed(self.seed)
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=self.rewrite.max_new_tokens, do_sample=sampling,
                temperature=self.rewrite.temperature if sampling else None,
                top_p=self.rewrite.top_p if sampling else None, top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        counts = (new != tok.pad_token_id).sum(dim=1).tolist()
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [(text.strip(), int(n)) for text, n in zip(texts, counts)]


class VLLMGenerator:
    """vLLM's offline engine (GPUs): same prompts, same sampling settings."""

    def __init__(self, model_dir: Path, tokenizer, rewrite, seed: int):
        from vllm import LLM, SamplingParams

        dtype = "auto" if rewrite.dtype == "auto" else rewrite.dtype
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed)
        self.params = SamplingParams(max_tokens=rewrite.max_new_tokens, temperature=rewrite.temperature,
                                     top_p=rewrite.top_p if rewrite.temperature > 0 else 1.0, seed=seed)

    def __call__(self, prompts: List[str]) -> List[Tuple[str, int]]:
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]


def check_backend(backend: str) -> None:
    if backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise UserError("augment.rewrite.backend=vllm but vllm is not installed: pip install vllm (GPUs), "
                            "or set augment.rewrite.backend=transformers")


def make_generator(backend: str, model_dir: Path, tokenizer, rewrite, seed: int) -> Generate:
    check_backend(backend)
    return (VLLMGenerator if backend == "vllm" else TransformersGenerator)(model_dir, tokenizer, rewrite, seed)
