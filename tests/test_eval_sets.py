"""The bundled eval sets (data/make_eval_sets.py) are held out: no question is worded as any
training file words it, each fact sits in the split it claims, and the files are what the
generator writes."""

from __future__ import annotations

import json

import pytest

from tests.support.env import REPO
from tests.support.eval_sets import EVAL_SETS, MATERIALS, SETS, assert_held_out, rows


@pytest.fixture(scope="module")
def training_text():
    """Every string of the CPT, SFT and preference files."""
    texts = [r["text"] for r in rows(MATERIALS / "cpt.jsonl")]
    texts += [m["content"] for r in rows(MATERIALS / "sft.jsonl") for m in r["messages"]]
    texts += [r[k] for r in rows(MATERIALS / "preference.jsonl") for k in ("prompt", "chosen", "rejected")]
    return texts


def augmented_text():
    """What the augmentation study trains on beyond the raw files: the K renderings and the
    rule-based augmentation of the CPT corpus (train/augment/rules.py, its default settings)."""
    from train.augment.config import RulesConfig
    from train.augment.rules import augment_document

    texts = [r["text"] for r in rows(MATERIALS / "cpt_renderings.jsonl")]
    texts += [r["text"] for name in ("facts_taught.jsonl", "facts_held.jsonl") for r in rows(MATERIALS / name)]
    for i, r in enumerate(rows(MATERIALS / "cpt.jsonl")):
        texts += augment_document(r["text"], i, RulesConfig(), seed=42)
    return texts


def test_no_question_is_worded_as_in_training(training_text):
    assert_held_out(training_text)


def test_no_question_is_worded_as_in_the_augmented_corpora():
    """The renderings and the rule-based tasks and permutations add wordings, never an eval set's."""
    assert_held_out(augmented_text())


def test_cpt_only_facts_are_absent_from_sft_and_preference():
    """The CPT split's right answers appear in the CPT prose and in no Q&A text; the SFT split's
    appear in the Q&A answers."""
    qa = " ".join(m["content"] for r in rows(MATERIALS / "sft.jsonl") for m in r["messages"])
    qa += " ".join(r["chosen"] for r in rows(MATERIALS / "preference.jsonl"))
    cpt = " ".join(r["text"] for r in rows(MATERIALS / "cpt.jsonl"))
    for row in rows(EVAL_SETS / "materials_cpt_mc.jsonl"):
        value = row["options"]["ABCD".index(row["answer"])]
        number = value.split()[0]
        unit = {"lattice_a": " angstrom", "b_c": " fm", "major_abundance": " percent",
                "mass_fraction": " percent"}[row["fact"]]
        phrase = {"lattice_a": "lattice parameter of ", "b_c": "scattering length of ",
                  "major_abundance": "(", "mass_fraction": " "}[row["fact"]] + number + unit
        assert phrase in cpt, row
        assert "lattice parameter" not in qa and "scattering length" not in qa and " percent" not in qa
    sft_hits = sum(row["options"]["ABCD".index(row["answer"])].split(" ")[0] in qa
                   for row in rows(EVAL_SETS / "materials_sft_mc.jsonl"))
    assert sft_hits == len(rows(EVAL_SETS / "materials_sft_mc.jsonl"))


@pytest.mark.parametrize("name", SETS)
def test_sets_are_balanced_with_distinct_options(name):
    data = rows(EVAL_SETS / f"{name}.jsonl")
    assert len(data) >= 300  # 95% half-width <= 5.7 points at p = 0.5 (docs/eval.md)
    answers = [r["answer"] for r in data]
    counts = {a: answers.count(a) for a in set(answers)}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    if name.endswith("_mc"):
        assert all(len(set(r["options"])) == 4 for r in data)


def test_generator_is_deterministic_and_matches_the_files(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "data.make_eval_sets", "--out", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    for name in SETS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (EVAL_SETS / f"{name}.jsonl").read_bytes(), name


def test_the_augmentation_subset_is_half_the_subjects_and_matches_its_generator(tmp_path):
    """data/augment_subset/ (the augmentation study's reduced set) is what data/make_augment_subset.py
    writes; its documents and questions are the bundled ones, so they stay held out; every question
    asks about a subject its corpus states, and no question's subject is missing from it."""
    import subprocess
    import sys

    subset = REPO / "data" / "augment_subset"
    subprocess.run([sys.executable, "-m", "data.make_augment_subset", "--out", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True)
    files = sorted(p.name for p in subset.glob("*.jsonl"))
    assert files == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in files:
        assert (tmp_path / name).read_bytes() == (subset / name).read_bytes(), name
    for corpus, full in (("cpt.jsonl", "cpt.jsonl"), ("cpt_renderings.jsonl", "cpt_renderings.jsonl")):
        assert set((subset / corpus).read_text().splitlines()) <= set((MATERIALS / full).read_text().splitlines())
    text = " ".join(r["text"] for r in rows(subset / "cpt.jsonl")).lower()
    for name in ("materials_cpt_mc", "materials_sft_mc"):
        asked = rows(subset / f"{name}.jsonl")
        assert {json.dumps(r) for r in asked} <= {json.dumps(r) for r in rows(EVAL_SETS / f"{name}.jsonl")}
        assert 0.4 * len(rows(EVAL_SETS / f"{name}.jsonl")) <= len(asked) <= 0.6 * len(rows(EVAL_SETS / f"{name}.jsonl"))
        for row in asked:
            assert row["subject"].split(":")[0].lower() in text, row
