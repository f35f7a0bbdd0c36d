"""Result files: one `<model_dir>/eval/<task>.json` per task, and the readers other steps use.

A file holds lm-eval's results, sample counts and task config for that task, the protocol and
prompt format that produced them, the evaluation settings and the library versions. Files are
replaced atomically (core.outputs.write_atomic): a reader sees a finished result or none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterator, Tuple

from core.errors import UserError
from core.outputs import EVAL_DIR

Z95 = 1.959964  # two-sided 95% normal quantile

# {task: {metric: (value, stderr, n)}}
Results = Dict[str, Dict[str, Tuple[float, float, int]]]


def metric_values(entry: dict) -> Iterator[Tuple[str, float, float]]:
    """(metric, value, stderr) from one task's lm-eval results entry. Keys are lm-eval's
    `metric,filter`; the filter is dropped where the task has only one for that metric."""
    names = [k for k in entry if "," in k and "_stderr," not in k]
    for key in names:
        metric, filt = key.split(",", 1)
        value = entry[key]
        if not isinstance(value, (int, float)):
            continue
        stderr = entry.get(f"{metric}_stderr,{filt}")
        stderr = float(stderr) if isinstance(stderr, (int, float)) else float("nan")
        alone = sum(1 for k in names if k.split(",", 1)[0] == metric) == 1
        yield (metric if alone else key), float(value), stderr


def wilson_interval(p: float, n: int) -> Tuple[float, float]:
    """95% Wilson score interval of a proportion p over n questions (stays inside [0, 1] and
    is honest near 0 and 1, where value ± 1.96·stderr is not)."""
    if n <= 0:
        return float("nan"), float("nan")
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def interval(value: float, stderr: float, n: int) -> Tuple[float, float]:
    """95% interval: Wilson for accuracies in [0, 1], value ± 1.96·stderr otherwise."""
    if 0.0 <= value <= 1.0 and n > 0:
        return wilson_interval(value, n)
    return value - Z95 * stderr, value + Z95 * stderr


def protocol_label(record: dict) -> str:
    """How the number was produced: scoring rule and prompt format."""
    rule = {"multiple_choice": "loglik", "generate_until": "gen (greedy)", "loglikelihood": "loglik",
            "loglikelihood_rolling": "perplexity"}.get(record["output_type"], record["output_type"])
    return f"{rule}, {'chat template' if record['chat_template'] else 'plain prompt'}"


def load_result_file(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read eval result {path}: {err}") from None


def load_results(model_dir: str | Path, output_dir: str | Path | None = None) -> Results:
    """{task: {metric: (value, stderr, n)}} from every finished <model_dir>/eval/<task>.json."""
    folder = Path(output_dir) if output_dir else Path(model_dir) / EVAL_DIR
    out: Results = {}
    for path in sorted(folder.glob("*.json")):
        record = load_result_file(path)
        n = int(record["n"])
        out[record["task"]] = {m: (v, s, n) for m, v, s in metric_values(record["results"])}
    return out


def format_table(records: list) -> str:
    """task | protocol | metric | value ± stderr | 95% interval | n"""
    rows = [("task", "protocol", "metric", "value ± stderr", "95% interval", "n")]
    for record in records:
        for metric, value, stderr in metric_values(record["results"]):
            lo, hi = interval(value, stderr, record["n"])
            rows.append((record["task"], protocol_label(record), metric, f"{value:.4f} ± {stderr:.4f}",
                         f"[{lo:.3f}, {hi:.3f}]", str(record["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
