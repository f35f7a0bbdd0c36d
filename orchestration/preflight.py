"""The pre-flight both runners make before any step runs or any job queues, and the plan a dry
run prints (`launch/pipeline.py --dry-run`, `launch/submit.py --dry-run`).

Checks: the data every training step reads (it exists, is readable, and its first rows have the
columns and types the stage needs: train/data/sources.py's rules, read without loading the
corpus). The plan: each step's kind, resources and dependencies, the data with its size, the
global batch, and upper bounds on GPU-hours and checkpoint disk:

    disk of a training step <= params x dtype bytes (the final model)
                               + save_total_limit x params x 16 bytes (each DeepSpeed checkpoint:
                                 fp32 master weights and two Adam moments, 12, plus 16-bit
                                 weights, 2, plus the 16-bit model saved beside it, 2)
                               + epochs x params x dtype bytes (training.keep_epoch_models)
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from core.errors import UserError
from orchestration.steps import Plan, Step
from train.config import derive_gradient_accumulation
from train.data.mix import check_general
from train.data.sources import (ROW_SCHEMAS, ROWS_CHECKED, check_column_mapping, check_columns, check_rows,
                                data_files_of, is_saved_dataset, source_kind)
from train.memory import params_in_model_dir, shape_of
from train.stages import STAGES

CHECKPOINT_BYTES_PER_PARAM = 16
"""fp32 master weights + Adam's two fp32 moments (12) + bf16 weights (2) + the 16-bit model of the checkpoint (2)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "auto": 2}
"""Bytes per parameter of a saved model by training.precision (auto: bf16 or fp16 on a GPU)."""
ROW_COUNT_MAX_BYTES = 256 * 2**20
"""Rows of a JSON-lines/CSV file are counted (a line scan) only below this size; parquet's are in its footer."""


@dataclass
class DataSource:
    step: str
    key: str
    path: str
    bytes: int
    rows: Optional[int]
    """None: too costly to count here (a large text file, a saved dataset)."""


# ---------------------------------------------------------------------------------------------
# data: each source's files, columns and first rows, without loading the corpus
# ---------------------------------------------------------------------------------------------
def step_data_specs(cfg) -> List[Tuple[str, object]]:
    """(key, spec) of every source a training step reads: data.<kind>.path or each of
    data.<kind>.sources, data.<kind>.eval_path, and data.mixed.general."""
    kind = STAGES[cfg.stage.name].data
    spec = cfg.data[kind]
    specs = [(f"data.{kind}.path", spec)] if spec.path else [
        (f"data.{kind}.sources[{i}].path", source) for i, source in enumerate(spec.sources)]
    if spec.eval_path:
        specs.append((f"data.{kind}.eval_path", _EvalSpec(spec.eval_path, spec.split, dict(spec.columns or {}))))
    if kind == "mixed" and spec.general_share > 0:
        check_general(spec)
        specs.append(("data.mixed.general", _EvalSpec(spec.general, "train", {}, format="text")))
    return specs


@dataclass
class _EvalSpec:
    """A source the config names by path only (an eval set, the general replay)."""

    path: str
    split: str
    columns: Dict[str, str]
    format: Optional[str] = None


def first_rows(builder: str, files: List[str]) -> Tuple[List[str], List[dict], Optional[int]]:
    """(columns, first rows, row count or None) of a data file list in one `datasets` builder format."""
    first = files[0]
    if builder == "text":
        return ["text"], [], len(files)  # one document per file
    if builder == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(first)
        batch = next(table.iter_batches(batch_size=ROWS_CHECKED), None)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        return table.schema_arrow.names, batch.to_pylist() if batch is not None else [], rows
    countable = sum(Path(f).stat().st_size for f in files) <= ROW_COUNT_MAX_BYTES
    if builder == "csv":
        with open(first, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(itertools.islice(reader, ROWS_CHECKED))
            columns = list(reader.fieldnames or [])
        return columns, rows, sum(max(0, _count_lines(f) - 1) for f in files) if countable else None
    with open(first) as f:
        head = f.read(1)
    if head == "[":  # one JSON array, not JSON lines
        rows = json.loads(Path(first).read_text())
        return list(rows[0]) if rows else [], rows[:ROWS_CHECKED], len(rows) if len(files) == 1 else None
    with open(first) as f:
        rows = [json.loads(line) for line in itertools.islice((ln for ln in f if ln.strip()), ROWS_CHECKED)]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return columns, rows, sum(_count_lines(f) for f in files) if countable else None


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def saved_dataset_rows(path: Path, split: str) -> Tuple[List[str], List[dict], Optional[int]]:
    """(columns, first rows, rows) of a `save_to_disk` directory, read from its Arrow files."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        path = path / (split if split in splits else splits[0])  # a wrong split: the real run's message names it
    state = json.loads((path / "state.json").read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])]
    if not files:
        return [], [], 0
    with pa.memory_map(str(files[0])) as source:
        table = pa.ipc.open_stream(source).read_all()
    return table.column_names, table.slice(0, ROWS_CHECKED).to_pylist(), table.num_rows if len(files) == 1 else None


def check_source(step: str, key: str, spec, kind: str) -> DataSource:
    """One source, held to the rules load_rows applies when the step runs; one line on a failure."""
    path = str(spec.path)
    p = Path(path)
    columns_key = key.rsplit(".", 1)[0] + ".columns"
    try:
        if is_saved_dataset(p):
            columns, rows, count = saved_dataset_rows(p, spec.split)
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            builder, files = data_files_of(path, key, kind)
            columns, rows, count = first_rows(builder, files)
            size = sum(Path(f).stat().st_size for f in files)
    except UserError:
        raise
    except Exception as err:  # unreadable, malformed: one line naming the file, as the real run does
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not read {key}={path}: {first}: fix or replace the file") from err
    if count == 0:
        raise UserError(f"{key}={path} is empty (no rows): point it at a dataset with rows")
    mapping = dict(getattr(spec, "columns", None) or {})
    if mapping:
        check_column_mapping(columns, mapping, key, path, columns_key)
        columns = [mapping.get(c, c) for c in columns]
        rows = [{mapping.get(k, k): v for k, v in row.items()} for row in rows]
    check_columns(columns, kind, key, path, columns_key)
    check_rows(rows, ROW_SCHEMAS[kind], f"{key}={path}")
    return DataSource(step, key, path, size, count)


def check_data(plan: Plan, steps: List[Step]) -> List[DataSource]:
    """Every data source of the training steps that will run; sources an earlier step of the plan
    writes (an augmented corpus) are checked when that step has run."""
    produced = [s.output_dir for s in plan.steps]
    found = []
    for step in steps:
        if step.kind != "train" or step.is_complete():
            continue
        kind = STAGES[step.config.stage.name].data
        for key, spec in step_data_specs(step.config):
            if any(Path(spec.path) == out or out in Path(spec.path).parents for out in produced):
                continue
            try:
                found.append(check_source(step.name, key, spec, source_kind(kind, spec)))
            except UserError as err:
                raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err
    return found


# ---------------------------------------------------------------------------------------------
# model size, batch, disk
# ---------------------------------------------------------------------------------------------
def step_params(step: Step, known: Dict[str, int]) -> Optional[int]:
    """A training step's parameter count: its start model's (a directory, or the step that makes
    it), or the preset's architecture for random init. None when unknown."""
    if step.input_dir is not None:
        if step.input_dir in known:
            return known[step.input_dir]
        return params_in_model_dir(Path(step.input_dir))
    arch = step.config.model.arch
    return shape_of(dict(arch), f"model.arch of step '{step.name}'").params if arch else None


def checkpoint_disk(cfg, params: int) -> Optional[int]:
    """Upper bound on a training step's disk (the formula in this module's docstring); None: no
    save_total_limit, so the checkpoints are unbounded."""
    training = cfg.training
    if training.save_total_limit is None:
        return None
    model = params * DTYPE_BYTES[training.precision]
    epochs = math.ceil(training.num_train_epochs) if training.keep_epoch_models else 0
    return model * (1 + epochs) + training.save_total_limit * params * CHECKPOINT_BYTES_PER_PARAM


def global_batch(cfg, world_size: int) -> str:
    """per-device batch x gradient accumulation (as the run derives it) x ranks, and the
    global batch the config asks for where it sets one."""
    training = cfg.training
    per_device, accumulation = training.per_device_train_batch_size, derive_gradient_accumulation(training, world_size)
    text = f"{per_device} x {accumulation} x {world_size} = {per_device * accumulation * world_size}"
    return text + (f" (training.global_batch_size={training.global_batch_size})" if training.global_batch_size else "")


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unbounded"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


# ---------------------------------------------------------------------------------------------
# the plan a dry run prints
# ---------------------------------------------------------------------------------------------
def print_plan(plan: Plan, steps: List[Step], sources: List[DataSource], ranks: Dict[str, int], out) -> None:
    """Dependencies, data, batch and disk of each step, as `#` comments (a submit dry run's
    output stays a valid script)."""
    print(f"\n# plan of pipeline {plan.pipeline} -> {plan.run_dir}", file=out)
    for step in steps:
        after = f" after {', '.join(step.depends_on)}" if step.depends_on else ""
        print(f"#   {step.name} ({step.stage or step.kind}){after}", file=out)
    print("# data (rows: ? where counting would read the whole corpus)", file=out)
    for s in sources:
        rows = "?" if s.rows is None else f"{s.rows:,}"
        print(f"#   {s.step}: {s.key}={s.path}  {human_bytes(s.bytes)}, {rows} rows", file=out)
    print_training_bounds(steps, ranks, out)


def print_training_bounds(steps: List[Step], ranks: Dict[str, int], out) -> None:
    print("# training: global batch = per-device x accumulation x ranks; disk <= params x dtype bytes "
          f"+ save_total_limit x params x {CHECKPOINT_BYTES_PER_PARAM} B (+ kept epoch models)", file=out)
    known: Dict[str, int] = {}
    total: Optional[int] = 0
    for step in steps:
        if step.kind != "train":
            continue
        params = step_params(step, known)
        if params is not None:
            known[str(step.output_dir)] = params
        disk = None if params is None else checkpoint_disk(step.config, params)
        total = None if disk is None or total is None else total + disk
        size = "? params" if params is None else f"{params / 1e6:,.1f}M params"
        print(f"#   {step.name}: batch {global_batch(step.config, ranks[step.name])}; {size}; "
              f"disk <= {human_bytes(disk)}", file=out)
    print(f"# checkpoint disk of the training steps: at most {human_bytes(total)}", file=out)
