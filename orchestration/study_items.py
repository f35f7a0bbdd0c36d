"""The study report's per-item statistics, for every multiple-choice task whose evaluations wrote
per-item scores (<task>.items.jsonl, evaluation/items.py): what a task's mean and its Wilson
interval cannot say when one fact is asked several times and two models answer the same questions.

Per task and model:
    accuracy with a 95% bootstrap interval that resamples facts (evaluation/paired.py);
    the mean margin log p(correct) - max log p(wrong option), with the same interval;
    accuracy - chance (chance = the mean of 1/options); for a control task (its task YAML's
    `metadata: {control: chance}`) the verdict whether it stays within CHANCE_TOLERANCE of chance;
    against the start model on the same questions: the paired difference with its clustered
    interval, and McNemar's exact test on facts (a fact is right when most of its wordings are).
Between arms (the last model of each branch of the pipeline: a step no other step reads), each
pair on the same questions: the same paired difference and McNemar's test. And the storage probe
of every training step (training.value_probe): the loss on the value tokens after each epoch.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from core.outputs import VALUE_LOSS_FILE
from evaluation.items import ItemScores, common_items, load_items
from evaluation.paired import clustered_interval, fact_majority, margins, mcnemar_exact, paired_difference
from evaluation.results import load_result_file

CHANCE_TOLERANCE = 0.05
"""A control task's accuracy must stay within this of chance in every model (5 points)."""


def is_control(eval_dir: Path, task: str) -> bool:
    """The task YAML marks a control set, whose questions no training data answers."""
    record = load_result_file(Path(eval_dir) / f"{task}.json")
    return (record.get("task_config", {}).get("metadata") or {}).get("control") == "chance"


def item_margins(items: ItemScores) -> np.ndarray:
    return margins(items.loglik, items.answers)


def model_stats(items: ItemScores) -> dict:
    acc_lo, acc_hi = clustered_interval(items.correct, items.facts)
    margin = item_margins(items)
    m_lo, m_hi = clustered_interval(margin, items.facts)
    return {"n": len(items.doc_ids), "facts": len(set(items.facts)), "acc": float(items.correct.mean()),
            "acc_ci95": [acc_lo, acc_hi], "chance": items.chance, "vs_chance": float(items.correct.mean()) - items.chance,
            "margin": float(margin.mean()), "margin_ci95": [m_lo, m_hi]}


def paired_stats(a: ItemScores, b: ItemScores) -> dict:
    """a against b on the questions both answered: accuracy and margin differences with their
    fact-clustered intervals, McNemar's exact test on fact-level outcomes."""
    a, b = common_items(a, b)
    diff, lo, hi = paired_difference(a.correct, b.correct, a.facts)
    m_diff, m_lo, m_hi = paired_difference(item_margins(a), item_margins(b), a.facts)
    only_a, only_b, p = mcnemar_exact(fact_majority(a.correct, a.facts), fact_majority(b.correct, b.facts))
    return {"n": len(a.doc_ids), "diff": diff, "diff_ci95": [lo, hi], "margin_diff": m_diff,
            "margin_diff_ci95": [m_lo, m_hi], "facts_only_a": only_a, "facts_only_b": only_b, "mcnemar_p": p}


def arm_names(plan: dict) -> List[str]:
    """The last model of each branch: training and merge steps that no other such step reads."""
    models = [s for s in plan["steps"] if s["kind"] in ("train", "merge")]
    read = {d for s in models for d in s["depends_on"]}
    return [s["name"] for s in models if s["name"] not in read]


def task_item_stats(task: str, evaluated: Dict[str, str], arms: List[str]) -> Optional[dict]:
    """{model: eval dir} -> the task's per-item statistics; None when no model has item scores."""
    items = {name: load_items(Path(d), task) for name, d in evaluated.items()}
    items = {name: i for name, i in items.items() if i is not None}
    if not items:
        return None
    control = is_control(Path(evaluated[next(iter(items))]), task)
    models = {}
    for name, scores in items.items():
        stats = model_stats(scores)
        if control:
            stats["at_chance"] = abs(stats["vs_chance"]) <= CHANCE_TOLERANCE
        if "start" in items and name != "start":
            stats["vs_start"] = paired_stats(scores, items["start"])
        models[name] = stats
    pairs = [dict(a=a, b=b, **paired_stats(items[a], items[b]))
             for a, b in itertools.combinations([n for n in arms if n in items], 2)]
    return {"control": control, "without_items": [n for n in evaluated if n not in items], "models": models,
            "arms": pairs}


def item_statistics(plan: dict, evaluated: Dict[str, str], tasks: List[str]) -> Dict[str, dict]:
    """{task: statistics} for every task some model has per-item scores of."""
    arms = arm_names(plan)
    found = {task: task_item_stats(task, evaluated, arms) for task in tasks}
    return {task: stats for task, stats in found.items() if stats is not None}


def value_losses(plan: dict) -> Dict[str, List[dict]]:
    """{training step: its storage-probe records, one per epoch} from each step's value_loss.jsonl
    (training.value_probe, train/value_probe.py); a resumed run's repeated epoch keeps its last."""
    found = {}
    for step in plan["steps"]:
        path = Path(step["output_dir"]) / VALUE_LOSS_FILE
        if step["kind"] != "train" or not path.is_file():
            continue
        by_epoch = {}
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_epoch[record["epoch"]] = record
        found[step["name"]] = [by_epoch[e] for e in sorted(by_epoch)]
    return found


def value_loss_markdown(found: Dict[str, List[dict]]) -> List[str]:
    if not found:
        return []
    epochs = sorted({r["epoch"] for records in found.values() for r in records})
    lines = ["", "## Storage probe: loss on the value tokens of the probe documents", "",
             "Mean -log p of each value's tokens inside its document, in the training wording "
             "(training.value_probe), nats per token; epoch 0: before the step trained. A fact that "
             "is stored drives it down; a held-out question can still fail to extract it.", "",
             "| step | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for step, records in found.items():
        by_epoch = {r["epoch"]: r["loss"] for r in records}
        lines.append(f"| {step} | " + " | ".join(f"{by_epoch[e]:.3f}" if e in by_epoch else "–" for e in epochs) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def ci(values: List[float]) -> str:
    return f"[{values[0]:+.3f}, {values[1]:+.3f}]"


def mcnemar_cell(stats: dict) -> str:
    return f"{stats['facts_only_a']} / {stats['facts_only_b']}, p = {stats['mcnemar_p']:.3g}"


def chance_cell(stats: dict, control: bool) -> str:
    cell = f"{stats['vs_chance']:+.3f}"
    if control:
        cell += " (within 5 points)" if stats["at_chance"] else " (**NOT within 5 points of chance**)"
    return cell


def task_markdown(task: str, stats: dict) -> List[str]:
    first = next(iter(stats["models"].values()))
    lines = ["", f"### {task}", "",
             f"{first['n']} questions about {first['facts']} facts; chance {first['chance']:.3f}"
             + ("; a control set: it must stay within 5 points of chance in every model." if stats["control"] else "."),
             "", "| model | accuracy [95%, by fact] | − chance | Δ start [95%] | facts right only here / only start, "
             "McNemar p | margin [95%] | Δ margin vs start [95%] |", "|---|---|---|---|---|---|---|"]
    for name, s in stats["models"].items():
        vs = s.get("vs_start")
        lines.append(f"| {name} | {s['acc']:.3f} [{s['acc_ci95'][0]:.3f}, {s['acc_ci95'][1]:.3f}] | "
                     f"{chance_cell(s, stats['control'])} | "
                     + (f"{vs['diff']:+.3f} {ci(vs['diff_ci95'])} | {mcnemar_cell(vs)} | " if vs else "– | – | ")
                     + f"{s['margin']:+.2f} [{s['margin_ci95'][0]:+.2f}, {s['margin_ci95'][1]:+.2f}] | "
                     + (f"{vs['margin_diff']:+.2f} [{vs['margin_diff_ci95'][0]:+.2f}, {vs['margin_diff_ci95'][1]:+.2f}] |"
                        if vs else "– |"))
    if stats["arms"]:
        lines += ["", "Between arms (the last model of each branch), on the same questions:", "",
                  "| A | B | Δ accuracy A − B [95%] | facts right only in A / only in B, McNemar p | Δ margin [95%] |",
                  "|---|---|---|---|---|"]
        for p in stats["arms"]:
            lines.append(f"| {p['a']} | {p['b']} | {p['diff']:+.3f} {ci(p['diff_ci95'])} | {mcnemar_cell(p)} | "
                         f"{p['margin_diff']:+.2f} [{p['margin_diff_ci95'][0]:+.2f}, {p['margin_diff_ci95'][1]:+.2f}] |")
    if stats["without_items"]:
        lines += ["", f"No per-item scores (evaluated before they were written): {', '.join(stats['without_items'])}."]
    return lines


def items_markdown(found: Dict[str, dict]) -> List[str]:
    if not found:
        return []
    return ["", "## Per question: intervals by fact, paired tests, margins", "",
            "From each evaluation's per-item scores (`<task>.items.jsonl`). Intervals: 95%, a bootstrap of "
            "10,000 resamples of facts (the wordings of one fact are one fact's evidence). Δ: the paired "
            "difference on the same questions. McNemar: exact, on facts (a fact counts as right when more than "
            "half its wordings are). Margin: log p(correct) − max log p(wrong option), per question, averaged."] + \
        [line for task, stats in found.items() for line in task_markdown(task, stats)]
