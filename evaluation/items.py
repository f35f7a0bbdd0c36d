"""Per-item scores of a multiple-choice task: `<eval dir>/<task>.items.jsonl`, one line per
question, beside `<task>.json`. The study report reads them for what a task's mean cannot give:
intervals clustered by fact, paired differences between two models on the same questions,
McNemar's test and the margin log p(correct) - max log p(wrong) (evaluation/paired.py).

    {"doc_id": 12, "fact": "iron|lattice_a", "answer": 2, "loglik": [-4.1, -3.9, -2.2, -5.0], "correct": true}

`fact` is the question's `fact_id` (two wordings of one fact share it), else its doc_id: a
question that is its own fact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from core.errors import UserError

ITEMS_SUFFIX = ".items.jsonl"


def items_path(eval_dir: Path, task: str) -> Path:
    return Path(eval_dir) / f"{task}{ITEMS_SUFFIX}"


def item_row(sample: dict) -> dict:
    """One line from one of lm-eval's logged multiple-choice samples: `filtered_resps` holds
    (log-likelihood, is greedy) per option, `acc` lm-eval's own verdict (the same argmax)."""
    doc = sample["doc"]
    loglik = [float(resp[0]) for resp in sample["filtered_resps"]]
    return {"doc_id": int(sample["doc_id"]), "fact": str(doc.get("fact_id", sample["doc_id"])),
            "answer": int(sample["target"]), "loglik": loglik, "correct": bool(sample["acc"])}


def item_lines(samples: List[dict]) -> Optional[str]:
    """The file's text; None for a task whose samples do not have this shape (a target that is not
    an option's index, no `acc` metric): such a task simply has no per-item file."""
    try:
        return "".join(json.dumps(item_row(s)) + "\n" for s in samples)
    except (KeyError, TypeError, ValueError, IndexError):
        return None


@dataclass
class ItemScores:
    """One model's scores on one task's questions, in doc_id order."""

    doc_ids: List[int]
    facts: List[str]
    answers: List[int]
    loglik: List[List[float]]
    correct: np.ndarray

    @property
    def chance(self) -> float:
        """Expected accuracy of a random pick: the mean of 1/options over the questions."""
        return float(np.mean([1 / len(options) for options in self.loglik]))

    def select(self, doc_ids: List[int]) -> "ItemScores":
        at = {d: i for i, d in enumerate(self.doc_ids)}
        keep = [at[d] for d in doc_ids]
        return ItemScores(list(doc_ids), [self.facts[i] for i in keep], [self.answers[i] for i in keep],
                          [self.loglik[i] for i in keep], self.correct[keep])


def load_items(eval_dir: Path, task: str) -> Optional[ItemScores]:
    """The task's per-item scores; None where the evaluation wrote none (an older run, or not
    a multiple-choice task)."""
    path = items_path(eval_dir, task)
    if not path.is_file():
        return None
    try:
        rows = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                      key=lambda r: r["doc_id"])
        return ItemScores([r["doc_id"] for r in rows], [r["fact"] for r in rows], [r["answer"] for r in rows],
                          [r["loglik"] for r in rows], np.array([bool(r["correct"]) for r in rows]))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read per-item scores {path} ({type(err).__name__}: {err}): "
                        f"delete it and {path.with_name(task + '.json').name}, and rerun the evaluation") from None


def common_items(a: ItemScores, b: ItemScores) -> tuple:
    """(a, b) restricted to the questions both scored (a `limit=` run scores fewer), same order."""
    shared = sorted(set(a.doc_ids) & set(b.doc_ids))
    a, b = a.select(shared), b.select(shared)
    if a.facts != b.facts or a.answers != b.answers:
        raise UserError("two evaluations of one task asked different questions under the same doc_ids (the eval "
                        "set changed between them): evaluate both models on the same file")
    return a, b
