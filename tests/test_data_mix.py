"""Weighted data mixing (data.<kind>.sources) and eval splits (eval_fraction, eval_path): each
source's share of the rows follows its weight within a binomial bound, in memory and streaming;
column mapping; the logged per-source shares; bad mixes fail with one line before training."""

from __future__ import annotations

import math

import pytest
from tests.support.env import assert_one_line_error, launch
from tests.support.files import write_jsonl

from core.errors import UserError
from train.config import compose_train_config
from train.data.cpt import prepare_cpt
from train.data.mix import SOURCE, canonical_text, load_split_rows
from train.data.sft import prepare_sft
from train.model import load_tokenizer
from train.data.preference import prepare_preference

WEIGHTS = (1.0, 2.0, 5.0)


def sources_override(kind, entries) -> list:
    """`data.<kind>.path=null data.<kind>.sources=[{path: ..., weight: ...}, ...]` as typed on a command line."""
    items = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries)
    return [f"data.{kind}.path=null", f"data.{kind}.sources=[{items}]"]


def cfg_for(stage, *overrides):
    return compose_train_config([f"+stage={stage}", *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(cfg_for("cpt").model)


@pytest.fixture
def three_corpora(tmp_path):
    """Three text sources of 4000 rows each, tagged by their text."""
    paths = []
    for i in range(3):
        paths.append(write_jsonl(tmp_path / f"src{i}.jsonl", [{"text": f"source {i} document {j}"} for j in range(4000)]))
    return paths


def assert_binomial_shares(counts, weights):
    """Each count is Binomial(n, p_i): within 4.5 standard deviations (a false alarm ~1e-5)."""
    n = sum(counts)
    for count, w in zip(counts, weights):
        p = w / sum(weights)
        assert abs(count / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (counts, weights)


@pytest.mark.parametrize("streaming", [False, True])
def test_row_shares_follow_the_weights(three_corpora, streaming):
    entries = [{"path": str(p), "weight": w} for p, w in zip(three_corpora, WEIGHTS)]
    extra = ["data.cpt.streaming=true", "training.max_steps=2"] if streaming else []
    cfg = cfg_for("cpt", *sources_override("cpt", entries), *extra)
    rows = load_split_rows(cfg, "cpt", canonical_text).train
    tags = [r[SOURCE] for r in rows]
    counts = [tags.count(i) for i in range(3)]
    # first_exhausted: the mix ends when the most-drawn source (weight 5) runs out of its 4000 rows
    assert counts[2] == 4000 and sum(counts) < 3 * 4000
    assert_binomial_shares(counts, WEIGHTS)
    assert all(r["text"].startswith(f"source {t} ") for r, t in zip(rows, tags))  # the tag is the source


def test_fraction_takes_that_share_of_each_source(three_corpora):
    entries = [{"path": str(p), "fraction": f} for p, f in zip(three_corpora, (1.0, 0.5, 0.25))]
    rows = load_split_rows(cfg_for("cpt", *sources_override("cpt", entries)), "cpt", canonical_text).train
    tags = rows[SOURCE]
    assert [tags.count(i) for i in range(3)] == [4000, 2000, 1000]
    assert tags[:50] != sorted(tags[:50])  # shuffled, not one source after another


def test_cpt_mix_logs_row_and_token_shares(three_corpora, tokenizer, capsys):
    entries = [{"path": str(p), "weight": w, "name": f"s{i}"} for i, (p, w) in enumerate(zip(three_corpora, WEIGHTS))]
    data = prepare_cpt(cfg_for("cpt", *sources_override("cpt", entries), "training.max_seq_length=64"), tokenizer)
    stats = data.stats
    assert sum(stats[f"mix/s{i}/rows"] for i in range(3)) == pytest.approx(1.0)
    assert sum(stats[f"mix/s{i}/tokens"] for i in range(3)) == pytest.approx(1.0)
    n = stats["num_documents"]
    assert_binomial_shares([round(stats[f"mix/s{i}/rows"] * n) for i in range(3)], WEIGHTS)
    assert SOURCE not in data.train_dataset.column_names
    assert "cpt data mix over" in capsys.readouterr().out


def test_column_mapping_and_mixed_formats(tmp_path, tokenizer):
    """A question/answer source, mapped to prompt/completion, mixes with a `messages` source."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(40)])
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"U{i}?"},
                                                                {"role": "assistant", "content": f"R{i}."}]}
                                                  for i in range(40)])
    entries = [{"path": str(chats), "name": "chat"},
               {"path": str(qa), "name": "qa", "columns": "{question: prompt, answer: completion}"}]
    data = prepare_sft(cfg_for("sft", *sources_override("sft", entries)), tokenizer)
    texts = [tokenizer.decode(r["input_ids"]) for r in data.train_dataset]
    assert any("<|im_start|>user\nQ3?<|im_end|>\n<|im_start|>assistant\nA3.<|im_end|>" in t for t in texts)
    assert any("<|im_start|>user\nU3?<|im_end|>" in t for t in texts)
    assert data.stats["mix/qa/rows"] + data.stats["mix/chat/rows"] == pytest.approx(1.0)


def test_preference_mix_of_string_and_chat_pairs(tmp_path, tokenizer, repo):
    entries = [{"path": str(repo / "data/materials/preference.jsonl"), "name": "text_pairs"},
               {"path": str(repo / "data/materials/preference_chat.jsonl"), "name": "chat_pairs"}]
    cfg = cfg_for("orpo", *sources_override("preference", entries), "stage.max_length=256",
                  "stage.max_prompt_length=192")
    data = prepare_preference(cfg, tokenizer)
    assert data.stats["mix/text_pairs/rows"] + data.stats["mix/chat_pairs/rows"] == pytest.approx(1.0)
    assert set(data.train_dataset.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids"}


def test_bundled_replay_preset_prepares_every_kind(tokenizer):
    sft = prepare_sft(cfg_for("sft", "data=materials_replay", "training.max_seq_length=256"), tokenizer)
    assert 0.7 < sft.stats["mix/materials/rows"] < 0.9
    cpt = prepare_cpt(cfg_for("cpt", "data=materials_replay", "training.max_seq_length=256"), tokenizer)
    assert 0.7 < cpt.stats["mix/materials/rows"] < 0.9


# ---------------------------------------------------------------------------------------------
# eval splits
# ---------------------------------------------------------------------------------------------
def test_eval_fraction_holds_out_rows(tokenizer):
    # Unpacked, so that rows are counted (the SFT preset packs them into blocks).
    whole = prepare_sft(cfg_for("sft", "stage.packing=false", "training.max_seq_length=256"), tokenizer).train_dataset
    data = prepare_sft(cfg_for("sft", "stage.packing=false", "training.max_seq_length=256",
                               "data.sft.eval_fraction=0.1"), tokenizer)
    assert len(data.eval_dataset) == math.ceil(0.1 * len(whole))
    assert len(data.train_dataset) + len(data.eval_dataset) == len(whole)
    held_out = {tuple(r["input_ids"]) for r in data.eval_dataset}
    assert not held_out & {tuple(r["input_ids"]) for r in data.train_dataset}


def test_eval_path_for_cpt_and_preference(tmp_path, tokenizer, repo):
    docs = write_jsonl(tmp_path / "eval.jsonl", [{"text": "Iron has atomic number 26."}] * 3)
    data = prepare_cpt(cfg_for("cpt", f"data.cpt.eval_path={docs}", "training.max_seq_length=16",
                               "data.cpt.streaming=true", "training.max_steps=2"), tokenizer)
    assert len(data.eval_dataset) >= 1 and all(len(b["input_ids"]) == 16 for b in data.eval_dataset)
    pairs = cfg_for("dpo", "data.preference.max_samples=8", "stage.max_length=256", "stage.max_prompt_length=192",
                    f"data.preference.eval_path={repo / 'data/materials/preference_chat.jsonl'}",
                    "training.log_completions=2", "logging=wandb")
    data = prepare_preference(pairs, tokenizer)
    assert len(data.eval_dataset) == 437 and len(data.eval_prompts) == 2
    assert [m["role"] for m in data.eval_prompts[0]] == ["system", "user"]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def error_of(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_mix_and_eval_options(three_corpora, tokenizer):
    a, b, _ = (str(p) for p in three_corpora)
    cases = [
        (sources_override("cpt", [{"path": a, "weight": 1}, {"path": b, "fraction": 0.5}]), "1 of 2 sources set fraction"),
        (sources_override("cpt", [{"path": a, "weight": 1, "fraction": 0.5}]), "sets both weight and fraction"),
        (sources_override("cpt", [{"path": a, "fraction": 0.5}]) + ["data.cpt.streaming=true", "training.max_steps=2"],
         "a stream does not have"),
        ([f"data.cpt.sources=[{{path: {a}}}]"], "set exactly one of data.cpt.path (one source) or data.cpt.sources"),
        (["data.cpt.path=null"], "neither is set"),
        (["data.cpt.eval_fraction=0.1", f"data.cpt.eval_path={a}"], "not both"),
        (["data.cpt.eval_fraction=0.1", "data.cpt.streaming=true", "training.max_steps=2"], "set data.cpt.eval_path"),
        (["training.log_completions=2"], "set data.cpt.eval_fraction or data.cpt.eval_path"),
        (["training.log_completions=2", "data.cpt.eval_fraction=0.1"], "set logging=wandb"),
        (sources_override("cpt", [{"path": a, "columns": "{body: text}"}]), "data.cpt.sources[0].columns renames 'body'"),
    ]
    for overrides, needle in cases:
        assert needle in error_of(prepare_cpt, cfg_for("cpt", *overrides), tokenizer), overrides
    # Out-of-range values stop at composition, before any data is read.
    assert error_of(cfg_for, "cpt", "data.cpt.eval_fraction=1.5") == "data.cpt.eval_fraction=1.5: must be in (0, 1)"


def test_mix_weight_not_positive_fails_before_training(tmp_path, three_corpora):
    a, b, _ = (str(p) for p in three_corpora)
    out = tmp_path / "run"
    proc = launch("train.py", ["+stage=cpt", f"output_dir={out}",
                               *sources_override("cpt", [{"path": a, "weight": 1}, {"path": b, "weight": 0}])])
    assert_one_line_error(proc, "data.cpt.sources[1].weight=0.0: must be > 0")
    assert not out.exists()


def test_source_whose_columns_cannot_be_mapped_fails_before_training(tmp_path, repo):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    out = tmp_path / "run"
    entries = [{"path": str(repo / "data/materials/sft.jsonl")}, {"path": str(qa), "columns": "{question: prompt}"}]
    proc = launch("train.py", ["+stage=sft", f"output_dir={out}", *sources_override("sft", entries)])
    assert_one_line_error(proc, f"data.sft.sources[1].path={qa} has columns [prompt, answer] but sft data needs",
                          "data.sft.sources[1].columns=")
    assert not out.exists()
