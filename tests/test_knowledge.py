"""Knowledge injection: the schedules (conf/pipeline/knowledge_*.yaml) plan the order they claim,
with their exposures and constant learning rate as settings; no schedule ever trains on a Q&A
about a CPT-only fact; the fact-level renderings name their subject in every sentence, state
their value and vary their wording."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
from tests.support.env import REPO
from tests.support.eval_sets import EVAL_SETS, rows
from tests.support.files import write_jsonl

from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline

SCHEDULES = ("knowledge_standard", "knowledge_mixed", "knowledge_pit")
MATERIALS = REPO / "data" / "materials"


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
