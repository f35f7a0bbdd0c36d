"""The study report: every evaluation of a pipeline run side by side, as the paper compares
strategies (Lu, Luu & Buehler 2024, Figs 4-7).

    python launch/study.py outputs/pipelines/tiny

reads <run dir>/pipeline.json (written when the pipeline starts) and each evaluation step's
<model>/eval/<task>.json, and writes into the run directory:

    study.json       every number below, machine-readable
    study.md         one row per model, one column per task (= protocol), value ± 95% interval;
                     the change against the start model; for every merge its method, P1, P2,
                     E=(P1+P2)/2, max(P1,P2), merged-E, merged-max and a verdict; for every
                     multiple-choice task with per-item scores (<task>.items.jsonl) intervals
                     clustered by fact, paired tests against the start model and between arms,
                     margins and the control's distance from chance; the storage probe per epoch
                     (orchestration/study_items.py)
    study_bars.png   one bar per model and task, the start model as a line
    study_synergy.png  merged score against E for every merge, with the diagonal
    study_cpt_epochs.png  score after each CPT epoch, against the start model (when evaluated)

A partial run gives a partial report that lists what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from core.errors import UserError, argument_parser
from core.outputs import write_atomic
from core.validate import check_value, writable_dir
from core.wandb_runs import log_wandb_run, table_rows
from evaluation.results import interval, load_results
from evaluation.synergy import compare
from orchestration.steps import PLAN_FILE, START, STUDY_FILE
from orchestration.study_items import item_statistics, items_markdown, value_loss_markdown, value_losses

# The metric a task is ranked by: accuracy for log-likelihood MC/TF, exact match for the
# paper's generation protocol; anything else: the task's first metric.
PRIMARY_METRICS = ("acc", "exact_match")


@dataclass
class Score:
    metric: str
    value: float
    stderr: float
    n: int

    @property
    def interval(self) -> Tuple[float, float]:
        return interval(self.value, self.stderr, self.n)

    def as_tuple(self) -> Tuple[float, float, int]:
        return self.value, self.stderr, self.n

    def as_dict(self) -> dict:
        lo, hi = self.interval
        return dict(metric=self.metric, value=self.value, stderr=self.stderr, n=self.n, ci95=[lo, hi])


def primary_metric(metrics: Dict[str, tuple]) -> Score:
    """A task's headline number from {metric: (value, stderr, n)}."""
    name = next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics)))
    return Score(name, *metrics[name])


@dataclass
class ModelRow:
    name: str
    """start, a step name, or <cpt step>/epoch-<k>."""
    kind: str
    """start, train (with its stage), merge or epoch."""
    stage: Optional[str] = None
    scores: Dict[str, Score] = field(default_factory=dict)
    """task -> the task's primary metric."""
    method: Optional[str] = None
    """A merge's merge_method (slerp, linear, ties, ...): two merges of the same parents differ by it."""
    eval_dir: Optional[str] = None
    """Where its evaluation wrote <task>.json and the per-item scores."""

    @property
    def label(self) -> str:
        """The kind column: the stage of a training step, `merge (METHOD)` of a merge."""
        if self.kind == "train":
            return self.stage
        return f"merge ({self.method})" if self.kind == "merge" and self.method else self.kind


def read_plan(run_dir: Path) -> dict:
    path = run_dir / PLAN_FILE
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a pipeline run (no {PLAN_FILE}): give the directory a pipeline wrote, "
            "<root>/<pipeline>, e.g. outputs/pipelines/tiny"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}): rerun the pipeline to rewrite it") from err


def collect(plan: dict) -> Tuple[List[ModelRow], List[str], List[dict]]:
    """(rows in pipeline order, task names, missing evaluations)."""
    steps = {s["name"]: s for s in plan["steps"]}
    rows: List[ModelRow] = []
    tasks: List[str] = []
    missing = []
    for step in plan["steps"]:
        if step["kind"] != "eval":
            continue
        target = step["evaluates"]
        for task in step["tasks"]:
            if task not in tasks:
                tasks.append(task)
        if target == START:
            row = ModelRow(START, "start")
        elif "/" in target:
            row = ModelRow(target, "epoch", "cpt")
        else:
            row = ModelRow(target, steps[target]["kind"], steps[target]["stage"], method=steps[target].get("method"))
        row.eval_dir = step["output_dir"]
        results = load_results(step["output_dir"], output_dir=step["output_dir"])
        for task in step["tasks"]:
            if task in results:
                row.scores[task] = primary_metric(results[task])
            else:
                missing.append({"step": step["name"], "model": target, "task": task})
        rows.append(row)
        if target in steps and steps[target].get("epochs"):
            # The CPT step's own output is its last epoch's model: one evaluation serves both.
            last = ModelRow(f"{target}/epoch-{steps[target]['epochs']}", "epoch", "cpt", row.scores)
            rows.append(last)
    return rows, tasks, missing


def epoch_of(row: ModelRow) -> int:
    return int(row.name.rsplit("-", 1)[1])


def improvements(rows: List[ModelRow], tasks: List[str]) -> Dict[str, Dict[str, dict]]:
    """{model: {task: {abs, rel}}} against the start model."""
    start = next((r for r in rows if r.kind == "start"), None)
    out: Dict[str, Dict[str, dict]] = {}
    if start is None:
        return out
    for row in rows:
        for task in tasks:
            if task in row.scores and task in start.scores:
                base = start.scores[task].value
                diff = row.scores[task].value - base
                out.setdefault(row.name, {})[task] = {"abs": diff, "rel": diff / base if base else None}
    return out


def merge_synergies(plan: dict, rows: List[ModelRow], tasks: List[str]) -> List[dict]:
    by_name = {r.name: r for r in rows}
    found = []
    for step in plan["steps"]:
        if step["kind"] != "merge" or step["name"] not in by_name:
            continue
        parents = [by_name.get(p) for p in step["parents"]]
        for task in tasks:
            scores = [p.scores.get(task) if p else None for p in parents] + [by_name[step["name"]].scores.get(task)]
            if any(s is None for s in scores):
                continue
            p1, p2, merged = scores
            comparison = compare([p1.as_tuple(), p2.as_tuple()], merged.as_tuple())
            found.append(dict(merge=step["name"], method=step.get("method"), parents=step["parents"], task=task,
                              metric=merged.metric, **comparison))
    return found


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def cell(score: Optional[Score]) -> str:
    if score is None:
        return "–"
    lo, hi = score.interval
    if math.isnan(lo):
        return f"{score.value:.3f}"
    return f"{score.value:.3f} [{lo:.3f}, {hi:.3f}]"


def signed(x: Optional[float], percent: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}%" if percent else f"{x:+.3f}"


def markdown(plan: dict, rows, tasks, gains, synergies, missing, items=None, probes=None) -> str:
    metric = {t: next((r.scores[t].metric for r in rows if t in r.scores), "?") for t in tasks}
    lines = [f"# Study: {plan['pipeline']}", "",
             "Each column is one lm-eval task (one protocol: `_loglik` = log-likelihood of each option, "
             "`_gen` = the paper's one-letter answer, greedy), its primary metric and 95% interval "
             "(Wilson, over the task's n questions); Δ is the change against the start model.", ""]
    if not gains:
        lines += ["No start model was evaluated (a random-init start, or pipeline.eval.start=false): "
                  "no Δ column.", ""]
    head = ["model", "kind"] + [f"{t} ({metric[t]})" for t in tasks] + [f"Δ {t}" for t in tasks]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        g = gains.get(row.name, {})
        deltas = [f"{signed(g[t]['abs'])} ({signed(g[t]['rel'], True)})" if t in g else "–" for t in tasks]
        lines.append("| " + " | ".join([row.name, row.label] + [cell(row.scores.get(t)) for t in tasks] + deltas) + " |")
    if synergies:
        lines += ["", "## Merges against their parents", "",
                  "E = (P1+P2)/2 is what a merge scores if it only averages its parents; above max(P1, P2) "
                  "it beats both (the paper's synergy). ± is the 95% margin of each difference; the verdict "
                  "counts a difference only beyond it (evaluation/synergy.py).", "",
                  "| merge | method | task | P1 | P2 | E | max | merged | merged−E | merged−max | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in synergies:
            p1, p2 = s["parents"]
            lines.append(
                f"| {s['merge']} | {s['method'] or '?'} | {s['task']} | {s['P1']:.3f} ({p1}) | {s['P2']:.3f} ({p2}) | "
                f"{s['E']:.3f} | "
                f"{s['max']:.3f} | {s['merged']:.3f} | {signed(s['merged-E'])} ± {s['margin_E']:.3f} | "
                f"{signed(s['merged-max'])} ± {s['margin_max']:.3f} | {s['verdict']} |"
            )
    lines += items_markdown(items or {})
    lines += value_loss_markdown(probes or {})
    if missing:
        lines += ["", "## Missing", ""]
        lines += [f"- {m['model']}: {m['task']} (step {m['step']} has not written it yet)" for m in missing]
    return "\n".join(lines) + "\n"


def save(fig, run_dir: Path, name: str, written: Dict[str, str]) -> None:
    """study_<name>.png into the run directory."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    written[name] = str(run_dir / f"study_{name}.png")
    fig.savefig(written[name], dpi=110)
    plt.close(fig)


def plot(run_dir: Path, rows: List[ModelRow], tasks: List[str], synergies: List[dict]) -> Dict[str, str]:
    """The PNGs; returns {name: path} of those written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = {}
    start = next((r for r in rows if r.kind == "start"), None)
    strategies = [r for r in rows if r.kind in ("train", "merge")]
    if strategies and tasks:
        fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 1.1 * len(strategies) + 2), 3.2 * len(tasks)),
                                 squeeze=False)
        for ax, task in zip(axes[:, 0], tasks):
            present = [r for r in strategies if task in r.scores]
            values = [r.scores[task].value for r in present]
            errors = [[r.scores[task].value - r.scores[task].interval[0] for r in present],
                      [r.scores[task].interval[1] - r.scores[task].value for r in present]]
            colors = ["tab:orange" if r.kind == "merge" else "tab:blue" for r in present]
            ax.bar([r.name for r in present], values, yerr=errors, color=colors, capsize=3)
            if start is not None and task in start.scores:
                base = start.scores[task].value
                ax.axhline(base, color="black", linestyle="--", label=f"start {base:.3f}")
                for i, v in enumerate(values):
                    ax.annotate(f"{100 * (v - base) / base:+.0f}%" if base else "", (i, v), ha="center",
                                va="bottom", fontsize=8)
                ax.legend(loc="lower right", fontsize=8)
            ax.set_title(task)
            ax.set_ylabel(start.scores[task].metric if start and task in start.scores else "score")
            ax.tick_params(axis="x", rotation=30)
        save(fig, run_dir, "bars", written)
    if synergies:
        fig, ax = plt.subplots(figsize=(5, 5))
        xs = [s["E"] for s in synergies]
        ys = [s["merged"] for s in synergies]
        for task in dict.fromkeys(s["task"] for s in synergies):  # one colour per task, named in the legend
            mine = [s for s in synergies if s["task"] == task]
            ax.scatter([s["E"] for s in mine], [s["merged"] for s in mine], label=task)
            for s in mine:
                name = f"{s['merge']} ({s['method']})" if s["method"] else s["merge"]
                ax.annotate(name, (s["E"], s["merged"]), fontsize=7, xytext=(4, -3), textcoords="offset points")
        lo, hi = min(xs + ys) - 0.02, max(xs + ys) + 0.02
        ax.plot([lo, hi], [lo, hi], color="gray", linestyle="--", label="merged = E")
        ax.set_xlabel("E = (P1 + P2) / 2")
        ax.set_ylabel("merged")
        ax.set_title("Merges against their parents' mean")
        ax.legend(fontsize=8)
        save(fig, run_dir, "synergy", written)
    epochs = sorted((r for r in rows if r.kind == "epoch"), key=epoch_of)
    if epochs and tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task in tasks:
            points = [(epoch_of(r), r.scores[task].value) for r in epochs if task in r.scores]
            if start is not None and task in start.scores:
                points = [(0, start.scores[task].value)] + points
            if points:
                ax.plot(*zip(*points), marker="o", label=task)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("CPT epoch (0 = start model)")
        ax.set_ylabel("score")
        ax.set_title("Score after each CPT epoch")
        ax.legend(fontsize=8)
        save(fig, run_dir, "cpt_epochs", written)
    return written


def study_parser(doc: str = ""):
    """launch/study.py's arguments: one RUN_DIR."""
    parser = argument_parser("python launch/study.py RUN_DIR", prog="launch/study.py", description=doc)
    parser.add_argument("run_dir", help="a pipeline's run directory, <root>/<pipeline>")
    return parser


def run_study(run_dir: str) -> dict:
    """Write study.json, study.md and the plots for a pipeline run; returns the report."""
    run = Path(run_dir).expanduser().resolve()
    plan = read_plan(run)
    check_value("RUN_DIR", run, (writable_dir,))  # the report goes next to the plan
    rows, tasks, missing = collect(plan)
    if not any(r.scores for r in rows):
        raise UserError(
            f"{run}: no evaluation results yet (no <model>/eval/<task>.json): run the pipeline's evaluation steps "
            "first (pipeline.eval.tasks=[...])"
        )
    gains = improvements(rows, tasks)
    synergies = merge_synergies(plan, rows, tasks)
    # each evaluation once (a CPT step's last-epoch row repeats its step's, without an eval_dir)
    evaluated = {r.name: r.eval_dir for r in rows if r.eval_dir}
    items = item_statistics(plan, evaluated, tasks)
    probes = value_losses(plan)
    plots = plot(run, rows, tasks, synergies)
    report = {
        "pipeline": plan["pipeline"],
        "tasks": tasks,
        "models": [{"name": r.name, "kind": r.kind, "stage": r.stage, "method": r.method,
                    "scores": {t: s.as_dict() for t, s in r.scores.items()},
                    "vs_start": gains.get(r.name, {})} for r in rows],
        "merges": synergies,
        "items": items,
        "value_loss": probes,
        "missing": missing,
        "plots": {k: Path(v).name for k, v in plots.items()},
    }
    md = markdown(plan, rows, tasks, gains, synergies, missing, items, probes)
    write_atomic(run / "study.md", md)
    write_atomic(run / STUDY_FILE, json.dumps(report, indent=2) + "\n")  # last: it marks the step complete
    columns = ["model", "kind", "task", "metric", "value", "stderr"]
    flat = [dict(model=r.name, kind=r.kind, task=t, metric=s.metric, value=s.value, stderr=s.stderr)
            for r in rows for t, s in r.scores.items()]
    log_wandb_run("study", {"pipeline": plan["pipeline"], "tasks": tasks},
                  {f"{r['model']}/{r['task']}": r["value"] for r in flat},
                  tables={"study": table_rows(flat, columns),
                          "synergy": table_rows(synergies, ["merge", "method", "task", "P1", "P2", "E", "max",
                                                            "merged", "merged-E", "merged-max", "verdict"])},
                  images=plots)
    print(md)
    print(f"study: {run / 'study.md'}, {run / STUDY_FILE}" + "".join(f", {p}" for p in plots.values()), flush=True)
    if missing:
        print(f"study: {len(missing)} evaluation(s) missing, listed in study.md; rerun the pipeline to fill them",
              flush=True)
    return report
