"""The paper's eval-set format (Lu, Luu & Buehler, 2409.03444), read and checked in one place.

An eval set is a JSONL file of one kind:
  MC  {"question": str, "options": [str, ...] (2-8), "answer": "A".."H"}
  TF  {"statement": str, "answer": "True" | "False"}   (JSON true/false also accepted)
Other fields are kept. Every row gets `label` (index of the right option: for TF 0 = True,
1 = False) and, for MC, `lettered` ("A. ...\\nB. ..."), which the task templates in
evaluation/tasks/ read. Any problem is a UserError naming the file, the line and the fix,
raised before a model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from core.config import REPO_ROOT
from core.errors import UserError
from core.jsonl import read_json_objects

LETTERS = "ABCDEFGH"  # 8 at most: the extraction regex stops before "I" (the pronoun)
TF_ANSWERS = {"true": "True", "false": "False"}
MC_FIELDS, TF_FIELDS = ("question", "options", "answer"), ("statement", "answer")
FORMAT_HINT = ("MC rows need question, options (a list) and answer (a letter); "
               "TF rows need statement and answer (True or False): see docs/eval.md")


def resolve_data_file(path: str) -> Path:
    """`${repo:data/x.jsonl}` is inside this repository (the bundled tasks use it); any other
    path is taken as given (relative to the current directory)."""
    if path.startswith("${repo:") and path.endswith("}"):
        return REPO_ROOT / path[len("${repo:"):-1]
    return Path(path).expanduser()


def read_jsonl(path: str) -> List[dict]:
    """Rows of a JSONL file; UserError for a missing, empty or malformed file."""
    rows = read_json_objects(resolve_data_file(path), "eval set", f"give a .jsonl file of rows ({FORMAT_HINT})")
    return [row for _, row in rows]


def eval_set_kind(row: dict, where: str) -> str:
    """'mc' or 'tf' from a row's fields."""
    if "options" in row or "question" in row:
        return "mc"
    if "statement" in row:
        return "tf"
    raise UserError(f"{where}: fields {sorted(row)} are neither MC nor TF: {FORMAT_HINT}")


def check_row(row: dict, kind: str, where: str) -> dict:
    """The row with `label` (and `lettered` for MC) added; UserError naming the bad field."""
    fields = MC_FIELDS if kind == "mc" else TF_FIELDS
    missing = [f for f in fields if f not in row]
    if missing:
        raise UserError(f"{where}: missing field '{missing[0]}' ({FORMAT_HINT})")
    answer = row["answer"]
    if kind == "tf":
        if not isinstance(row["statement"], str) or not row["statement"].strip():
            raise UserError(f"{where}: 'statement' must be a non-empty string")
        key = str(answer).strip().lower()
        if key not in TF_ANSWERS:
            raise UserError(f"{where}: answer {answer!r} is not True or False")
        return {**row, "answer": TF_ANSWERS[key], "label": 0 if key == "true" else 1}
    options = row["options"]
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS) or \
            not all(isinstance(o, str) and o.strip() for o in options):
        raise UserError(f"{where}: 'options' must be a list of 2 to {len(LETTERS)} non-empty strings")
    letters = LETTERS[: len(options)]
    if not isinstance(answer, str) or answer.strip().upper() not in letters:
        raise UserError(f"{where}: answer {answer!r} is not one of the option letters {', '.join(letters)}")
    letter = answer.strip().upper()
    lettered = "\n".join(f"{l}. {o}" for l, o in zip(letters, options))
    return {**row, "answer": letter, "label": letters.index(letter), "lettered": lettered}


def load_eval_set(path: str) -> List[dict]:
    """Every row of a paper-format eval set, checked and labelled; one kind per file."""
    rows = read_jsonl(path)
    file = resolve_data_file(path)
    kind = eval_set_kind(rows[0], f"{file} line 1")
    out = []
    for number, row in enumerate(rows, 1):
        where = f"{file} row {number}"
        if eval_set_kind(row, where) != kind:
            raise UserError(f"{where}: mixes MC and TF rows: put each kind in its own file")
        out.append(check_row(row, kind, where))
    return out


def file_kind(path: str) -> str:
    return eval_set_kind(read_jsonl(path)[0], f"{resolve_data_file(path)} line 1")


# The task templates (evaluation/tasks/) that give an eval set file its two protocols.
TASK_DIR = Path(__file__).resolve().parent / "tasks"
TEMPLATES: Dict[str, Dict[str, str]] = {
    "mc": {"loglik": "_mc_loglik_template_yaml", "gen": "_mc_gen_template_yaml"},
    "tf": {"loglik": "_tf_loglik_template_yaml", "gen": "_tf_gen_template_yaml"},
}


def eval_set_task_yamls(path: str, name: str) -> Dict[str, str]:
    """{task name: YAML text} for both protocols on one eval set file: `<name>_loglik` and
    `<name>_gen`. The file is checked here, so a bad one fails before a model loads."""
    load_eval_set(path)
    kind = file_kind(path)
    data = str(resolve_data_file(path).resolve())
    return {
        f"{name}_{protocol}": (
            f"include: {TASK_DIR / template}\n"
            f"task: {name}_{protocol}\n"
            f"dataset_kwargs:\n  data_files: {json.dumps(data)}\n"
        )
        for protocol, template in TEMPLATES[kind].items()
    }
