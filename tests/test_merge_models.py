"""Tiny sharded Llama checkpoints for the merge tests, an independent in-memory reference merge
(torch, float64), and a check that the builders give what the other merge tests assume.

Other merge test modules import the fixtures and helpers from here.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml
from conftest import REPO
from conftest import test_env as child_env

TOKENIZER = REPO / "train" / "assets" / "tiny_tokenizer"
PAPER_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def build_llama(path: Path, seed: int, vocab=2048, tie=False, dtype="bfloat16", layers=4, intermediate=128,
                shard="60KB") -> Path:
    """A random tiny Llama saved sharded, with the repo's tiny tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size=shard)
    for f in TOKENIZER.iterdir():
        shutil.copyfile(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Dict[str, Path]:
    """base (the 'Instruct' model) and other (the 'fine-tuned' one): bf16, several shards."""
    root = tmp_path_factory.mktemp("merge_models")
    return {"base": build_llama(root / "base", 1), "other": build_llama(root / "other", 2)}


def write_config(path: Path, base: Path, other: Path, t=None, layers=4, **extra) -> Path:
    """The paper's gradient SLERP config in mergekit's slices form."""
    cfg = {
        "slices": [{"sources": [{"model": str(other), "layer_range": [0, layers]},
                                {"model": str(base), "layer_range": [0, layers]}]}],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": PAPER_T if t is None else t},
        "dtype": "bfloat16",
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_merge_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "merge.py"), *map(str, args)],
                          cwd=REPO, env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def load_dir(path: Path):
    """{name: tensor} of every safetensors file in a model directory."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def shard_bytes(path: Path) -> Dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(path).glob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------
# an independent reference: the SLERP in float64 torch on whole tensors
# ---------------------------------------------------------------------------------------------
def reference_slerp(t: float, v0, v1):
    import torch

    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    dot = float(((a / (na if na > 1e-8 else 1.0)) * (b / (nb if nb > 1e-8 else 1.0))).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.reshape(v0.shape).to(torch.float64)


def paper_t(name: str, layers: int) -> float:
    """t for the paper's gradients, written out by hand from the rule in the issue."""
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    d = (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0) if m else 0.0
    for flt, anchors in (("self_attn", [0, 0.5, 0.3, 0.7, 1]), ("mlp", [1, 0.5, 0.7, 0.3, 0])):
        if m and flt in name:
            s = d * (len(anchors) - 1)
            i = int(s)
            j = min(i + 1, len(anchors) - 1)
            return anchors[i] + (s - i) * (anchors[j] - anchors[i])
    return 0.5


def assert_bf16_close(ours, ref, name=""):
    """ours (bf16) equals ref (float64) rounded to bf16, up to one bf16 step where float32
    arithmetic lands on the other side of a rounding boundary (rare)."""
    import torch

    assert ours.dtype == torch.bfloat16, (name, ours.dtype)
    want = ref.to(torch.bfloat16)
    differ = (ours != want)
    assert differ.float().mean().item() < 1e-3, (name, differ.sum().item())
    step = want.float().abs() * 2**-7 + 1e-30
    assert ((ours.float() - want.float()).abs() <= step).all(), name


def test_builders_give_sharded_bf16_models_with_tokenizer(tiny_pair):
    base = tiny_pair["base"]
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    tensors = load_dir(base)
    assert "lm_head.weight" in tensors and tensors["model.embed_tokens.weight"].shape == (2048, 32)
    assert (base / "tokenizer.json").is_file() and (base / "chat_template.jinja").is_file()
    assert paper_t("model.layers.1.self_attn.q_proj.weight", 4) == pytest.approx(0.5 + (0.3 - 0.5) / 3)
