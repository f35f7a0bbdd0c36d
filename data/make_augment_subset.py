"""Write the reduced materials set the knowledge-augmentation study trains and scores on
(docs/STUDY.md, "Knowledge augmentation"): half of the subjects, so that six CPT runs and their
evaluations fit a few hours on two CPU cores, with the questions still about facts the training
text states.

    python -m data.make_augment_subset            # rewrites data/augment_subset/*
    python -m data.make_augment_subset --out DIR  # somewhere else

The subset: the elements of even atomic number (48 of 1-96) and every other bundled compound
(the 1st, 3rd, ... of make_materials.COMPOUNDS). Deterministic; outputs:
  cpt.jsonl             the bundled CPT documents whose every subject is in the subset (the
                        comparison documents each name two neighbouring elements, one of odd
                        number, so none is kept)
  cpt_renderings.jsonl  the bundled K renderings of the subset's subjects (the upper bound)
  materials_cpt_mc.jsonl, materials_sft_mc.jsonl
                        the bundled held-out questions (data/eval_sets/) about the subset's subjects
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.make_materials import (
    COMPOUNDS, RENDERINGS, SEED, cpt_documents, element_fact_lists, main as materials_cli, renderings, write_outputs,
)

OUT_DIR = Path(__file__).resolve().parent / "augment_subset"
EVAL_SETS = Path(__file__).resolve().parent / "eval_sets"
SETS = ("materials_cpt_mc.jsonl", "materials_sft_mc.jsonl")


def subset_subjects(facts_list: list) -> set:
    """Element names of even atomic number and every other compound formula."""
    return {f["name"] for f in facts_list if f["number"] % 2 == 0} | {formula for formula, _ in COMPOUNDS[::2]}


def question_subject(row: dict) -> str:
    """The element name or compound formula an eval set row asks about ("CeO2:O" -> "CeO2")."""
    return row["subject"].split(":")[0]


def build(out_dir: Path) -> dict:
    facts_list, all_facts = element_fact_lists()
    keep = subset_subjects(facts_list)
    cpt = cpt_documents(facts_list, all_facts, random.Random(SEED))
    outputs = {
        "cpt.jsonl": [{"text": text} for subjects, text in cpt if set(subjects) <= keep],
        "cpt_renderings.jsonl": [{"text": text} for subjects, text in renderings(facts_list, all_facts, RENDERINGS)
                                 if set(subjects) <= keep],
    }
    for name in SETS:
        rows = [json.loads(line) for line in (EVAL_SETS / name).read_text().splitlines() if line.strip()]
        outputs[name] = [row for row in rows if question_subject(row) in keep]
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_outputs(out_dir, outputs)


if __name__ == "__main__":
    materials_cli(build, OUT_DIR, __doc__)
