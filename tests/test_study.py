"""The study report: its numbers are the per-model evaluation files', each merge is scored
against its parents, the plots exist, a partial run says what is missing; and the tiny grid
runs end to end here (train, merge, evaluate, study) with every W&B run in one group."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from tests.support.env import REPO, assert_one_line_error, launch
from core.errors import UserError
from orchestration.study import run_study
from tests.support.study import SCORES, assert_study_matches_evals, fake_run
from tests.support.wandb_offline import find_offline_runs, history, run_info


def test_report_numbers_are_the_eval_files(tmp_path):
    run = fake_run(tmp_path, SCORES)
    report = run_study(str(run))
    saved = json.loads((run / "study.json").read_text())
    assert saved == json.loads(json.dumps(report))
    models = {m["name"]: m for m in saved["models"]}
    for model, tasks in SCORES.items():
        for task, value in tasks.items():
            assert models[model]["scores"][task]["value"] == value
    # The change against the start model, absolute and relative.
    assert models["sft"]["vs_start"]["dom_loglik"]["abs"] == pytest.approx(0.20)
    assert models["sft"]["vs_start"]["dom_loglik"]["rel"] == pytest.approx(0.5)
    # The merge against its parents (start 0.40, dpo 0.62): E 0.51, max 0.62, merged 0.66.
    (dom,) = [m for m in saved["merges"] if m["task"] == "dom_loglik"]
    assert (dom["P1"], dom["P2"], dom["merged"]) == (0.40, 0.62, 0.66)
    assert dom["E"] == pytest.approx(0.51) and dom["max"] == pytest.approx(0.62)
    assert dom["merged-E"] == pytest.approx(0.15) and dom["merged-max"] == pytest.approx(0.04)
    assert dom["verdict"] == "above the best parent, within noise"  # +0.04 on 100 questions is noise
    (gen,) = [m for m in saved["merges"] if m["task"] == "gen_gen"]
    assert gen["merged-E"] == pytest.approx(-0.015) and gen["verdict"] == "at the parents' mean, within noise"
    # The CPT curve has both epochs: epoch 1 its own evaluation, epoch 2 the step's output.
    assert models["cpt/epoch-1"]["scores"]["dom_loglik"]["value"] == 0.45
    assert models["cpt/epoch-2"]["scores"]["dom_loglik"]["value"] == 0.50
    md = (run / "study.md").read_text()
    assert "| slerp | merge (slerp) | 0.660 [" in md and "+0.200 (+50.0%)" in md
    for png in ("study_bars.png", "study_synergy.png", "study_cpt_epochs.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not saved["missing"]


def test_two_merge_methods_of_the_same_parents_are_told_apart(tmp_path):
    """SLERP against linear of the same parents (the paper's question): the table, the merges
    section, study.json and the W&B synergy table name each merge's method."""
    scores = dict(SCORES, linear={"dom_loglik": 0.52, "gen_gen": 0.27})
    run = fake_run(tmp_path, scores, merges={"slerp": "slerp", "linear": "linear"})
    report = run_study(str(run))
    models = {m["name"]: m for m in report["models"]}
    assert (models["slerp"]["method"], models["linear"]["method"], models["dpo"]["method"]) == ("slerp", "linear", None)
    by_merge = {(m["merge"], m["task"]): m for m in report["merges"]}
    assert by_merge[("slerp", "dom_loglik")]["method"] == "slerp"
    assert by_merge[("linear", "dom_loglik")]["method"] == "linear"
    assert by_merge[("linear", "dom_loglik")]["merged"] == 0.52 and by_merge[("linear", "dom_loglik")]["P2"] == 0.62
    md = (run / "study.md").read_text()
    assert "| linear | merge (linear) | 0.520 [" in md and "| slerp | merge (slerp) | 0.660 [" in md
    assert "| merge | method | task |" in md
    assert "| slerp | slerp | dom_loglik | 0.400 (start) | 0.620 (dpo) |" in md
    assert "| linear | linear | dom_loglik | 0.400 (start) | 0.620 (dpo) |" in md


def test_partial_run_reports_what_is_missing(tmp_path):
    run = fake_run(tmp_path, SCORES, missing={("dpo", "dom_loglik"), ("slerp", "gen_gen")})
    report = run_study(str(run))
    assert {(m["model"], m["task"]) for m in report["missing"]} == {("dpo", "dom_loglik"), ("slerp", "gen_gen")}
    assert [m["task"] for m in report["merges"]] == []  # neither merge task has all three scores
    assert "## Missing" in (run / "study.md").read_text()


def test_study_of_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is not a pipeline run"):
        run_study(str(tmp_path))
    proc = launch("study.py", [str(tmp_path)], timeout=120)
    assert_one_line_error(proc, "is not a pipeline run (no pipeline.json)")
    assert not (tmp_path / "study.json").exists()


# ---------------------------------------------------------------------------------------------
# the tiny grid, end to end on this machine
# ---------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_tiny_study_runs_end_to_end(tmp_path):
    """README's quickstart, timed: it runs in the minutes the README says (a bound of twice
    that, for a loaded CI machine), on 2 cores or more."""
    args = ["pipeline=tiny", f"root={tmp_path}", "cluster.gpus_per_node=2", "pipeline.wandb=offline"]
    started = time.monotonic()
    proc = launch("pipeline.py", args, timeout=1200)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\ntiny study, locally with 2 ranks: {wall:.0f} s wall")
    (minutes,) = re.findall(r"about (\d+) minutes on a 2-core CPU", (REPO / "README.md").read_text())
    assert os.cpu_count() < 2 or wall < 2 * 60 * int(minutes), f"{wall:.0f} s against README's {minutes} minutes"
    run = tmp_path / "tiny"
    assert f"study report {run / 'study.md'}" in proc.stdout

    plan = json.loads((run / "pipeline.json").read_text())
    kinds = [s["kind"] for s in plan["steps"]]
    assert kinds.count("train") == 4 and kinds.count("merge") == 3 and kinds.count("eval") == 8 and kinds[-1] == "study"

    assert_study_matches_evals(run)
    # per-item statistics from the eval steps' item files; the storage probe from the CPT ranks
    report = json.loads((run / "study.json").read_text())
    sft_items = report["items"]["materials_sft_mc_loglik"]
    assert sft_items["models"]["sft"]["n"] == 16 and not sft_items["without_items"]
    assert [(p["a"], p["b"]) for p in sft_items["arms"]] == [("slerp-dpo", "slerp"), ("slerp-dpo", "linear"),
                                                            ("slerp", "linear")]
    probe = report["value_loss"]["cpt"]
    assert [r["epoch"] for r in probe] == [0, 1, 2] and probe[2]["loss"] < probe[0]["loss"], probe

    # W&B: one group, a job type per step kind, eval tables and the study's plots.
    runs = {}
    for path in find_offline_runs(run):
        info = run_info(path)
        runs.setdefault(info["job_type"], []).append((info, history(path)))
    assert {info["group"] for infos in runs.values() for info, _ in infos} == {"tiny"}
    assert set(runs) == {"cpt", "sft", "dpo", "orpo", "merge", "eval", "study"}
    assert len(runs["eval"]) == 8 and len(runs["merge"]) == 3
    eval_keys = set().union(*(row.keys() for _, rows in runs["eval"] for row in rows))
    assert any(k.startswith("samples/") for k in eval_keys), eval_keys
    (study_info, study_rows), = runs["study"]
    logged = {key.split("/")[0] for row in study_rows for key in row}
    assert {"bars", "synergy", "cpt_epochs", "study"} <= logged, logged

    # A rerun finds every step complete and runs nothing.
    again = launch("pipeline.py", args, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("is complete") == len(plan["steps"])
