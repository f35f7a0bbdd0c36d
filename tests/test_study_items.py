"""The study report's per-item statistics (orchestration/study_items.py) on a run whose per-item
files are written by hand: accuracy with an interval clustered by fact, the paired difference
against the start model and between arms, McNemar's exact p on facts, the mean margin, and the
control set against chance, each against the number computed by hand."""

from __future__ import annotations

import json
import math

import pytest

from orchestration.study import run_study
from tests.support.study import CORRECT_MARGIN, WRONG_MARGIN, both_wordings, fake_knowledge_run, write_value_losses

FACTS = 370  # two wordings each: 740 questions, as knowledge_cpt_mc
START = both_wordings(range(0, 111), FACTS)                       # 111 facts known: 0.300
# PIT: 10 of those lost, 30 more learned on both wordings, 20 more on one wording only
PIT = both_wordings(range(10, 141), FACTS, one_wording=range(141, 161))
STANDARD = both_wordings(range(0, 115), FACTS)
CONTROL_FACTS = 40
CONTROL = {"start": both_wordings(range(0, 10), CONTROL_FACTS),      # 0.250: chance
           "pit-held": both_wordings(range(0, 14), CONTROL_FACTS),   # 0.350: 10 points above
           "mixed": both_wordings(range(0, 11), CONTROL_FACTS)}      # 0.275


def wald_half_width(per_fact: list) -> float:
    """1.96 x the standard error of a mean over facts (per_fact: one value per fact)."""
    n = len(per_fact)
    mean = sum(per_fact) / n
    return 1.96 * math.sqrt(sum((x - mean) ** 2 for x in per_fact) / n / n)


def per_fact(items: list) -> list:
    return [(items[2 * f] + items[2 * f + 1]) / 2 for f in range(len(items) // 2)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    correct = {"start": START, "standard-documents": START, "standard-qa": STANDARD, "mixed": START,
               "pit-qa": START, "pit-held": PIT}
    control = {m: CONTROL.get(m, CONTROL["start"]) for m in correct}
    run = fake_knowledge_run(tmp_path_factory.mktemp("study"), correct, control)
    write_value_losses(run / "pit-held", [3.2, 2.5, 1.9, 1.4])
    # a resumed run probes its epoch again: the last line of an epoch counts
    write_value_losses(run / "mixed", [3.2, 2.9])
    with open(run / "mixed" / "value_loss.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "step": 10, "loss": 2.7, "value_tokens": 4000, "documents": 1480}) + "\n")
    run_study(str(run))
    report = json.loads((run / "study.json").read_text())
    return report["items"], (run / "study.md").read_text(), report["value_loss"]


def test_accuracy_interval_resamples_facts_not_questions(report):
    start = report[0]["facts_mc"]["models"]["start"]
    assert (start["n"], start["facts"], start["acc"]) == (740, 370, pytest.approx(0.3))
    half = wald_half_width(per_fact([float(c) for c in START]))  # 0.0467; by question it would be 0.0330
    assert start["acc_ci95"] == pytest.approx([0.3 - half, 0.3 + half], abs=0.005)


def test_paired_difference_against_start_and_mcnemar_on_facts(report):
    pit = report[0]["facts_mc"]["models"]["pit-held"]
    assert pit["acc"] == pytest.approx(282 / 740)
    vs = pit["vs_start"]
    assert vs["diff"] == pytest.approx(60 / 740)
    diffs = per_fact([float(a) - float(b) for a, b in zip(PIT, START)])
    half = wald_half_width(diffs)  # 0.0346; by question it would be 0.0258
    assert vs["diff_ci95"] == pytest.approx([60 / 740 - half, 60 / 740 + half], abs=0.004)
    # facts: 30 right only in PIT (the 20 half-right ones are not right), 10 only in start
    assert (vs["facts_only_a"], vs["facts_only_b"]) == (30, 10)
    assert vs["mcnemar_p"] == pytest.approx(2 * sum(math.comb(40, i) for i in range(11)) / 2 ** 40)


def test_margin_is_the_distance_from_the_best_wrong_option(report):
    pit = report[0]["facts_mc"]["models"]["pit-held"]
    acc = 282 / 740
    assert pit["margin"] == pytest.approx(acc * CORRECT_MARGIN + (1 - acc) * WRONG_MARGIN)
    assert pit["vs_start"]["margin_diff"] == pytest.approx((acc - 0.3) * (CORRECT_MARGIN - WRONG_MARGIN))


def test_arms_are_the_last_model_of_each_branch_compared_pairwise(report):
    arms = report[0]["facts_mc"]["arms"]
    assert [(p["a"], p["b"]) for p in arms] == [("standard-qa", "mixed"), ("standard-qa", "pit-held"),
                                               ("mixed", "pit-held")]
    standard_vs_pit = arms[1]
    assert standard_vs_pit["diff"] == pytest.approx((230 - 282) / 740)
    # facts 0-9 and 141-... : standard knows 0-114, PIT 10-140 (+ half of 141-160)
    assert (standard_vs_pit["facts_only_a"], standard_vs_pit["facts_only_b"]) == (10, 26)


def test_control_set_is_checked_against_chance(report):
    items, md, _ = report
    control = items["control_mc"]
    assert control["control"] and not items["facts_mc"]["control"]
    assert control["models"]["start"]["chance"] == 0.25
    assert control["models"]["start"]["vs_chance"] == pytest.approx(0.0) and control["models"]["start"]["at_chance"]
    assert control["models"]["mixed"]["vs_chance"] == pytest.approx(0.025) and control["models"]["mixed"]["at_chance"]
    assert control["models"]["pit-held"]["vs_chance"] == pytest.approx(0.1)
    assert not control["models"]["pit-held"]["at_chance"]
    assert "| pit-held | 0.350 [" in md and "+0.100 (**NOT within 5 points of chance**)" in md
    assert "80 questions about 40 facts; chance 0.250; a control set" in md


def test_storage_probe_per_epoch_is_reported(report):
    _, md, probes = report
    assert set(probes) == {"pit-held", "mixed"}
    assert [r["loss"] for r in probes["pit-held"]] == [3.2, 2.5, 1.9, 1.4]
    assert [r["loss"] for r in probes["mixed"]] == [3.2, 2.7]
    assert "| pit-held | 3.200 | 2.500 | 1.900 | 1.400 |" in md
    assert "| mixed | 3.200 | 2.700 | – | – |" in md


def test_an_item_line_is_the_logged_sample_and_an_odd_task_gets_no_file():
    from evaluation.items import item_lines

    sample = {"doc_id": 7, "doc": {"fact_id": "iron|lattice_a"}, "target": 2, "acc": 1.0,
              "filtered_resps": [[-1.0, False], [-2.0, False], [-0.5, True]]}
    assert json.loads(item_lines([sample])) == {"doc_id": 7, "fact": "iron|lattice_a", "answer": 2,
                                                "loglik": [-1.0, -2.0, -0.5], "correct": True}
    assert json.loads(item_lines([dict(sample, doc={})]))["fact"] == "7"  # no fact_id: its own fact
    assert item_lines([dict(sample, target="Paris")]) is None  # a target that is not an option's index
