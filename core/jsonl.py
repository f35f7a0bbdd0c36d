"""Small JSONL files read whole (eval sets, probe sets): one JSON object per line, and a bad line
named by its number before any work starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

from core.errors import UserError


def read_json_objects(file: Path, where: str, fix: str) -> List[Tuple[int, dict]]:
    """(line number, object) of each row of `file`, blank lines skipped. UserError naming `where`
    (the key or kind of file), the file, the line and `fix` for a missing or empty file, or a row
    that is not valid JSON or not an object."""
    if not file.is_file():
        raise UserError(f"{where}: {file} not found: {fix}")
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: {file} line {number}: not valid JSON ({err.msg}): one JSON object per line"
                            ) from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: {file} line {number}: expected a JSON object, got {type(row).__name__}: "
                            "one JSON object per line")
        rows.append((number, row))
    if not rows:
        raise UserError(f"{where}: {file} has no rows: {fix}")
    return rows
