"""Preference pairs: plain-text and chat rows render the same through the chat template,
TRL-style truncation is counted, and bad rows fail with one line naming the fix."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from core.errors import UserError
from core.config import REPO_ROOT
from tests.support.models import TOKENIZER
from train.data.preference import check_lengths, tokenize_preference_rows, truncate_pair


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def rows(*triples):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]


def test_plain_and_chat_rows_tokenize_alike(tokenizer):
    plain = rows(("What is the density of iron?", "7.87 g/cm3.", "2.70 g/cm3."))
    chat = [{
        "prompt": [{"role": "user", "content": "What is the density of iron?"}],
        "chosen": [{"role": "assistant", "content": "7.87 g/cm3."}],
        "rejected": [{"role": "assistant", "content": "2.70 g/cm3."}],
    }]
    a, _ = tokenize_preference_rows(plain, tokenizer, 64, 128)
    b, _ = tokenize_preference_rows(chat, tokenizer, 64, 128)
    assert a[0] == b[0]
    # the prompt ends with the assistant header; each answer ends with the end-of-turn token
    assert tokenizer.decode(a[0]["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(a[0]["chosen_ids"]).startswith("7.87 g/cm3.<|im_end|>")
    assert tokenizer.decode(a[0]["rejected_ids"]).startswith("2.70 g/cm3.<|im_end|>")


def test_bundled_chat_and_plain_sets_load(tokenizer):
    for name in ("preference.jsonl", "preference_chat.jsonl"):
        lines = (REPO_ROOT / "data" / "materials" / name).read_text().splitlines()[:20]
        data, stats = tokenize_preference_rows([json.loads(l) for l in lines], tokenizer, 1700, 2048)
        assert len(data) == 20 and stats["truncated_rows"] == 0 and stats["identical_pairs"] == 0


def test_truncation_keeps_the_prompt_end_then_cuts_answers():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103], [200, 201]
    assert truncate_pair(prompt, chosen, rejected, 6, 14) == (prompt, chosen, rejected, False)
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, 6, 12)
    assert cut and p == list(range(4, 10)) and c == chosen and r == rejected  # 6 + 4 <= 12
    p, c, r, cut = truncate_pair(prompt, chosen, rejected, 6, 8)
    assert cut and p == list(range(4, 10)) and c == [100, 101] and r == [200, 201]


def test_truncated_rows_are_counted(tokenizer):
    long_answer = "The density of iron is 7.87 g/cm3 at room temperature, " * 4
    data, stats = tokenize_preference_rows(
        rows(("Density of iron?", long_answer, "2.70"), ("Density of gold?", "19.3", "10.5")), tokenizer, 12, 24
    )
    assert stats == {"preference_rows": 2.0, "truncated_rows": 1.0, "identical_pairs": 0.0}
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 24 for r in data)


def test_row_missing_rejected(tokenizer):
    bad = rows(("q1", "a", "b")) + [{"prompt": "q2", "chosen": "a", "rejected": None}]
    with pytest.raises(UserError, match=r"row 1 has no 'rejected'"):
        tokenize_preference_rows(bad, tokenizer, 64, 128, source="data.preference.path=x.jsonl")


def test_every_chosen_equal_to_rejected(tokenizer):
    with pytest.raises(UserError, match=r"chosen equals rejected in every one of the 2 rows"):
        tokenize_preference_rows(rows(("q1", "a", "a"), ("q2", "b", "b")), tokenizer, 64, 128)
    _, stats = tokenize_preference_rows(rows(("q1", "a", "a"), ("q2", "b", "c")), tokenizer, 64, 128)
    assert stats["identical_pairs"] == 1.0


def test_prompt_longer_than_max_length(tokenizer):
    long_prompt = "Describe the crystal structure of iron in detail. " * 10
    with pytest.raises(UserError) as err:
        tokenize_preference_rows(rows((long_prompt, "bcc", "fcc"), ("Short?", "a", "b")), tokenizer, 16, 32)
    message = str(err.value)
    assert "1 of 2 rows" in message and "raise stage.max_length=" in message
    assert "\n" not in message


def test_max_prompt_length_must_leave_room_for_answers():
    class Stage:
        max_prompt_length, max_length = 2048, 2048

    with pytest.raises(UserError, match="stage.max_prompt_length=2048 must be below stage.max_length=2048"):
        check_lengths(Stage)


def test_max_length_within_the_model_limit():
    class Stage:
        max_prompt_length, max_length = 1700, 8192

    with pytest.raises(UserError, match=r"stage.max_length=8192 exceeds the model's limit of 4096"):
        check_lengths(Stage, 4096)


@pytest.mark.parametrize("fmt", ["parquet", "saved"])
def test_chat_pairs_from_parquet_and_saved_datasets(tmp_path, tokenizer, fmt):
    from datasets import Dataset

    from train.config import compose_train_config
    from train.data.preference import prepare_preference

    lines = (REPO_ROOT / "data" / "materials" / "preference_chat.jsonl").read_text().splitlines()[:8]
    table = Dataset.from_list([json.loads(l) for l in lines])
    path = tmp_path / ("pairs.parquet" if fmt == "parquet" else "pairs")
    table.to_parquet(str(path)) if fmt == "parquet" else table.save_to_disk(str(path))
    cfg = compose_train_config(["+stage=orpo", f"data.preference.path={path}"])
    data = prepare_preference(cfg, tokenizer)
    expected, _ = tokenize_preference_rows([json.loads(l) for l in lines], tokenizer, 1700, 2048)
    assert data.train_dataset[:] == expected[:]
    assert data.stats["preference_rows"] == 8
