"""The bundled held-out eval sets (data/make_eval_sets.py) and the check that no training text
words any of their questions."""

from __future__ import annotations

import json
import re

from tests.support.env import REPO

EVAL_SETS = REPO / "data" / "eval_sets"
MATERIALS = REPO / "data" / "materials"
SETS = ("materials_sft_mc", "materials_sft_tf", "materials_cpt_mc", "materials_cpt_tf", "general_mc", "knowledge_cpt_mc")
NGRAM = 6  # words: longer than any shared phrase of the element facts themselves ("the density of iron is")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def words(text: str):
    return re.findall(r"[a-z0-9]+(?:[-.][a-z0-9]+)*", text.lower())


def ngrams(text: str, n: int = NGRAM):
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def assert_held_out(training_text):
    """Neither a whole question/statement nor any 6-word run of it appears in `training_text`."""
    blob = "\n".join(training_text)
    seen = set().union(*(ngrams(t) for t in training_text))
    for name in SETS:
        for row in rows(EVAL_SETS / f"{name}.jsonl"):
            text = row.get("question") or row["statement"]
            assert text not in blob, (name, text)
            shared = ngrams(text) & seen
            assert not shared, (name, text, sorted(shared)[:3])


KNOWN_ANSWER_FAVOUR = (" A", "A")
"""What the known-answer model predicts (tiny_llama(favour=...)): " A", then "A"."""


def known_answer_sets(folder):
    """Two paper-format MC files of the same 12 questions for the known-answer model: right.jsonl,
    whose answer is always A (it scores 1.0 under both protocols), and shuffled.jsonl, whose
    answers spread evenly over A-D (exactly 0.25)."""
    from tests.support.files import write_jsonl

    question = "Which letter comes first in the alphabet of this test?"
    right = [{"question": f"{question} ({i})", "options": ["A", "B", "C", "D"], "answer": "A"} for i in range(12)]
    shuffled = [{**row, "answer": "ABCD"[i % 4]} for i, row in enumerate(right)]
    return write_jsonl(folder / "right.jsonl", right), write_jsonl(folder / "shuffled.jsonl", shuffled)
