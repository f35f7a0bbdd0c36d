"""The one tiny-Llama builder and the readers of a saved model directory.

Every test that needs a model makes it here, so a seed and a shape name the same weights
everywhere. The defaults are the merge tests' pair (4 layers, bf16, several 60 KB shards);
EVAL_SHAPE is the 2-layer model that the evaluation and augmentation tests generate with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from tests.support.env import REPO

TOKENIZER = REPO / "train" / "assets" / "tiny_tokenizer"

EVAL_SHAPE = dict(layers=2, hidden=16, intermediate=32, heads=2, kv_heads=1, max_positions=512,
                  special_tokens=True, dtype="float32", shard=None)
"""A 2-layer fp32 model in one file whose config carries the tokenizer's pad and eos ids."""

LLAMA_8B_CONFIG = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False)
"""Meta-Llama-3.1-8B's architecture (its config.json's shape keys): 8.03B parameters."""


def stand_in_model(path: Path, config: Optional[Dict] = None) -> Path:
    """A model directory with only a config.json (default: Llama-3.1-8B's): enough for the checks
    and plans of dry runs, which never load weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or LLAMA_8B_CONFIG))
    return path


def tiny_llama(path: Optional[Path], seed: int = 0, *, layers: int = 4, vocab: int = 2048, hidden: int = 32,
               intermediate: int = 128, heads: int = 4, kv_heads: int = 2, dtype: str = "bfloat16",
               tie: bool = False, shard: Optional[str] = "60KB", max_positions: Optional[int] = None,
               attn: Optional[str] = None, special_tokens: bool = False, favour: Sequence[str] = ()):
    """A random tiny Llama (torch seed `seed`), in `dtype`.

    With `path`: saved there (in `shard`-sized files; None: save_pretrained's default) with the
    repo's tiny tokenizer copied beside it, and `path` is returned. Without: the model itself.

    special_tokens: the config gets the tokenizer's pad and eos ids (the pad row of the
    embedding then starts at zero). attn: the config's attn_implementation.
    favour (token strings): every position predicts those tokens (the first most strongly)
    whatever the input: the layers add nothing to the residual, every embedding has the same
    large first coordinate, and only the favoured rows of the output matrix read it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER) if special_tokens or favour else None
    extra = {}
    if max_positions is not None:
        extra["max_position_embeddings"] = max_positions
    if attn is not None:
        extra["attn_implementation"] = attn
    if special_tokens:
        extra.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie, **extra))
    if favour:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight.mul_(0.01)[:, 0] = 10.0
            model.lm_head.weight.zero_()
            for rank, text in enumerate(favour):
                (token,) = tok.encode(text, add_special_tokens=False)
                model.lm_head.weight[token, 0] = 5.0 - 0.1 * rank
    model = model.to(getattr(torch, dtype))
    if path is None:
        return model
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    for f in TOKENIZER.iterdir():
        shutil.copyfile(f, Path(path) / f.name)
    return path


def load_dir(path: Path):
    """{name: tensor} of every safetensors file in a model directory."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def shard_bytes(path: Path) -> Dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).glob("*.safetensors"))}
