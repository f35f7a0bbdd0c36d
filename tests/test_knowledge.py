"""Knowledge injection: the schedules (conf/pipeline/knowledge_*.yaml) plan the order they claim,
with their exposures and constant learning rate as settings; no schedule ever trains on a Q&A
about a CPT-only fact; the fact-level renderings name their subject in every sentence, state
their value and vary their wording."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from tests.support.env import REPO
from tests.support.eval_sets import EVAL_SETS, rows
from tests.support.files import write_jsonl

from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline

SCHEDULES = ("knowledge_standard", "knowledge_mixed", "knowledge_pit")
MATERIALS = REPO / "data" / "materials"
GENERAL_TEXT = " ".join(r["text"] for r in rows(REPO / "data" / "general" / "cpt.jsonl"))


def train_steps(preset, tmp_path, *overrides):
    plan = plan_pipeline(compose_pipeline_job([f"pipeline={preset}", f"root={tmp_path}", *overrides]))
    return [s for s in plan.steps if s.kind == "train"]


FILES = {"taught_documents": "facts_taught.jsonl", "held_documents": "facts_held.jsonl", "qa": "sft.jsonl"}


def sources_of(step):
    """(name, format, fraction) of each source a step trains on; each name reads its file."""
    sources = step.config.data.mixed.sources
    assert all(Path(s.path).name == FILES[s.name] for s in sources), [(s.name, s.path) for s in sources]
    return [(s.name, s.format, s.fraction) for s in sources]


def test_schedules_plan_their_order(tmp_path):
    steps = {p: train_steps(p, tmp_path) for p in SCHEDULES}
    taught, held, qa = ("taught_documents", "text", 1.0), ("held_documents", "text", 1.0), ("qa", "chat", 1.0)
    assert [sources_of(s) for s in steps["knowledge_standard"]] == [[taught, held], [qa]]
    assert [sources_of(s) for s in steps["knowledge_mixed"]] == [[taught, held, qa]]
    assert [sources_of(s) for s in steps["knowledge_pit"]] == [[qa], [qa, taught], [held, ("qa", "chat", 0.1)]]
    for preset, planned in steps.items():
        for step in planned:
            training = step.config.training
            assert step.stage == "mixed"
            assert (training.lr_scheduler_type, training.learning_rate, training.warmup_steps) == \
                ("constant_with_warmup", 3e-4, 10), preset
    assert [s.config.training.num_train_epochs for s in steps["knowledge_pit"]] == [1, 3, 3]
    # exposures and data are settings: typed once, they reach the steps that read them
    mine = tmp_path / "qa.jsonl"
    mine.write_text((MATERIALS / "sft.jsonl").read_text())
    changed = train_steps("knowledge_pit", tmp_path, "pipeline.settings.held_epochs=5", f"pipeline.settings.qa={mine}",
                          "pipeline.settings.qa_replay=0.25")
    assert [s.config.training.num_train_epochs for s in changed] == [1, 3, 5]
    assert [s.config.data.mixed.sources[0].path for s in changed[:2]] == [str(mine)] * 2
    assert changed[2].config.data.mixed.sources[1].fraction == 0.25


def cpt_only_questions_asked(chat_files) -> list:
    """The CPT-only eval facts (materials_cpt_mc) that a chat of these files states: its subject
    and its value in one chat."""
    chats = [" ".join(m["content"] for m in json.loads(line)["messages"])
             for path in chat_files for line in Path(path).read_text().splitlines() if line.strip()]
    asked = []
    for item in rows(EVAL_SETS / "materials_cpt_mc.jsonl"):
        subject = item["subject"].split(":")[0]
        value = item["options"]["ABCD".index(item["answer"])]  # with its unit: "3.64 angstrom"
        stated = re.compile(rf"(?<![\d.]){re.escape(value)}")
        if any(subject.lower() in chat.lower() and stated.search(chat) for chat in chats):
            asked.append((item["subject"], item["fact"], value))
    return asked


def chat_files(steps) -> set:
    return {s.path for step in steps for s in step.config.data.mixed.sources if s.format == "chat"}


@pytest.mark.parametrize("preset", SCHEDULES)
def test_no_cpt_only_fact_is_asked_in_any_training_set(preset, tmp_path):
    files = chat_files(train_steps(preset, tmp_path))
    assert files == {str(MATERIALS / "sft.jsonl")}
    assert cpt_only_questions_asked(files) == []


def test_a_qa_about_cpt_only_facts_would_be_caught(tmp_path):
    """The check above finds a Q&A about held facts when a schedule is given one."""
    held = [json.loads(l) for l in (MATERIALS / "facts_held.jsonl").read_text().splitlines()[:40]]
    leak = write_jsonl(tmp_path / "leak.jsonl", [{"messages": [
        {"role": "user", "content": f"Tell me about {r['subject']}."}, {"role": "assistant", "content": r["text"]}]}
        for r in held])
    steps = train_steps("knowledge_mixed", tmp_path, f"pipeline.settings.qa={leak}")
    assert len(cpt_only_questions_asked(chat_files(steps))) >= 20


def test_fact_renderings_name_the_subject_state_the_value_and_vary():
    facts_in = {"taught": set(), "held": set()}
    wordings = defaultdict(set)
    for split in facts_in:
        for row in rows(MATERIALS / f"facts_{split}.jsonl"):
            assert row["subject"].lower() in row["text"].lower(), row  # the full name, never a pronoun alone
            assert row["value"] in row["text"], row
            facts_in[split].add(row["fact"])
            template = row["text"].lower().replace(row["subject"].lower(), "S").replace(row["value"], "V")
            wordings[(row["subject"], row["fact"], row["value"])].add(template)
    assert facts_in["held"] == {r["fact"] for r in rows(EVAL_SETS / "materials_cpt_mc.jsonl")}
    assert not facts_in["held"] & facts_in["taught"]
    assert min(len(w) for w in wordings.values()) >= 3  # 4 renderings per fact, 3+ templates per relation
    held_facts = {(r["subject"].split(":")[0], r["fact"]) for r in rows(EVAL_SETS / "materials_cpt_mc.jsonl")}
    rendered = {(s, f) for s, f, _ in wordings}
    assert held_facts <= rendered, sorted(held_facts - rendered)[:5]


# ---------------------------------------------------------------------------------------------
# packing the renderings: never two of one subject in a block, a fresh order every epoch
# ---------------------------------------------------------------------------------------------
def renderings_cfg(*overrides):
    from train.config import compose_train_config

    sources = ", ".join(f"{{path: {MATERIALS / name}, format: {fmt}, fraction: 1.0}}" for name, fmt in
                        (("facts_taught.jsonl", "text"), ("facts_held.jsonl", "text"), ("sft.jsonl", "chat")))
    return compose_train_config(["+stage=mixed", "training.max_seq_length=256", f"data.mixed.sources=[{sources}]",
                                 *overrides])


@pytest.fixture(scope="module")
def tokenizer():
    from train.model import load_tokenizer

    return load_tokenizer(renderings_cfg().model)


def subject_of_rendering() -> dict:
    return {r["text"]: r["subject"] for name in ("facts_taught.jsonl", "facts_held.jsonl")
            for r in rows(MATERIALS / name)}


def block_subjects(row, tokenizer, subjects: dict) -> list:
    """The subject of each rendering packed into a row (chats have none)."""
    found, start = [], 0
    for length in row["seq_lengths"]:
        text = tokenizer.decode(row["input_ids"][start:start + length], skip_special_tokens=True).strip()
        start += length
        if text in subjects:
            found.append(subjects[text])
    return found


def subset_settings(tmp_path, taught=300, held=150, qa=60) -> list:
    """pipeline.settings pointing a schedule at the first rows of each bundled file (a cheap run)."""
    files = {"taught_documents": ("facts_taught.jsonl", taught), "held_documents": ("facts_held.jsonl", held),
             "qa": ("sft.jsonl", qa)}
    settings = []
    for key, (name, n) in files.items():
        path = write_jsonl(tmp_path / name, rows(MATERIALS / name)[:n])
        settings.append(f"pipeline.settings.{key}={path}")
    return settings


def trained_examples(step, tokenizer) -> Counter:
    """The multiset of examples (token tuples) a planned step trains on over all its epochs."""
    from train.data.mixed import prepare_mixed

    data = prepare_mixed(step.config, tokenizer)
    passes = step.config.training.num_train_epochs / data.stats.get("packed_epochs", 1)
    seen = Counter()
    for row in data.train_dataset:
        start = 0
        for length in row["seq_lengths"]:
            seen[tuple(row["input_ids"][start:start + length])] += passes
            start += length
    return seen


def test_general_replay_is_a_tenth_of_every_step_and_the_same_in_every_arm(tokenizer, tmp_path):
    """pipeline.settings.general_share=0.1: every step trains on ~10% general tokens, and each
    source brings its own general text, so the standard and mixed orders at equal exposures train
    on one multiset of examples, the replay included."""
    data = subset_settings(tmp_path)
    arms = {"knowledge_standard": ["pipeline.settings.docs_epochs=2", "pipeline.settings.qa_epochs=2"],
            "knowledge_mixed": ["pipeline.settings.epochs=2"]}
    seen = {}
    for preset, epochs in arms.items():
        seen[preset] = Counter()
        for step in train_steps(preset, tmp_path / preset, *data, *epochs):
            examples = trained_examples(step, tokenizer)
            share = general_share(examples, tokenizer)
            assert 0.07 < share < 0.13, (preset, step.name, share)  # whole examples of <= 256 tokens
            seen[preset] += examples
    assert seen["knowledge_standard"] == seen["knowledge_mixed"]
    off = train_steps("knowledge_mixed", tmp_path / "off", *data, "pipeline.settings.general_share=0")
    assert general_share(trained_examples(off[0], tokenizer), tokenizer) == 0


def general_share(examples: Counter, tokenizer) -> float:
    """The share of the tokens that are general text (data/general/cpt.jsonl)."""
    general = [e for e in examples if tokenizer.decode(e, skip_special_tokens=True).strip() in GENERAL_TEXT]
    return sum(len(e) * examples[e] for e in general) / sum(len(e) * n for e, n in examples.items())


def test_no_block_holds_two_renderings_of_one_subject(tokenizer):
    from train.data.mixed import prepare_mixed

    data = prepare_mixed(renderings_cfg("training.num_train_epochs=2"), tokenizer)
    subjects = subject_of_rendering()
    per_block = [block_subjects(row, tokenizer, subjects) for row in data.train_dataset]
    assert all(len(found) == len(set(found)) for found in per_block)
    # every rendering trains once per epoch, each epoch packed on its own
    renderings = sum(len(rows(MATERIALS / name)) for name in ("facts_taught.jsonl", "facts_held.jsonl"))
    assert sum(len(found) for found in per_block) == 2 * renderings and data.stats["packed_epochs"] == 2
    assert max(len(found) for found in per_block) >= 8  # blocks are full of other subjects' facts


def test_the_order_of_the_facts_is_drawn_again_every_epoch(tokenizer):
    from train.data.mixed import LOSS_KIND, SUBJECT, pack_by_subject

    cfg = renderings_cfg()
    examples = [{"input_ids": [s, s, 7], "labels": [s, s, 7], LOSS_KIND: [0] * 3, SUBJECT: f"s{s % 40}"}
                for s in range(400)]
    import datasets

    table = datasets.Dataset.from_list(examples)
    subjects = [e[SUBJECT] for e in examples]
    once = pack_by_subject(table.remove_columns(SUBJECT), subjects, 30, 1, cfg.training.seed)["input_ids"]
    twice = pack_by_subject(table.remove_columns(SUBJECT), subjects, 30, 2, cfg.training.seed)["input_ids"]
    assert twice[: len(once)] == once  # the first epoch as packed alone
    second = twice[len(once):]
    assert sorted(t for row in second for t in row) == sorted(t for row in once for t in row)
    blocks = lambda packed: {frozenset(row[::3]) for row in packed}  # the first token of each example
    assert len(blocks(once) & blocks(second)) <= len(once) // 10  # other neighbours, not the same blocks


# ---------------------------------------------------------------------------------------------
# the measurement: two wordings per CPT-only fact, familiar distractors, a fictional control
# ---------------------------------------------------------------------------------------------
def number(option: str) -> str:
    return option.split()[0]


def test_every_cpt_only_fact_is_asked_twice_in_independent_wordings():
    from tests.support.eval_sets import ngrams

    items = rows(EVAL_SETS / "knowledge_cpt_mc.jsonl")
    by_fact = defaultdict(list)
    for item in items:
        by_fact[item["fact_id"]].append(item)
    held = {f"{r['subject']}|{r['fact']}" for r in rows(EVAL_SETS / "materials_cpt_mc.jsonl")}
    assert set(by_fact) == held and len(items) == 2 * len(held) >= 370
    for pair in by_fact.values():
        first, second = sorted(pair, key=lambda r: r["wording"])
        assert (first["wording"], second["wording"]) == (1, 2) and first["question"] != second["question"]
    from data.make_eval_sets import SECOND_WORDING, WORDING

    for kind, second in SECOND_WORDING.items():  # the wordings share no 3 words in a row but the subject's
        assert not ngrams(WORDING[kind][0], 3) & ngrams(second, 3), kind


def test_every_option_is_a_value_the_renderings_state_for_that_relation():
    """No option is an unfamiliar string: the wrong ones are other subjects' values of the same relation."""
    stated = defaultdict(dict)  # relation -> value -> subjects the renderings give it to
    for r in rows(MATERIALS / "facts_held.jsonl"):
        stated[r["fact"]].setdefault(r["value"], set()).add(r["subject"])
    for item in rows(EVAL_SETS / "knowledge_cpt_mc.jsonl"):
        subject = item["subject"].split(":")[0]
        right = number(item["options"]["ABCD".index(item["answer"])])
        assert subject in stated[item["fact"]][right], item
        for option in item["options"]:
            assert number(option) in stated[item["fact"]], (item, option)


def test_the_control_asks_about_subjects_no_training_file_mentions():
    items = rows(EVAL_SETS / "knowledge_control_mc.jsonl")
    text = " ".join(p.read_text().lower() for p in MATERIALS.glob("*.jsonl"))
    subjects = {item["subject"].split(":")[0].lower() for item in items}
    assert len(items) >= 60 and len(subjects) >= 20
    assert not [s for s in subjects if s in text]
    pools = {kind: {number(o) for r in rows(EVAL_SETS / "knowledge_cpt_mc.jsonl") if r["fact"] == kind
                    for o in r["options"]} for kind in {i["fact"] for i in items}}
    assert all(number(o) in pools[item["fact"]] for item in items for o in item["options"])
    answers = [item["answer"] for item in items]
    assert max(map(answers.count, "ABCD")) - min(map(answers.count, "ABCD")) <= 1


def test_the_control_set_is_what_the_generator_writes(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "data.make_eval_sets", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    name = "knowledge_control_mc.jsonl"
    assert (tmp_path / name).read_bytes() == (EVAL_SETS / name).read_bytes()
