"""data.<kind>.path (one source) or data.<kind>.sources (a weighted mix), and the eval split.

Every source of a mix is mapped to its kind's one schema (CANONICAL_FEATURES) and tagged with
its index (SOURCE), so the shares of rows and tokens per source can be logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import datasets

from core.errors import UserError
from train.data import map_processes
from train.data.sources import FORMAT_KINDS, check_messages, column_names, load_rows, source_kind, to_messages

SOURCE = "__mix_source"  # index of the source a mixed row came from; dropped before training
MIX_STATS_ROWS = 2000  # a stream has no end to count to: its shares are measured on these first rows
MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
CANONICAL_FEATURES = {  # the one schema every source of a mix is mapped to, so they can be mixed
    "cpt": {"text": datasets.Value("string")},
    "sft": {"messages": MESSAGES},
    "preference": {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
    # one of text and messages is null per row; `subject` (a text source's column of that name, if
    # it has one) names what a document is about, so packing keeps one subject's documents apart
    "mixed": {"text": datasets.Value("string"), "messages": MESSAGES, "subject": datasets.Value("string")},
}


@dataclass
class SplitRows:
    """Raw rows of one `data.<kind>`: what to train on, what to evaluate on, and the names of
    the mixed sources (empty for a single `path`)."""

    train: Any
    eval: Any = None
    names: List[str] = field(default_factory=list)


def plain_messages(messages) -> List[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def canonical_text(row: dict, index: int, key: str) -> dict:
    return {"text": row["text"]}


def canonical_chat(row: dict, index: int, key: str) -> dict:
    messages = to_messages(row)
    check_messages(messages, f"{key} row {index}")
    return {"messages": plain_messages(messages)}


def canonical_mixed_text(row: dict, index: int, key: str) -> dict:
    subject = row.get("subject")
    return {"text": row["text"], "messages": None, "subject": None if subject is None else str(subject)}


def canonical_mixed_chat(row: dict, index: int, key: str) -> dict:
    return {"text": None, **canonical_chat(row, index, key), "subject": None}


MIXED_CANONICAL = {"text": canonical_mixed_text, "chat": canonical_mixed_chat}
"""`data.mixed`: each source's rows mapped by its format; the other column is null."""


def source_canonical(kind: str, source, canonical: Callable) -> Callable:
    return MIXED_CANONICAL[source.format] if kind == "mixed" else canonical


def tag_row(row: dict, index: int, canonical: Callable, key: str, source: int) -> dict:
    return {**canonical(row, index, key), SOURCE: source}


def mix_mode(spec, kind: str) -> Tuple[str, List[float]]:
    """("weight", relative weights) or ("fraction", fractions) of `data.<kind>.sources`."""
    for i, source in enumerate(spec.sources):
        key = f"data.{kind}.sources[{i}]"
        if source.weight is not None and source.fraction is not None:
            raise UserError(f"{key} sets both weight and fraction: keep one")
    with_fraction = sum(s.fraction is not None for s in spec.sources)
    if with_fraction == 0:
        return "weight", [1.0 if s.weight is None else float(s.weight) for s in spec.sources]
    if with_fraction < len(spec.sources):
        raise UserError(
            f"data.{kind}.sources: {with_fraction} of {len(spec.sources)} sources set fraction: set fraction on "
            "every source (dataset_mixer: a share of each source's rows) or weight on every source (sampling weights)"
        )
    if spec.streaming:
        raise UserError(
            f"data.{kind}.sources[*].fraction needs each source's length, which a stream does not have: "
            f"use weight with data.{kind}.streaming=true"
        )
    return "fraction", [float(s.fraction) for s in spec.sources]


def source_names(spec) -> List[str]:
    """Each source's name in the logs: its `name`, else its file or folder name, made unique."""
    names = []
    for i, source in enumerate(spec.sources):
        name = source.name or Path(str(source.path).rstrip("/")).stem or f"source{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def check_data_spec(cfg, kind: str) -> None:
    """`data.<kind>` names its rows exactly one way, with consistent mix and eval options."""
    spec, where = cfg.data[kind], f"data.{kind}"
    has_path, has_sources = bool(spec.path), len(spec.sources) > 0
    if has_path == has_sources:
        raise UserError(
            f"{where}: set exactly one of {where}.path (one source) or {where}.sources (a weighted mix); "
            + ("both are set: drop one" if has_path else f"neither is set: e.g. {where}.path=<file|glob|dir>")
        )
    if has_sources:
        mix_mode(spec, kind)
    check_formats(spec, kind)
    if spec.eval_fraction is not None and spec.eval_path:
        raise UserError(f"{where}: set {where}.eval_fraction or {where}.eval_path, not both")
    if spec.eval_fraction is not None:
        if spec.streaming:
            raise UserError(
                f"{where}.eval_fraction needs the rows in memory: set {where}.eval_path to a held-out file "
                f"for a stream, or {where}.streaming=false"
            )
    if spec.streaming and cfg.training.max_steps <= 0:
        raise UserError(
            f"{where}.streaming=true needs training.max_steps>0 (a stream has no length): set training.max_steps"
        )
    if cfg.training.eval_steps <= 0:
        raise UserError(f"training.eval_steps={cfg.training.eval_steps}: evaluate every N>0 steps")
    if cfg.training.log_completions > 0:
        if spec.eval_fraction is None and not spec.eval_path:
            raise UserError(
                f"training.log_completions={cfg.training.log_completions} samples from the eval split: "
                f"set {where}.eval_fraction or {where}.eval_path"
            )
        if cfg.logging.backend != "wandb":
            raise UserError(
                f"training.log_completions={cfg.training.log_completions} logs a W&B table: set logging=wandb"
            )


def check_formats(spec, kind: str) -> None:
    """`data.mixed` is a mix whose every source says its format; no other kind takes one."""
    formats = " or ".join(f"format={f}" for f in FORMAT_KINDS)
    if kind == "mixed":
        if spec.path or spec.eval_path:
            key = "path" if spec.path else "eval_path"
            raise UserError(f"data.mixed.{key}: a mixed run reads data.mixed.sources, each with a format "
                            f"({formats}): list them there (conf/data/materials.yaml has an example)")
        for i, source in enumerate(spec.sources):
            if source.format is None:
                raise UserError(f"data.mixed.sources[{i}] has no format: set data.mixed.sources[{i}].format to "
                                "text (raw documents, loss on every token) or chat (loss on the answers)")
            if not source.path:
                raise UserError(f"data.mixed.sources[{i}].path is empty (the bundled presets' sources follow "
                                "data.cpt.path and data.sft.path): set those, or this source's path")
        check_general(spec)
        return
    if spec.general or spec.general_share:
        raise UserError(f"data.{kind}.general and general_share are for data.mixed (general replay) only: drop them")
    for i, source in enumerate(spec.sources):
        if source.format is not None:
            raise UserError(f"data.{kind}.sources[{i}].format={source.format}: format is for data.mixed sources "
                            f"only; drop it (data.{kind} is {kind} data)")


def check_general(spec) -> None:
    """`data.mixed.general_share` > 0 needs the general documents it replays."""
    if spec.general_share > 0 and not spec.general:
        raise UserError(f"data.mixed.general_share={spec.general_share} replays general documents, but "
                        "data.mixed.general is not set: point it at a file of them, or set general_share=0")


def load_mix(spec, kind: str, canonical: Callable, seed: int, num_proc: Optional[int] = None):
    """Every source of `data.<kind>.sources`, mapped to the stage's columns and tagged with its
    index in SOURCE, mixed by weight (interleave) or by fraction (sample, concatenate, shuffle)."""
    mode, values = mix_mode(spec, kind)
    features = datasets.Features({**CANONICAL_FEATURES[kind], SOURCE: datasets.Value("int32")})
    parts = []
    for i, source in enumerate(spec.sources):
        key = f"data.{kind}.sources[{i}]"
        rows = load_rows(source, source_kind(kind, source), key=f"{key}.path", streaming=spec.streaming)
        map_kwargs = dict(with_indices=True, remove_columns=column_names(rows), features=features,
                          fn_kwargs={"canonical": source_canonical(kind, source, canonical), "key": f"{key}.path",
                                     "source": i})
        if not spec.streaming:
            map_kwargs.update(num_proc=map_processes(len(rows), num_proc), desc=f"map {key} to {kind} columns")
        parts.append(rows.map(tag_row, **map_kwargs))

    if mode == "fraction":
        # alignment-handbook's dataset_mixer: a random `fraction` of each source's rows, then one
        # shuffled concatenation; every source's share of the rows is then exact.
        picked = []
        for i, (rows, fraction) in enumerate(zip(parts, values)):
            n = int(fraction * len(rows))
            if n == 0:
                raise UserError(
                    f"data.{kind}.sources[{i}].fraction={fraction} of {len(rows)} rows selects none: raise it"
                )
            picked.append(rows.shuffle(seed=seed).select(range(n)))
        return datasets.concatenate_datasets(picked).shuffle(seed=seed).flatten_indices()

    # first_exhausted (the default): the mix ends when its first source runs out, so within an
    # epoch no row repeats and the shares follow the weights to the end. all_exhausted would run
    # until the last source is used up: a large general set at a low weight would then repeat the
    # small domain set many times per epoch (length max(n_i / p_i) instead of min(n_i / p_i)).
    total = sum(values)
    return datasets.interleave_datasets(
        parts, probabilities=[v / total for v in values], seed=seed, stopping_strategy=spec.stopping_strategy
    )


def has_eval_split(spec) -> bool:
    """Whether `data.<kind>` (a DatasetConfig) holds out rows or names a file for evaluation."""
    return spec.eval_fraction is not None or bool(spec.eval_path)


def load_split_rows(cfg, kind: str, canonical: Callable) -> SplitRows:
    """`data.<kind>`'s rows (one source or a mix), less its eval split, and that eval split."""
    check_data_spec(cfg, kind)
    spec, seed = cfg.data[kind], cfg.training.seed
    if spec.path:
        rows, names = load_rows(spec, kind), []
    else:
        rows, names = load_mix(spec, kind, canonical, seed, cfg.data.num_proc), source_names(spec)
        if spec.max_samples is not None:
            rows = rows.take(spec.max_samples) if spec.streaming else rows.select(range(min(spec.max_samples, len(rows))))
    eval_rows = None
    if spec.eval_fraction is not None:
        if len(rows) < 2:
            raise UserError(f"data.{kind}.eval_fraction: {len(rows)} row cannot be split: add rows or drop eval_fraction")
        split = rows.train_test_split(test_size=spec.eval_fraction, seed=seed)
        rows, eval_rows = split["train"], split["test"]
        if SOURCE in eval_rows.column_names:  # shares are reported for the training rows only
            eval_rows = eval_rows.remove_columns(SOURCE)
    elif spec.eval_path:
        eval_spec = DatasetSpec(path=spec.eval_path, split=spec.split, columns=spec.columns)
        eval_rows = load_rows(eval_spec, kind, key=f"data.{kind}.eval_path", streaming=False)
    return SplitRows(rows, eval_rows, names)


@dataclass
class DatasetSpec:
    """The fields of a DatasetConfig that load_rows reads, for sets the config names by path only."""

    path: str
    split: str = "train"
    columns: Dict[str, str] = field(default_factory=dict)
    max_samples: Optional[int] = None


def mix_shares(names: List[str], sources, tokens) -> Dict[str, float]:
    """Each source's share of the rows and of the tokens (arrays aligned row by row)."""
    import numpy as np

    sources, tokens = np.asarray(sources), np.asarray(tokens, dtype=np.int64)
    stats = {}
    for i, name in enumerate(names):
        mine = sources == i
        stats[f"mix/{name}/rows"] = float(mine.sum() / max(len(sources), 1))
        stats[f"mix/{name}/tokens"] = float(tokens[mine].sum() / max(tokens.sum(), 1))
    return stats


def report_mix(kind: str, names: List[str], stats: Dict[str, float], rows: int, streaming: bool) -> None:
    if not names or int(os.environ.get("RANK", "0")) != 0:
        return
    where = f"the first {rows} rows of the stream" if streaming else f"{rows} rows"
    shares = "; ".join(
        f"{n} {stats[f'mix/{n}/rows']:.1%} of rows, {stats[f'mix/{n}/tokens']:.1%} of tokens" for n in names
    )
    print(f"{kind} data mix over {where}: {shares}", flush=True)


def shares_of_stream(names: List[str], stream, length: Callable[[dict], int]) -> Tuple[Dict[str, float], int]:
    """mix_shares over the first MIX_STATS_ROWS rows of a tokenized, tagged stream."""
    head = list(stream.take(MIX_STATS_ROWS))
    return mix_shares(names, [r[SOURCE] for r in head], [length(r) for r in head]), len(head)


def completion_prompts(rows, kind: str, n: int) -> list:
    """The first n eval prompts for logged completions: the start of a document (CPT) or the
    turns before the first assistant turn (SFT; preference.py takes the pairs' prompts)."""
    prompts = []
    for row in rows.select(range(min(n, len(rows)))):
        if kind == "cpt":
            prompts.append(" ".join(str(row["text"]).split()[:32]))
        else:
            messages = to_messages(row)
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
            prompts.append(plain_messages(messages[:first]))
    return prompts


def data_where(spec, kind: str) -> str:
    """`data.<kind>` as its messages name it: the path, or its sources."""
    return f"data.{kind}.path={spec.path}" if spec.path else f"data.{kind}.sources"
