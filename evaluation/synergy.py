"""A merge against its parents, as the paper scores it (Lu, Luu & Buehler, 2409.03444): pure
arithmetic on the eval result files of the three models (evaluation/results.py).

For every task and metric the three models share: P1, P2, E = (P1 + P2) / 2 (what a merge
"should" score), max(P1, P2), merged - E, merged - max, and a verdict. A difference counts as
real only when it exceeds 1.96 standard errors of that difference (the models answered the
same questions; treating their errors as independent makes the test conservative). The
paper's Llama-8B and Mistral-7B merges beat both parents; its SmolLM-1.7B merges did not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from core.errors import UserError
from evaluation.results import Z95, Results

# lm-eval metrics where lower is better; every bundled one is higher-is-better
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def parents_of(merged_dir: Path) -> List[str]:
    """The models a domainforge (or mergekit) merge was made from, from its mergekit_config.yml."""
    path = Path(merged_dir) / "mergekit_config.yml"
    if not path.is_file():
        raise UserError(f"{merged_dir} holds no mergekit_config.yml to read the parents from: pass --parents P1 P2")
    spec = yaml.safe_load(path.read_text()) or {}
    names: List[str] = [entry["model"] for entry in spec.get("models") or []]
    for piece in spec.get("slices") or []:
        names.extend(src["model"] for src in piece.get("sources", []))
    unique = list(dict.fromkeys(str(n) for n in names))
    if len(unique) != 2:
        raise UserError(f"{path} names {len(unique)} models, not two: pass --parents P1 P2")
    return unique


def _se(stderr: float) -> float:
    return 0.0 if stderr is None or math.isnan(stderr) else stderr


def compare(parents: Sequence[tuple], merged: tuple, higher_is_better: bool = True) -> Dict[str, object]:
    """The paper's comparison for one metric; each score is (value, stderr, n)."""
    (p1, s1, _), (p2, s2, _) = parents
    value, stderr, n = merged
    sign = 1.0 if higher_is_better else -1.0
    expected = (p1 + p2) / 2
    best, best_se = (p1, s1) if sign * p1 >= sign * p2 else (p2, s2)
    over_expected, over_best = value - expected, value - best
    se_expected = math.sqrt(_se(stderr) ** 2 + (_se(s1) ** 2 + _se(s2) ** 2) / 4)
    se_best = math.sqrt(_se(stderr) ** 2 + _se(best_se) ** 2)
    out = {"P1": p1, "P2": p2, "merged": value, "E": expected, "max": best,
           "merged-E": over_expected, "merged-max": over_best, "n": n,
           "margin_E": Z95 * se_expected, "margin_max": Z95 * se_best}
    out["verdict"] = verdict(sign * over_expected, sign * over_best, Z95 * se_expected, Z95 * se_best)
    return out


def verdict(over_expected: float, over_best: float, margin_expected: float = 0.0, margin_best: float = 0.0) -> str:
    """Words for the two gains (signed so that positive is better), against their 95% margins."""
    if over_best > margin_best:
        return "beats both parents"
    if over_best > 0:
        return "above the best parent, within noise"
    if over_expected > margin_expected:
        return "beats the parents' mean, not the best parent"
    if over_expected >= -margin_expected:
        return "at the parents' mean, within noise"
    return "below the parents' mean"


def synergy_table(parent_results: Sequence[Results], merged: Results,
                  tasks: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, dict]]:
    """{task: {metric: comparison}} for every task and metric all three models have."""
    names = tasks or sorted(set(merged).intersection(*parent_results))
    table: Dict[str, Dict[str, dict]] = {}
    for task in names:
        missing = [i + 1 for i, r in enumerate(parent_results) if task not in r]
        if task not in merged or missing:
            who = "the merged model" if task not in merged else f"parent {missing[0]}"
            raise UserError(f"no result for task '{task}' from {who}: run launch/eval.py on it first")
        metrics = sorted(set(merged[task]).intersection(*(r[task] for r in parent_results)))
        table[task] = {m: compare([r[task][m] for r in parent_results], merged[task][m],
                                  higher_is_better=m.split(",")[0] not in LOWER_IS_BETTER)
                       for m in metrics}
    if not table:
        raise UserError("the merged model and its parents share no eval results: run launch/eval.py on all three")
    return table


def format_synergy(table: Dict[str, Dict[str, dict]]) -> str:
    header = ("task", "metric", "n", "P1", "P2", "E", "max", "merged", "merged-E", "merged-max", "verdict")
    rows = [header]
    for task, metrics in table.items():
        for metric, c in metrics.items():
            rows.append((task, metric, str(c["n"]), *(f"{c[k]:.4f}" for k in ("P1", "P2", "E", "max", "merged")),
                         f"{c['merged-E']:+.4f}", f"{c['merged-max']:+.4f}", str(c["verdict"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_model_dir(path: Path, role: str) -> Path:
    from core.outputs import is_model_dir

    if not is_model_dir(path):
        raise UserError(f"{role} {path} is not a model directory (no config.json): give a saved model's directory")
    return path


def ensure_results(model_dir: Path, tasks: Optional[Sequence[str]], eval_overrides: Sequence[str]) -> Results:
    """The model's eval results, after evaluating whatever `tasks` it lacks (all of the
    `synergy` preset when tasks is None and it has none)."""
    from evaluation.results import load_results
    from evaluation.run import evaluate_overrides

    have = load_results(model_dir)
    if tasks is None:
        todo = [] if have else ["eval=synergy"]
    else:
        missing = [t for t in tasks if t not in have]
        todo = [f"tasks=[{','.join(missing)}]"] if missing else []
    if todo:
        print(f"evaluating {model_dir}: {todo[0]}", flush=True)
        evaluate_overrides([*todo, *eval_overrides], str(model_dir))
        have = load_results(model_dir)
    return have


def synergy_parser(doc: str = ""):
    """launch/synergy.py's arguments: MERGED_DIR [key=value ...] [--parents P1 P2] [--tasks T ...] [--json F]."""
    from core.errors import argument_parser

    parser = argument_parser("python launch/synergy.py MERGED_DIR [key=value ...] [--parents P1 P2] [--tasks T ...]",
                             prog="launch/synergy.py", description=doc)
    parser.add_argument("merged", help="the merged model's directory")
    parser.add_argument("eval_overrides", nargs="*", metavar="key=value",
                        help="launch/eval.py settings for evaluations that must run first (limit=, batch_size=, ...)")
    parser.add_argument("--parents", nargs=2, metavar=("P1", "P2"),
                        help="the parent models (default: from MERGED_DIR/mergekit_config.yml)")
    parser.add_argument("--tasks", nargs="+", help="task names to compare (default: the merged model's results)")
    parser.add_argument("--json", help="also write the comparison to this file")
    return parser


def run_synergy(merged_dir: str, parents: Optional[List[str]] = None, tasks: Optional[List[str]] = None,
                eval_overrides: Sequence[str] = (), json_out: Optional[str] = None) -> Dict[str, object]:
    """Compare a merge with its parents on their eval results (evaluating what is missing);
    print the table and optionally write it as JSON."""
    import json

    from core.outputs import write_atomic

    merged = check_model_dir(Path(merged_dir), "the merged model")
    parent_dirs = [check_model_dir(Path(p), "parent model") for p in (parents or parents_of(merged))]
    if len(parent_dirs) != 2:
        raise UserError(f"--parents: give two parent models, not {len(parent_dirs)}")
    merged_results = ensure_results(merged, tasks, eval_overrides)
    names = tasks or sorted(merged_results)
    parent_results = [ensure_results(p, names, eval_overrides) for p in parent_dirs]
    table = synergy_table(parent_results, merged_results, names)
    report = {"merged": str(merged), "parents": [str(p) for p in parent_dirs], "tasks": table}
    print(f"P1 = {parent_dirs[0]}\nP2 = {parent_dirs[1]}\nmerged = {merged}", flush=True)
    print(format_synergy(table), flush=True)
    if json_out:
        write_atomic(Path(json_out).resolve(), json.dumps(report, indent=2) + "\n")
    return report
