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
from tests.support.env import REPO, launch, tail
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
    assert [sources_of(s) for s in steps["knowledge_pit"]] == [[qa], [qa, taught], [taught, held], [held]]
    for preset, planned in steps.items():
        for step in planned:
            training = step.config.training
            assert step.stage == "mixed"
            assert (training.lr_scheduler_type, training.learning_rate, training.warmup_steps) == \
                ("constant_with_warmup", 3e-4, 10), preset
    # the same tokens in every schedule: each document and each Q&A 3 times
    for preset, planned in steps.items():
        passes = Counter()
        for step in planned:
            for name, _, fraction in sources_of(step):
                passes[name] += step.config.training.num_train_epochs * fraction
        assert passes == {"taught_documents": 3, "held_documents": 3, "qa": 3}, preset
    # exposures and data are settings: typed once, they reach the steps that read them
    mine = tmp_path / "qa.jsonl"
    mine.write_text((MATERIALS / "sft.jsonl").read_text())
    changed = train_steps("knowledge_pit", tmp_path, "pipeline.settings.held_epochs=5", f"pipeline.settings.qa={mine}",
                          "pipeline.settings.taught_held_epochs=2")
    assert [s.config.training.num_train_epochs for s in changed] == [1, 2, 2, 5]
    assert [s.config.data.mixed.sources[0].path for s in changed[:2]] == [str(mine)] * 2


RELATION_WORDS = {  # how a question or answer names each CPT-only relation, in any of the wordings
    "b_c": r"scattering length|scatters? neutrons",
    "lattice_a": r"lattice|unit cell|crystal cell|cell edge|side a\b",
    "major_abundance": r"percent|%|abundance|share of (?:natural|the)",
    "mass_fraction": r"percent|%|by weight|by mass|mass fraction|fraction of the mass|of its weight",
}
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def cpt_only_facts() -> set:
    """(subject, relation, value) of every CPT-only fact: the held renderings' and both eval sets'
    (a compound's mass fraction goes by its formula, e.g. CeO2)."""
    facts = {(r["subject"], r["fact"], float(r["value"])) for r in rows(MATERIALS / "facts_held.jsonl")}
    for name in ("materials_cpt_mc.jsonl", "knowledge_cpt_mc.jsonl"):
        for item in rows(EVAL_SETS / name):
            value = item["options"]["ABCD".index(item["answer"])].split()[0]
            facts.add((item["subject"].split(":")[0], item["fact"], float(value)))
    return facts


def qa_pairs(path) -> list:
    """Each question with its answer (a user turn and the assistant turn after it), as one text."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        turns = json.loads(line)["messages"] if line.strip() else []
        pairs += [turns[i]["content"] + "\n" + turns[i + 1]["content"] for i in range(len(turns) - 1)
                  if turns[i]["role"] == "user" and turns[i + 1]["role"] == "assistant"]
    return pairs


def names(pair: str, subject: str) -> bool:
    """An element by its name in any case; a compound by its formula as written."""
    flags = re.IGNORECASE if subject.islower() else 0
    return re.search(rf"(?<![\w-]){re.escape(subject)}(?![\w])", pair, flags) is not None


def cpt_only_facts_asked(pairs) -> list:
    """The CPT-only facts that a Q&A pair asks or answers: it names the subject and either names
    the fact's relation or states its value (as a number: 7.75, 7.750 and "7.75 fm" are one)."""
    by_subject = defaultdict(list)
    for subject, relation, value in cpt_only_facts():
        by_subject[subject].append((relation, value))
    asked = []
    for pair in pairs:
        numbers = {float(n) for n in NUMBER.findall(pair)}
        for subject, facts in by_subject.items():
            if names(pair, subject):
                asked += [(subject, relation, value, pair) for relation, value in facts
                          if value in numbers or re.search(RELATION_WORDS[relation], pair, re.IGNORECASE)]
    return asked


def chat_files(steps) -> set:
    return {s.path for step in steps for s in step.config.data.mixed.sources if s.format == "chat"}


@pytest.mark.parametrize("preset", SCHEDULES)
def test_no_cpt_only_fact_is_asked_in_any_training_set(preset, tmp_path):
    """On the bundled data: no Q&A of any step asks about a CPT-only fact, and the general text
    replayed in every step states none."""
    steps = train_steps(preset, tmp_path)
    files = chat_files(steps)
    assert files == {str(MATERIALS / "sft.jsonl")}
    assert cpt_only_facts_asked(p for f in files for p in qa_pairs(f)) == []
    general = {step.config.data.mixed.general for step in steps}
    assert general == {str(REPO / "data" / "general" / "cpt.jsonl")}
    documents = [r["text"] for path in general for r in rows(Path(path))]
    assert [(s, r, v) for s, r, v, text in cpt_only_facts_asked(documents) if v in map(float, NUMBER.findall(text))] == []


def test_a_qa_about_cpt_only_facts_would_be_caught(tmp_path):
    """The check above finds every CPT-only fact asked in either eval wording (by its relation,
    with an answer that states no value), through a schedule's Q&A setting; and one whose value
    alone is stated beside the subject, in another number format."""
    assert set(RELATION_WORDS) == {relation for _, relation, _ in cpt_only_facts()}
    items = rows(EVAL_SETS / "knowledge_cpt_mc.jsonl")
    leak = write_jsonl(tmp_path / "leak.jsonl", [{"messages": [
        {"role": "user", "content": item["question"]}, {"role": "assistant", "content": "As the handbook says."}]}
        for item in items])
    steps = train_steps("knowledge_pit", tmp_path, f"pipeline.settings.qa={leak}")
    caught = {(subject, relation) for subject, relation, _, _ in
              cpt_only_facts_asked(p for f in chat_files(steps) for p in qa_pairs(f))}
    assert caught >= {(item["subject"].split(":")[0], item["fact"]) for item in items}
    # the value alone, with the subject, is caught too: a question that never names the relation
    vague = [f"Tell me about {s}.\nOne number: {v:.3f}" for s, _, v in sorted(cpt_only_facts())[:50]]
    assert len({pair for *_, pair in cpt_only_facts_asked(vague)}) == 50


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
# the schedules, launched: each step trains on its data, and the loss of both kinds falls
# ---------------------------------------------------------------------------------------------
SMALL = {"taught_documents": 150, "held_documents": 80, "qa": 40}
"""Rows of each bundled file a launched schedule trains on (the first ones), so it runs in seconds."""

RUNS = {  # per schedule: its exposures, and (source -> rows) of each step's data besides the general replay
    "knowledge_standard": (["docs_epochs=3", "qa_epochs=3"],
                           {"documents": {"taught_documents": 150, "held_documents": 80}, "qa": {"qa": 40}}),
    "knowledge_mixed": (["epochs=4"], {"mixed": {"taught_documents": 150, "held_documents": 80, "qa": 40}}),
    "knowledge_pit": (["qa_epochs=2", "taught_epochs=2", "taught_held_epochs=1", "held_epochs=2"],
                      {"qa": {"qa": 40}, "qa-taught": {"qa": 40, "taught_documents": 150},
                       "taught-held": {"taught_documents": 150, "held_documents": 80},
                       "held": {"held_documents": 80}}),
}
MIX_LINE = re.compile(r"mixed data mix over (\d+) rows: (.*)")
SHARE = re.compile(r"(\S+) ([\d.]+)% of rows, ([\d.]+)% of tokens")


def step_mixes(stdout: str, preset: str) -> dict:
    """Per step, in the order they ran: {source: (rows, share of tokens)}, read off the `mixed data
    mix` line each step prints."""
    mixes = {}
    for chunk in stdout.split(f"pipeline {preset}: step ")[1:]:
        found = MIX_LINE.search(chunk)
        if found:
            rows_in_all = int(found.group(1))
            mixes[chunk.split(":")[0]] = {name: (round(rows_in_all * float(r) / 100), float(t) / 100)
                                          for name, r, t in SHARE.findall(found.group(2))}
    return mixes


def step_log(step_dir: Path) -> list:
    """The training log of a finished step (its last checkpoint's trainer_state.json)."""
    last = max(step_dir.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [r for r in json.loads((last / "trainer_state.json").read_text())["log_history"] if "loss" in r]


def check_kind_losses_recombine(log: list) -> None:
    """Each logged loss is its kinds' losses weighted by the loss tokens they trained on."""
    seen = {"text": 0, "chat": 0}
    for row in log:
        tokens = {kind: row[f"tokens_{kind}"] - seen[kind] for kind in seen}
        seen = {kind: row[f"tokens_{kind}"] for kind in seen}
        total = sum(row.get(f"loss_{kind}", 0.0) * tokens[kind] for kind in seen) / sum(tokens.values())
        assert total == pytest.approx(row["loss"], abs=2e-3), row


@pytest.mark.integration
@pytest.mark.parametrize("preset", SCHEDULES)
def test_schedule_runs_each_step_on_its_data_and_both_kinds_learn(preset, tmp_path):
    """`python launch/pipeline.py pipeline=knowledge_<x>` on the tiny model: every step trains on
    the sources its phase names (PIT: the Q&A, the Q&A with the taught documents, the taught with
    the held documents, the held alone) with ~10% general replay, and over the schedule the loss
    falls on the text and on the chat tokens. The mixed schedule runs 2 ranks under ZeRO-3, where
    the per-kind losses must also recombine into the trainer's loss."""
    exposures, expected = RUNS[preset]
    ranks = 2 if preset == "knowledge_mixed" else 1
    proc = launch("pipeline.py", [
        f"pipeline={preset}", f"root={tmp_path}", "pipeline.eval.tasks=[]", f"cluster.gpus_per_node={ranks}",
        *subset_settings(tmp_path, *SMALL.values()), *(f"pipeline.settings.{e}" for e in exposures),
        "pipeline.settings.learning_rate=1e-3", "pipeline.settings.warmup_steps=2"])
    assert proc.returncode == 0, tail(proc)
    # on one rank ZeRO-3 hands each gradient on as its own partition (train/runtime.py)
    assert ("ZeRO-3 gradients skip the one-rank reduce-scatter" in proc.stdout) == (ranks == 1), tail(proc)
    mixes = step_mixes(proc.stdout, preset)
    assert list(mixes) == list(expected), tail(proc)
    losses = {"text": [], "chat": []}
    for step, sources in expected.items():
        general_rows, general_tokens = mixes[step].pop("general", (0, 0.0))
        assert {name: rows for name, (rows, _) in mixes[step].items()} == sources, (step, mixes[step])
        assert general_rows > 0 and 0.05 < general_tokens < 0.15, (step, general_tokens)
        log = step_log(tmp_path / preset / step)
        for kind in losses:
            losses[kind] += [r[f"loss_{kind}"] for r in log if f"loss_{kind}" in r]
        if ranks > 1:
            check_kind_losses_recombine(log)
    for kind, trajectory in losses.items():
        assert len(trajectory) >= 8, (kind, trajectory)
        assert sum(trajectory[-3:]) / 3 < trajectory[0] - 1.0, (kind, trajectory)


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
