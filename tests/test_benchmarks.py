"""The bundled eval sets (data/make_eval_sets.py) are held out: no question is worded as any
training file words it, each fact sits in the split it claims, and the files are what the
generator writes."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

BENCH = REPO / "data" / "eval_sets"
MATERIALS = REPO / "data" / "materials"
SETS = ("materials_sft_mc", "materials_sft_tf", "materials_cpt_mc", "materials_cpt_tf", "general_mc")
NGRAM = 6  # words: longer than any shared phrase of the element facts themselves ("the density of iron is")


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def words(text: str):
    return re.findall(r"[a-z0-9]+(?:[-.][a-z0-9]+)*", text.lower())


def ngrams(text: str, n: int = NGRAM):
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


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
    for i, r in enumerate(rows(MATERIALS / "cpt.jsonl")):
        texts += augment_document(r["text"], i, RulesConfig(), seed=42)
    return texts


def assert_held_out(training_text):
    """Neither a whole question/statement nor any 6-word run of it appears in `training_text`."""
    blob = "\n".join(training_text)
    seen = set().union(*(ngrams(t) for t in training_text))
    for name in SETS:
        for row in rows(BENCH / f"{name}.jsonl"):
            text = row.get("question") or row["statement"]
            assert text not in blob, (name, text)
            shared = ngrams(text) & seen
            assert not shared, (name, text, sorted(shared)[:3])


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
    for row in rows(BENCH / "materials_cpt_mc.jsonl"):
        value = row["options"]["ABCD".index(row["answer"])]
        number = value.split()[0]
        unit = {"lattice_a": " angstrom", "b_c": " fm", "major_abundance": " percent",
                "mass_fraction": " percent"}[row["fact"]]
        phrase = {"lattice_a": "lattice parameter of ", "b_c": "scattering length of ",
                  "major_abundance": "(", "mass_fraction": " "}[row["fact"]] + number + unit
        assert phrase in cpt, row
        assert "lattice parameter" not in qa and "scattering length" not in qa and " percent" not in qa
    sft_hits = sum(row["options"]["ABCD".index(row["answer"])].split(" ")[0] in qa
                   for row in rows(BENCH / "materials_sft_mc.jsonl"))
    assert sft_hits == len(rows(BENCH / "materials_sft_mc.jsonl"))


@pytest.mark.parametrize("name", SETS)
def test_sets_are_balanced_with_distinct_options(name):
    data = rows(BENCH / f"{name}.jsonl")
    assert len(data) >= 300  # 95% half-width <= 5.7 points at p = 0.5 (docs/eval.md)
    answers = [r["answer"] for r in data]
    counts = {a: answers.count(a) for a in set(answers)}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    if name.endswith("_mc"):
        assert all(len(set(r["options"])) == 4 for r in data)


def test_generator_is_deterministic_and_matches_the_files(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "data" / "make_eval_sets.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in SETS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (BENCH / f"{name}.jsonl").read_bytes(), name


def test_the_augmentation_subset_is_half_the_subjects_and_matches_its_generator(tmp_path):
    """data/augment_subset/ (the augmentation study's reduced set) is what data/make_augment_subset.py
    writes; its documents and questions are the bundled ones, so they stay held out; every question
    asks about a subject its corpus states, and no question's subject is missing from it."""
    import subprocess
    import sys

    subset = REPO / "data" / "augment_subset"
    subprocess.run([sys.executable, str(REPO / "data" / "make_augment_subset.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    files = sorted(p.name for p in subset.glob("*.jsonl"))
    assert files == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in files:
        assert (tmp_path / name).read_bytes() == (subset / name).read_bytes(), name
    for corpus, full in (("cpt.jsonl", "cpt.jsonl"), ("cpt_renderings.jsonl", "cpt_renderings.jsonl")):
        assert set((subset / corpus).read_text().splitlines()) <= set((MATERIALS / full).read_text().splitlines())
    text = " ".join(r["text"] for r in rows(subset / "cpt.jsonl")).lower()
    for name in ("materials_cpt_mc", "materials_sft_mc"):
        asked = rows(subset / f"{name}.jsonl")
        assert {json.dumps(r) for r in asked} <= {json.dumps(r) for r in rows(BENCH / f"{name}.jsonl")}
        assert 0.4 * len(rows(BENCH / f"{name}.jsonl")) <= len(asked) <= 0.6 * len(rows(BENCH / f"{name}.jsonl"))
        for row in asked:
            assert row["subject"].split(":")[0].lower() in text, row


# --- the GPU suite and the GPU throughput benchmark, kept runnable on the CPU -------------------

GPU_TESTS = {
    *{f"test_stage_trains_in_bf16_and_the_model_generates[{stage}-{finetune}]"
       for finetune in ("full", "lora", "qlora") for stage in ("cpt", "sft", "dpo", "orpo")},
    *{f"test_killed_run_resumes_from_its_checkpoint_and_finishes[{case}]"
       for case in ("same-gpus", "fewer-gpus", "more-gpus")},
    "test_merge_of_two_outputs_generates",
    "test_evaluation_writes_metrics",
    "test_data_parallel_evaluation_matches_one_process",
    "test_tiny_pipeline",
}


@pytest.mark.parametrize("args, markexpr, asked", [
    (["tests"], "", False),
    ([], "not integration and not slurm", False),
    (["tests"], "not gpu", False),
    (["tests/gpu"], "gpu", True),
    (["tests"], "gpu", True),
    ([], "(gpu and not slow)", True),
    (["tests/gpu/test_gpu_suite.py::test_tiny_pipeline"], "", True),
])
def test_the_gpu_suite_is_collected_only_when_asked_for(args, markexpr, asked):
    """CI's `python -m pytest` (no GPU, 0 skipped) must not even collect tests/gpu."""
    from conftest import gpu_suite_requested

    assert gpu_suite_requested(args, markexpr, REPO) is asked


def test_the_gpu_suite_collects_its_tests():
    """`python -m pytest tests/gpu -m gpu` imports and lists the whole GPU suite, so it cannot rot
    where there is no GPU to run it."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/gpu", "-m", "gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = {line.split("::", 1)[1] for line in proc.stdout.splitlines() if line.startswith("tests/gpu/")}
    assert ids == GPU_TESTS, sorted(ids ^ GPU_TESTS)


@pytest.mark.integration
def test_gpu_throughput_benchmark_runs_at_a_tiny_size(tmp_path):
    """bench/gpu_throughput.py at a tiny size on 1 CPU rank: a row per option set asked for,
    each with positive tokens/s, MFU and peak memory, a step of batch x seq tokens (both pack
    full blocks), and the ratio against plain TRL; an option that cannot run here says so."""
    import subprocess
    import sys

    from conftest import test_env

    out = tmp_path / "tp.json"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_throughput.py", "--hidden", "64", "--layers", "2", "--heads", "4",
         "--kv-heads", "2", "--ffn", "128", "--vocab", "2048", "--seq", "64", "--batch", "2", "--steps", "6",
         "--warmup", "2", "--rows", "plain,project+zero2,project+liger", "--json", str(out)],
        cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "project+zero2", "project+liger"]
    for name in ("plain", "project+zero2"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tokens_per_step"] == 2 * 64
        for key in ("tokens_per_s", "run_tokens_per_s", "mfu", "peak_mem_gib", "ratio"):
            assert row[key] > 0, (name, key, row)
        assert row["vs"] == "plain"
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[2:]] == list(rows)
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert rows["project+liger"]["status"].startswith("skipped: liger-kernel is not installed")
