"""The storage probe during training (train/value_probe.py): the loss on the value tokens of the
held renderings, scored on the tiny model in-process: exactly the value's tokens, the number the
model's own loss gives on them, falling as the model trains on the renderings, written once per
epoch; a bad probe file is one line before any model loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from core.errors import UserError
from tests.support.models import TOKENIZER, tiny_llama
from train.value_probe import (ValueLossCallback, probe_steps, read_probe_rows, tokenize_probe, value_loss,
                               value_token_mask)
from tests.support.env import REPO

HELD = REPO / "data" / "materials" / "facts_held.jsonl"


@pytest.fixture(scope="module")
def probe():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = read_probe_rows(str(HELD))[:16]
    return tokenizer, rows, tokenize_probe(rows, tokenizer, 256)


def test_the_masked_tokens_are_the_value(probe):
    tokenizer, rows, documents = probe
    for row, (ids, mask) in zip(rows, documents):
        assert tokenizer.decode([t for t, m in zip(ids, mask) if m]).strip() == row["value"]
    # characters 5-9 are the value: tokens 2 and 3 overlap them; the first token is never scored
    assert value_token_mask([(0, 0), (0, 5), (5, 7), (7, 9), (9, 14)], 5, 9) == [False, False, True, True, False]
    assert value_token_mask([(0, 2), (2, 4)], 0, 4) == [False, True]


def test_value_loss_is_the_models_own_loss_on_the_value_tokens(probe):
    tokenizer, _, documents = probe
    model = tiny_llama(None, vocab=2048, dtype="float32")
    total, count = value_loss(model, documents, tokenizer.eos_token_id, "cpu")
    by_hand, tokens = 0.0, 0
    for ids, mask in documents:  # one document at a time, labels only on the value
        labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=labels[None])
        by_hand += float(out.loss) * sum(mask)
        tokens += sum(mask)
    assert count == tokens
    assert total == pytest.approx(by_hand, rel=1e-4)
    assert model.training  # left as it was


def test_value_loss_falls_as_the_model_trains_on_the_renderings(probe, tmp_path):
    tokenizer, rows, documents = probe
    torch.manual_seed(0)
    model = tiny_llama(None, vocab=2048, dtype="float32")
    callback = ValueLossCallback(documents, tokenizer.eos_token_id, str(tmp_path), epochs=3)
    steps_per_epoch = 10
    state = SimpleNamespace(max_steps=3 * steps_per_epoch, global_step=0, is_world_process_zero=True)
    args = SimpleNamespace(device="cpu")
    callback.on_train_begin(args, state, None, model=model)
    batch = tokenizer([r["text"] for r in rows], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(state.max_steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, None, model=model)
    lines = [json.loads(line) for line in (tmp_path / "value_loss.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in lines] == [(0, 0), (1, 10), (2, 20), (3, 30)]
    losses = [r["loss"] for r in lines]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.6 * losses[0], losses
    assert lines[0]["documents"] == 16 and lines[0]["value_tokens"] == sum(sum(m) for _, m in documents)


def test_probe_steps_split_the_run_into_epochs():
    assert probe_steps(30, 3) == {10: 1, 20: 2, 30: 3}
    assert probe_steps(10, 3) == {4: 1, 7: 2, 10: 3}


def test_a_value_missing_from_its_text_is_one_line(tmp_path):
    bad = tmp_path / "held.jsonl"
    bad.write_text(json.dumps({"text": "Iron is a metal.", "value": "7.87"}) + "\n")
    with pytest.raises(UserError, match=r"held.jsonl line 1: its value '7.87' does not occur in its text"):
        read_probe_rows(str(bad))
    with pytest.raises(UserError, match="not found"):
        read_probe_rows(str(tmp_path / "missing.jsonl"))
    bad.write_text("\n" + json.dumps({"text": "Iron is 7.87.", "value": "7.87"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"training.value_probe: .*held.jsonl line 3: not valid JSON"):
        read_probe_rows(str(bad))
    bad.write_text(json.dumps(["Iron", "7.87"]) + "\n")
    with pytest.raises(UserError, match=r"held.jsonl line 1: expected a JSON object, got list"):
        read_probe_rows(str(bad))
