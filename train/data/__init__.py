"""Datasets for every stage: rows loaded and checked, mixed, then tokenized for one stage.

    sources.py     load a file, glob, directory or saved dataset; check its columns and rows
    mix.py         data.<kind>.path or a weighted mix of data.<kind>.sources; the eval split
    cpt.py         CPT: documents -> EOS-joined token stream -> fixed blocks
    chat.py        chats the chat template can render (a system turn folded in where it has none)
    sft.py         SFT: chats -> chat template -> assistant-only labels -> optional packing
    preference.py  DPO/ORPO: prompt/chosen/rejected pairs, rendered and truncated once

Each stage's hooks (train/stages/) call its `prepare_*` and get a PreparedData. This module
holds only what every kind shares; import the rest from the module that owns it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

IGNORE_INDEX = -100  # label value the loss skips

MAX_DATA_PROCESSES = 16
"""data.num_proc's default: the task's cores, at most this many (tokenizing gains little beyond)."""
ROWS_PER_PROCESS = 2000
"""A map process's fewest rows: below that, starting processes and copying the tokenizer into
them costs more than it saves (the bundled data, ~500 rows, tokenizes in-process)."""


def task_cores() -> int:
    """The cores this process may run on: SLURM's --cpus-per-task, taskset, a container's cpuset."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def map_processes(rows: int, num_proc: Optional[int]) -> Optional[int]:
    """`num_proc` for a datasets map over `rows` rows: data.num_proc (None: the task's cores, at
    most MAX_DATA_PROCESSES), with at least ROWS_PER_PROCESS rows a process; None (in-process) for one."""
    wanted = num_proc or min(task_cores(), MAX_DATA_PROCESSES)
    processes = min(wanted, rows // ROWS_PER_PROCESS)
    return processes if processes > 1 else None


@dataclass
class PreparedData:
    """What a stage trains on, ready for its trainer."""

    train_dataset: Any
    data_collator: Optional[Callable] = None
    stats: Dict[str, float] = field(default_factory=dict)
    """Logged once at the start (e.g. packing_efficiency, num_tokens, truncated_rows, and a
    mix's per-source shares mix/<name>/rows and mix/<name>/tokens)."""
    eval_dataset: Any = None
    """The eval split, prepared like train_dataset (same collator); None: no evaluation."""
    eval_prompts: List[Any] = field(default_factory=list)
    """Raw prompts of the first training.log_completions eval rows, for logged completions."""


def list_lengths(dataset, column: str):
    """Per-row lengths of a list column, computed in Arrow (the rows never become Python lists:
    on 5M tokens of SFT data that took 2.2 of 4.7 s, and its memory grows with the corpus)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[column]).to_numpy()


def count_not_equal(dataset, column: str, value) -> int:
    """How many values of a column (the elements, for a list column) differ from `value`, in Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = dataset.with_format("arrow")[column]
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = pc.list_flatten(values)
    return int(pc.sum(pc.not_equal(values, value)).as_py() or 0)
