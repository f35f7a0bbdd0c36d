"""Fake pipeline runs for the study report's tests: a run directory with pipeline.json and
per-model eval files, and the check that a finished study's numbers are those files'."""

from __future__ import annotations

import json
import math
from pathlib import Path


def write_result(eval_dir: Path, task: str, value: float, n: int = 100, metric: str = "acc") -> None:
    """A result file as launch/eval.py writes it (only the fields the study reads)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    stderr = math.sqrt(value * (1 - value) / (n - 1))
    record = {"task": task, "n": n, "output_type": "multiple_choice", "chat_template": True,
              "results": {"alias": task, f"{metric},none": value, f"{metric}_stderr,none": stderr}}
    (eval_dir / f"{task}.json").write_text(json.dumps(record))


def fake_run(root: Path, scores: dict, missing=(), merges=None) -> Path:
    """A run directory with pipeline.json and eval files: scores = {model: {task: value}};
    merges = {step name: merge_method}, each of start and dpo (default: one slerp)."""
    run = root / "grid"
    merges = merges or {"slerp": "slerp"}
    steps = [
        {"name": "cpt", "kind": "train", "stage": "cpt", "depends_on": [], "epochs": 2},
        {"name": "sft", "kind": "train", "stage": "sft", "depends_on": ["cpt"]},
        {"name": "dpo", "kind": "train", "stage": "dpo", "depends_on": ["sft"]},
    ] + [{"name": name, "kind": "merge", "stage": None, "depends_on": ["dpo"], "parents": ["start", "dpo"],
          "method": method} for name, method in merges.items()]
    tasks = sorted({t for s in scores.values() for t in s})
    evals = []
    for model in ["start", "cpt/epoch-1", "cpt", "sft", "dpo", *merges]:
        out = run / model.replace("/", "/epochs/") / "eval" if model != "start" else run / "start" / "eval"
        evals.append({"name": f"eval-{model.replace('/', '-')}", "kind": "eval", "stage": None,
                      "output_dir": str(out), "evaluates": model, "tasks": tasks, "depends_on": []})
        for task, value in scores.get(model, {}).items():
            if (model, task) not in missing:
                write_result(out, task, value)
    for s in steps:
        s.setdefault("output_dir", str(run / s["name"]))
        s.setdefault("parents", [])
        s.setdefault("epochs", None)
    run.mkdir(parents=True, exist_ok=True)
    (run / "pipeline.json").write_text(json.dumps({"pipeline": "grid", "steps": steps + evals}))
    return run


SCORES = {
    "start": {"dom_loglik": 0.40, "gen_gen": 0.30},
    "cpt/epoch-1": {"dom_loglik": 0.45, "gen_gen": 0.29},
    "cpt": {"dom_loglik": 0.50, "gen_gen": 0.28},
    "sft": {"dom_loglik": 0.60, "gen_gen": 0.27},
    "dpo": {"dom_loglik": 0.62, "gen_gen": 0.25},
    "slerp": {"dom_loglik": 0.66, "gen_gen": 0.26},
}


TINY_MODELS = {"cpt/epoch-1", "cpt/epoch-2", "cpt", "sft", "dpo", "orpo", "slerp-dpo", "slerp", "linear"}
TINY_MERGES = {("slerp-dpo", "slerp"), ("slerp", "slerp"), ("linear", "linear")}  # two methods of the same parents
TINY_PLOTS = ("study_bars.png", "study_synergy.png", "study_cpt_epochs.png")


def assert_study_matches_evals(run: Path, models=TINY_MODELS, merges=TINY_MERGES, plots=TINY_PLOTS) -> None:
    """The study is complete, reports `models` and `merges` (step, method) and draws `plots`
    (default: the tiny grid's), and every number in it is the one in the model's own eval file."""
    plan = json.loads((run / "pipeline.json").read_text())
    report = json.loads((run / "study.json").read_text())
    assert not report["missing"], report["missing"]
    reported = {m["name"]: m for m in report["models"]}
    assert set(reported) == set(models)
    for step in plan["steps"]:
        if step["kind"] != "eval":
            continue
        for task in step["tasks"]:
            record = json.loads((Path(step["output_dir"]) / f"{task}.json").read_text())
            metric = reported[step["evaluates"]]["scores"][task]["metric"]
            (key,) = [k for k in record["results"] if k.split(",")[0] == metric.split(",")[0] and "," in k]
            assert reported[step["evaluates"]]["scores"][task]["value"] == record["results"][key]
    assert {(m["merge"], m["method"]) for m in report["merges"]} == set(merges)
    for png in plots:
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png
