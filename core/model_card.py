"""Model cards for every finished output (training stage or merge): README.md for people and
lineage.json for programs, written side by side into the model directory.

lineage.json = {"format": 1, "step": {...this output...}, "code": {"commit": <git HEAD>, "dirty": <bool>},
"parents": [<each input's lineage>]} ("code": null outside a git checkout).
A step copies its inputs' lineage.json when it starts from a domainforge output, so the whole
chain (start model -> cpt -> sft -> merge ...) is read from the last directory alone, even
after the intermediate ones are deleted. A step's record holds `kind` (model, stage or merge),
`name`, `output`, and whatever its writer adds (data, hyperparameters, recipe, versions).

README.md is rendered from the lineage plus any evaluation results found later in
`<model_dir>/eval/*.json` (written by the evaluation engine; read defensively: a file that is
not JSON is listed as unreadable, never fatal). `refresh_model_card(dir)` re-renders it after
an evaluation. No torch here: callers pass their library versions (`installed_versions`).
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

from core.outputs import EVAL_DIR, write_atomic
from core.secrets import redact

REPO = Path(__file__).resolve().parents[1]
LINEAGE_FILE = "lineage.json"
CARD_FILE = "README.md"
FORMAT = 1


def installed_versions(names: Iterable[str]) -> Dict[str, str]:
    """Installed distribution versions, read from package metadata (nothing is imported)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def code_version(repo: Path = REPO) -> Optional[dict]:
    """The checkout's git commit, and whether tracked files differ from it (the code a job runs is
    the checkout's when the job starts); None when that cannot be told (no git, not a checkout)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60)

    try:
        head, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(changes.stdout.strip()) if changes.returncode == 0 else None}


def read_lineage(model_dir: str | Path) -> Optional[dict]:
    """The lineage a domainforge output recorded; None for any other model directory."""
    try:
        record = json.loads((Path(model_dir) / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), dict) else None


def lineage_record(step: Dict[str, Any], inputs: Iterable[str | Path]) -> dict:
    """This step's lineage: its own record plus each input model's (a bare model if it has none)."""
    parents = []
    for path in inputs:
        parents.append(read_lineage(path) or {"format": FORMAT, "step": {"kind": "model", "name": str(path),
                                                                           "output": str(path)}, "parents": []})
    return {"format": FORMAT, "step": step, "code": code_version(), "parents": parents}


def lineage_steps(record: dict) -> List[dict]:
    """Every step of the chain, inputs before the steps that used them, each output once."""
    steps, seen = [], set()

    def visit(node: dict) -> None:
        for parent in node.get("parents") or []:
            visit(parent)
        step = node.get("step") or {}
        key = (step.get("kind"), step.get("output"), step.get("name"))
        if key not in seen:
            seen.add(key)
            steps.append(step)

    visit(record)
    return steps


def read_eval_results(model_dir: str | Path) -> List[Tuple[str, Any]]:
    """(file name, parsed JSON or None if unreadable) for each <model_dir>/eval/*.json."""
    results = []
    for path in sorted((Path(model_dir) / EVAL_DIR).glob("*.json")):
        try:
            results.append((path.name, json.loads(path.read_text())))
        except (OSError, ValueError, UnicodeDecodeError):
            results.append((path.name, None))
    return results


def _scalars(data: Any, prefix: str = "", depth: int = 0) -> List[Tuple[str, Any]]:
    """Numbers and short strings in nested dicts, as dotted keys (3 levels deep at most)."""
    if isinstance(data, bool) or isinstance(data, (int, float)):
        return [(prefix or "value", data)]
    if isinstance(data, str):
        return [(prefix or "value", data)] if len(data) <= 80 else []
    if isinstance(data, dict) and depth < 3:
        rows = []
        for key, value in data.items():
            rows += _scalars(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        return rows
    return []


def _yaml_block(data: Any) -> List[str]:
    return ["```yaml", *yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip().splitlines(), "```"]


def _render_step(number: int, step: dict) -> List[str]:
    kind, name = step.get("kind", "?"), step.get("name", "?")
    if kind == "model":
        return [f"{number}. **start model** `{name}`"]
    lines = [f"{number}. **{kind} `{name}`** -> `{step.get('output', '?')}`"]
    for key, label in (("start_model", "starts from"), ("method", "method"), ("finetune", "fine-tuning"),
                       ("finished", "finished")):
        if step.get(key) is not None:
            lines.append(f"   - {label}: `{step[key]}`")
    if step.get("models"):
        lines.append("   - models: " + ", ".join(f"`{m}`" for m in step["models"]))
    for line in step.get("summary") or []:
        lines.append(f"   - {line}")
    for key, label in (("data", "Data"), ("lora", "LoRA"), ("hyperparameters", "Hyperparameters"),
                       ("recipe", "Merge recipe")):
        if step.get(key):
            lines += ["", f"   {label}:", ""] + ["   " + l for l in _yaml_block(step[key])]
    return lines + [""]


def render_card(record: dict, model_dir: str | Path, title: Optional[str] = None) -> str:
    """README.md for the output whose lineage is `record` (eval results from `model_dir`)."""
    step = record["step"]
    steps = lineage_steps(record)
    tags = ["domainforge", step.get("kind", "model")]
    if step.get("finetune") in ("lora", "qlora"):
        tags.append("lora")
    lines = ["---", "library_name: transformers", f"tags: [{', '.join(tags)}]", "---",
             f"# {title or Path(model_dir).name}", ""]
    lines += step.get("description") or []
    lines += ["", "## Lineage", "", "Each step, from the start model to this one (from lineage.json):", ""]
    for i, s in enumerate(steps, 1):
        lines += _render_step(i, s)
    lines += ["## Evaluation", ""]
    results = read_eval_results(model_dir)
    if not results:
        lines.append(f"No results yet (the evaluation engine writes them to `{EVAL_DIR}/*.json`).")
    else:
        lines += ["| file | metric | value |", "| --- | --- | --- |"]
        for name, data in results:
            rows = _scalars(data) if data is not None else [("(unreadable JSON)", "")]
            for key, value in rows or [("(no scalar values)", "")]:
                lines.append(f"| {name} | {key} | {value} |")
    lines += ["", "## Library versions", ""]
    versions = step.get("versions") or {}
    lines += [f"- {k} {v}" for k, v in versions.items()] or ["(not recorded)"]
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: str | Path, record: dict, title: Optional[str] = None) -> None:
    """lineage.json and README.md into `model_dir` (each replaced atomically); `title`: the
    name the output is published under, when `model_dir` is still a temporary directory."""
    model_dir = Path(model_dir)
    write_atomic(model_dir / LINEAGE_FILE, redact(json.dumps(record, indent=2, default=str) + "\n"))
    write_atomic(model_dir / CARD_FILE, redact(render_card(record, model_dir, title)))


def refresh_model_card(model_dir: str | Path) -> bool:
    """Re-render README.md from lineage.json (e.g. after an evaluation); False if there is none."""
    record = read_lineage(model_dir)
    if record is None:
        return False
    write_atomic(Path(model_dir) / CARD_FILE, redact(render_card(record, model_dir)))
    return True
