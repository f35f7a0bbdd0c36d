"""Rows from disk, checked: the columns a kind of data needs and the types of its first rows.

Formats (`data.<kind>.path`): .jsonl/.json, .parquet, .csv, .txt, a glob or a directory of such
files (one format per directory), or a saved HF dataset directory (`Dataset.save_to_disk`).
A .txt file is ONE document (CPT only): EOS then marks real document ends, as in litgpt's
TextFiles; split a single huge dump into several files (or use jsonl) to stream it.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import datasets
from datasets import DatasetDict

from core.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
KINDS = ("cpt", "sft", "preference")
FORMAT_KINDS = {"text": "cpt", "chat": "sft"}
"""The kind of data each `format` of a `data.mixed` source is read and checked as."""
COLUMNS_NEEDED = {
    "cpt": "`text`",
    "sft": "`messages` (chat turns) or `prompt` + `completion`",
    "preference": "`prompt`, `chosen` and `rejected`",
}


def load_rows(spec, kind: str, key: Optional[str] = None, streaming: Optional[bool] = None):
    """Rows of `data.<kind>` (a DatasetConfig or one of its SourceConfigs): a Dataset, or an
    IterableDataset when streaming (default: `spec.streaming`), with `spec.columns` renamed to
    the stage's. UserError (one line, naming `key`, by default `data.<kind>.path`) on anything
    unusable."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    key = key or f"data.{kind}.path"
    path = str(spec.path)
    streaming = getattr(spec, "streaming", False) if streaming is None else streaming
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parsers log errors we re-raise as one line
    try:
        if is_saved_dataset(Path(path)):
            state = Path(path, datasets.config.DATASET_STATE_JSON_FILENAME)
            if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                raise _empty(key, path)  # datasets 5.2 cannot even load a saved dataset of 0 rows
            rows = datasets.load_from_disk(path)
            if isinstance(rows, DatasetDict):
                if spec.split not in rows:
                    raise UserError(
                        f"{key}={path} has splits {', '.join(rows)}, not '{spec.split}': "
                        f"set data.{kind}.split to one of them"
                    )
                rows = rows[spec.split]
            if streaming:
                rows = rows.to_iterable_dataset()
        else:
            builder, files = data_files_of(path, key, kind)
            rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming,
                                         **({"sample_by": "document"} if builder == "text" else {}))
        if spec.max_samples is not None:
            rows = rows.take(spec.max_samples) if streaming else rows.select(range(min(spec.max_samples, len(rows))))
        # A stream is only read here, so its parse errors surface here too.
        if next(iter(rows.take(1)), None) is None if streaming else len(rows) == 0:
            raise _empty(key, path)
        columns = column_names(rows)
    except UserError:
        raise
    except StopIteration as err:  # the json builder's way of saying "no rows at all"
        raise _empty(key, path) from err
    except Exception as err:  # malformed json, unreadable parquet, ...: name the file, keep one line
        cause = err.__cause__ or err  # datasets wraps the parser's error in a generic one
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"could not read {key}={path}: {first}: fix or replace the file") from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    columns_key = key.rsplit(".", 1)[0] + ".columns"
    mapping = dict(getattr(spec, "columns", None) or {})
    if mapping:
        check_column_mapping(columns, mapping, key, path, columns_key)
        rows = rows.rename_columns(mapping)
        columns = column_names(rows)
    check_columns(columns, kind, key, path, columns_key)
    check_rows(rows, ROW_SCHEMAS[kind], f"{key}={path}")
    return rows


def source_kind(kind: str, source) -> str:
    """The kind a source of `data.<kind>` is read as: its own, or for `data.mixed` its format's."""
    return FORMAT_KINDS.get(getattr(source, "format", None), kind) if kind == "mixed" else kind


def check_column_mapping(columns: List[str], mapping: Dict[str, str], key: str, path: str, columns_key: str) -> None:
    """`data.<kind>.columns` may rename only columns the source has."""
    unknown = [c for c in mapping if c not in columns]
    if unknown:
        raise UserError(
            f"{columns_key} renames '{unknown[0]}', but {key}={path} has columns [{', '.join(columns)}]: "
            f"fix the mapping in {columns_key}"
        )


# ---------------------------------------------------------------------------------------------
# row values: the first rows of every source are checked for types, not only for columns
# ---------------------------------------------------------------------------------------------
ROWS_CHECKED = 200
"""How many leading rows of each source `check_rows` reads: cheap, and a wrongly exported
file is almost always wrong from its first row."""
ROLES = ("system", "user", "assistant", "tool")


def text_value(value) -> Optional[str]:
    """None if `value` is a string (or null: a blank row is dropped and counted), else why not."""
    if value is None or isinstance(value, str):
        return None
    return f"is a {type(value).__name__} ({str(value)[:40]}), expected a string"


def chat_value(value) -> Optional[str]:
    """None if `value` is a list of {role, content} turns with known roles and string content."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        return f"is a {type(value).__name__} ({str(value)[:40]}), expected a non-empty list of {{role, content}} turns"
    for j, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return f"turn {j} is {str(turn)[:60]}, expected {{role, content}} with string content"
        if turn.get("role") not in ROLES:
            return f"turn {j} has role {turn.get('role')!r}, expected one of {', '.join(ROLES)}"
    return None


def text_or_chat_value(value) -> Optional[str]:
    return chat_value(value) if isinstance(value, list) else text_value(value)


def number_value(value) -> Optional[str]:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    return f"is a {type(value).__name__} ({str(value)[:40]}), expected a number"


# field -> value check, per kind of data; a field absent from the source is the column check's job
ROW_SCHEMAS = {
    "cpt": {"text": text_value},
    "sft": {"messages": chat_value, "prompt": text_or_chat_value, "completion": text_or_chat_value},
    "preference": {"prompt": text_or_chat_value, "chosen": text_or_chat_value, "rejected": text_or_chat_value},
}


def check_rows(rows, schema: Dict[str, Callable[[object], Optional[str]]], source_name: str, limit: int = ROWS_CHECKED) -> int:
    """Check the values of the first `limit` rows (a Dataset, IterableDataset or list of
    dicts) against `schema` ({field: check}); UserError naming the source, the row and the
    field. Returns how many rows were checked."""
    checked = 0
    for index, row in enumerate(itertools.islice(iter(rows), limit)):
        for name, check in schema.items():
            problem = check(row[name]) if name in row else None
            if problem:
                raise UserError(f"{source_name}: row {index}, field '{name}' {problem}: fix or drop that row")
        checked += 1
    return checked


def report_dropped(source_name: str, total: int, dropped: int, why: str) -> None:
    """One line on rank 0 when rows were dropped, so a silently shrinking dataset is seen."""
    if dropped and os.environ.get("RANK", "0") == "0":
        print(f"data: {source_name}: dropped {dropped} of {total} rows ({why})", flush=True)


def _empty(key: str, path: str) -> UserError:
    return UserError(f"{key}={path} is empty (no rows): point it at a dataset with rows")


def column_names(rows) -> List[str]:
    if rows.column_names is not None:
        return list(rows.column_names)
    return list(next(iter(rows), {}).keys())  # a stream may only know its columns once read


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
        or (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file()
    )


def data_files_of(path: str, key: str, kind: str) -> Tuple[str, List[str]]:
    """The `datasets` builder name and the sorted files behind a file, glob or directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            str(f) for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in BUILDERS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)  # .ipynb_checkpoints etc.
        )
        if not files:
            raise UserError(
                f"{key}={path} is a directory without data files ({', '.join(sorted(BUILDERS))}) "
                "or a saved HF dataset: point it at one"
            )
    elif any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise UserError(f"{key}={path} matches no files: fix the pattern")
    elif p.is_file():
        files = [path]
    else:
        raise UserError(f"{key}={path} does not exist: fix the path or set {key}=<file|glob|dir>")

    suffixes = sorted({Path(f).suffix.lower() for f in files})
    unknown = [s for s in suffixes if s not in BUILDERS]
    if unknown:
        raise UserError(
            f"{key}={path}: unsupported format '{unknown[0] or Path(files[0]).name}'; use .jsonl, .json, "
            ".parquet, .csv, .txt, a directory of those, or a saved HF dataset (save_to_disk)"
        )
    builders = sorted({BUILDERS[s] for s in suffixes})
    if len(builders) > 1:
        raise UserError(f"{key}={path} mixes formats ({', '.join(suffixes)}): keep one format per dataset")
    if builders[0] == "text" and kind != "cpt":
        raise UserError(
            f"{key}={path}: plain text has no {COLUMNS_NEEDED[kind]} columns; use jsonl or parquet for {kind} data"
        )
    return builders[0], files


def check_columns(columns: List[str], kind: str, key: str, path: str, columns_key: str) -> None:
    have = set(columns)
    ok = {
        "cpt": "text" in have,
        "sft": "messages" in have or {"prompt", "completion"} <= have,
        "preference": {"prompt", "chosen", "rejected"} <= have,
    }[kind]
    if not ok:
        raise UserError(
            f"{key}={path} has columns [{', '.join(columns)}] but {kind} data needs "
            f"{COLUMNS_NEEDED[kind]}: rename them with {columns_key}={{<column>: <stage column>}} or point {key} at the right dataset"
        )


# ---------------------------------------------------------------------------------------------
# chats: a row's turns, held to the same rule on every row
# ---------------------------------------------------------------------------------------------
def to_messages(row: dict) -> Optional[List[dict]]:
    """A row's chat: `messages` as is; `prompt` + `completion` as user/assistant turns (or as
    two message lists, when they already are conversational). None if the row has neither."""
    if row.get("messages") is not None:
        return list(row["messages"])
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is None or completion is None:
        return None
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return prompt + completion


def check_messages(messages, where: str) -> None:
    """Every row, past the ones check_rows read: the same rule."""
    problem = chat_value(messages) if messages is not None else "has no chat (messages, or prompt + completion)"
    if problem:
        raise UserError(f"{where}: the chat {problem}: fix or drop that row")
