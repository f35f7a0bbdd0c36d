"""The shared test models (tests/support/models.py, the tiny_pair fixture) are what the merge
tests assume: sharded bf16 checkpoints with the tiny tokenizer beside them; and the hand-written
SLERP gradient rule the merge tests compare with."""

from __future__ import annotations

import json

import pytest

from tests.support.merge import paper_t
from tests.support.models import load_dir


def test_builders_give_sharded_bf16_models_with_tokenizer(tiny_pair):
    base = tiny_pair["base"]
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    tensors = load_dir(base)
    assert "lm_head.weight" in tensors and tensors["model.embed_tokens.weight"].shape == (2048, 32)
    assert (base / "tokenizer.json").is_file() and (base / "chat_template.jinja").is_file()
    assert paper_t("model.layers.1.self_attn.q_proj.weight", 4) == pytest.approx(0.5 + (0.3 - 0.5) / 3)
