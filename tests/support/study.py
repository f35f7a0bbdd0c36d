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


# ---------------------------------------------------------------------------------------------
# a knowledge-injection run with per-item scores (orchestration/study_items.py)
# ---------------------------------------------------------------------------------------------
CORRECT_MARGIN, WRONG_MARGIN = 0.5, -1.0  # log p(answer) - max log p(wrong), by construction


def option_logliks(answer: int, correct: bool) -> list:
    """Four options whose answer beats the best wrong one by CORRECT_MARGIN, or trails it by -WRONG_MARGIN."""
    others = [-1.5, -2.0, -3.0] if correct else [-1.0, -2.5, -3.0]
    loglik = list(others)
    loglik.insert(answer, -1.0 if correct else -2.0)
    return loglik


def write_items(eval_dir: Path, task: str, correct: list, control: bool = False) -> None:
    """<task>.items.jsonl (two wordings per fact: items 2f and 2f+1 ask fact f) and its result file."""
    rows = [{"doc_id": i, "fact": f"fact-{i // 2}", "answer": i % 4, "loglik": option_logliks(i % 4, c),
             "correct": bool(c)} for i, c in enumerate(correct)]
    write_result(eval_dir, task, sum(correct) / len(correct), n=len(correct))
    record = json.loads((eval_dir / f"{task}.json").read_text())
    record["task_config"] = {"task": task, "metadata": {"version": 1.0, **({"control": "chance"} if control else {})}}
    (eval_dir / f"{task}.json").write_text(json.dumps(record))
    (eval_dir / f"{task}.items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def both_wordings(facts_right: range, n_facts: int, one_wording: range = range(0)) -> list:
    """Per item (2 per fact): right on both wordings of `facts_right`, on the first of `one_wording`."""
    return [f in facts_right or (f in one_wording and w == 0) for f in range(n_facts) for w in (0, 1)]


def fake_knowledge_run(root: Path, correct: dict, control: dict) -> Path:
    """The study's tree (start; standard: documents -> qa; mixed; pit: qa -> held), with per-item
    scores of a fact task and a control task: correct/control = {model: [bool per item]}."""
    run = root / "knowledge"
    chains = {"standard-documents": [], "standard-qa": ["standard-documents"], "mixed": [],
              "pit-qa": [], "pit-held": ["pit-qa"]}
    steps = [{"name": n, "kind": "train", "stage": "mixed", "depends_on": d, "output_dir": str(run / n),
              "parents": [], "epochs": None} for n, d in chains.items()]
    for model in ["start", *chains]:
        out = run / model / "eval"
        steps.append({"name": f"eval-{model}", "kind": "eval", "stage": None, "output_dir": str(out),
                      "evaluates": model, "tasks": ["facts_mc", "control_mc"], "depends_on": [], "parents": []})
        write_items(out, "facts_mc", correct[model])
        write_items(out, "control_mc", control[model], control=True)
    run.mkdir(parents=True, exist_ok=True)
    (run / "pipeline.json").write_text(json.dumps({"pipeline": "knowledge", "steps": steps}))
    return run


def write_value_losses(step_dir: Path, losses: list) -> None:
    """A training step's value_loss.jsonl (train/value_probe.py): losses[k] after epoch k."""
    step_dir.mkdir(parents=True, exist_ok=True)
    records = [{"epoch": k, "step": 10 * k, "loss": loss, "value_tokens": 4000, "documents": 1480}
               for k, loss in enumerate(losses)]
    (step_dir / "value_loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
