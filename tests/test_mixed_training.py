"""Mixed training (+stage=mixed, data.mixed.sources): raw text trains on every token and chat
Q&A on the answers only, also inside packed rows; each token's kind reaches the batch aligned
with the labels; the per-kind loss is the trainer's own loss split by kind; bad sources fail in
one line. Launched runs (2 ranks under ZeRO-3, the loss of both kinds falling, the kinds' losses
recombining into the trainer's) are the knowledge schedules' in tests/test_knowledge.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tests.support.labels import trained_spans

from core.errors import UserError
from train.config import compose_train_config
from train.data import IGNORE_INDEX
from train.data.mixed import CHAT, LOSS_KIND, TEXT, prepare_mixed
from train.model import load_tokenizer
from train.stages.mixed import KindLossTrainer


def mixed_cfg(*overrides):
    return compose_train_config(["+stage=mixed", "training.max_seq_length=256", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(mixed_cfg().model)


def bundled_texts(cfg):
    """The CPT documents, and every assistant and non-assistant turn of the SFT chats."""
    docs = [json.loads(l)["text"] for l in open(cfg.data.cpt.path)]
    chats = [json.loads(l)["messages"] for l in open(cfg.data.sft.path)]
    answers = {m["content"] for c in chats for m in c if m["role"] == "assistant"}
    prompts = {m["content"] for c in chats for m in c if m["role"] != "assistant"}
    return docs, answers, prompts


def segments(row):
    """(input_ids, labels, kinds) of each example packed into a row."""
    start = 0
    for length in row["seq_lengths"]:
        end = start + length
        yield row["input_ids"][start:end], row["labels"][start:end], row[LOSS_KIND][start:end]
        start = end


@pytest.mark.parametrize("packing", [True, False])
def test_loss_masks_on_the_prepared_rows(tokenizer, packing):
    """Text: every token trains. Chat: exactly the assistant answers (and their end-of-turn)."""
    cfg = mixed_cfg(f"stage.packing={str(packing).lower()}")
    data = prepare_mixed(cfg, tokenizer)
    docs, answers, prompts = bundled_texts(cfg)
    seen = {TEXT: 0, CHAT: 0}
    for row in data.train_dataset:
        parts = segments(row) if packing else [(row["input_ids"], row["labels"], row[LOSS_KIND])]
        for ids, labels, kinds in parts:
            assert len(set(kinds)) == 1, "one example is one kind"
            kind = kinds[0]
            seen[kind] += 1
            if kind == TEXT:
                assert labels == ids
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                assert any(text in doc for doc in docs), text
                continue
            spans = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in trained_spans(ids, labels)]
            assert spans and all(s in answers for s in spans), spans
            untrained = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
            assert any(p in untrained for p in prompts), "the question is context, not a target"
    assert seen[TEXT] == data.stats["kind/text/examples"] and seen[CHAT] == data.stats["kind/chat/examples"]
    assert seen[TEXT] > 0 and seen[CHAT] > 0


def test_long_documents_are_cut_into_chunks_not_truncated(tokenizer):
    cfg = compose_train_config(["+stage=mixed", "training.max_seq_length=64"])
    data = prepare_mixed(cfg, tokenizer)
    docs, _, _ = bundled_texts(cfg)
    corpus_tokens = sum(len(tokenizer(doc)["input_ids"]) + 1 for doc in docs)  # + EOS
    assert data.stats["kind/text/tokens"] == corpus_tokens
    assert data.stats["kind/text/examples"] > len(docs)


def test_collated_kinds_line_up_with_the_labels(tokenizer):
    data = prepare_mixed(mixed_cfg(), tokenizer)
    rows = [data.train_dataset[i] for i in range(4)]
    batch = data.data_collator(rows)
    assert batch[LOSS_KIND].shape == batch["labels"].shape
    flat = [k for row in rows for k in row[LOSS_KIND]]
    assert batch[LOSS_KIND][0, : len(flat)].tolist() == flat


def test_kind_losses_split_the_tokens_the_model_scores():
    """The hook sums -log p of each kind's tokens, shifted as the labels are (token t scores t+1)."""
    stub = SimpleNamespace(model=SimpleNamespace(training=True),
                           _window={"train": torch.zeros(2, 2, dtype=torch.float64)},
                           _batch_kinds=torch.tensor([[TEXT, TEXT, TEXT, CHAT, CHAT, CHAT]]))
    log_probs = -torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])  # scores of tokens 1..5
    label_mask = torch.tensor([[True, True, True, False, True]])  # token 4 untrained
    KindLossTrainer._record_kind_losses(stub, None, (), {}, SimpleNamespace(log_probs=log_probs, label_mask=label_mask))
    assert stub._window["train"].tolist() == [[3.0, 20.0], [2.0, 2.0]]


def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as err:
        fn(*args)
    return str(err.value)


def test_bad_mixed_sources_fail_in_one_line(tokenizer, repo):
    cpt, sft = repo / "data/materials/cpt.jsonl", repo / "data/materials/sft.jsonl"
    no_format = mixed_cfg(f"data.mixed.sources=[{{path: {cpt}}}, {{path: {sft}, format: chat}}]")
    assert "data.mixed.sources[0] has no format" in error_of(prepare_mixed, no_format, tokenizer)
    a_path = mixed_cfg(f"data.mixed.path={cpt}")
    assert "data.mixed.path" in error_of(prepare_mixed, a_path, tokenizer)
    wrong_columns = mixed_cfg(f"data.mixed.sources=[{{path: {sft}, format: text}}]")
    assert "data.mixed.sources[0].path" in error_of(prepare_mixed, wrong_columns, tokenizer)
    unset = mixed_cfg("data.cpt.path=null", f"data.cpt.sources=[{{path: {cpt}}}]")
    assert "data.mixed.sources[0].path is empty" in error_of(prepare_mixed, unset, tokenizer)
    from train.data.cpt import prepare_cpt

    format_on_cpt = compose_train_config(["+stage=cpt", "data.cpt.path=null",
                                          f"data.cpt.sources=[{{path: {cpt}, format: text}}]"])
    assert "format is for data.mixed sources only" in error_of(prepare_cpt, format_on_cpt, tokenizer)
    with pytest.raises(UserError, match="format"):
        mixed_cfg(f"data.mixed.sources=[{{path: {cpt}, format: prose}}]")
    no_general = mixed_cfg("data.mixed.general_share=0.1")
    assert "data.mixed.general is not set" in error_of(prepare_mixed, no_general, tokenizer)
    general_on_cpt = compose_train_config(["+stage=cpt", f"data.cpt.general={cpt}"])
    assert "general replay" in error_of(prepare_cpt, general_on_cpt, tokenizer)
