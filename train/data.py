"""Datasets for every stage: load rows from disk, check them, tokenize, mask and pack.

Formats (`data.<kind>.path`): .jsonl/.json, .parquet, .csv, .txt, a glob or a directory of such
files (one format per directory), or a saved HF dataset directory (`Dataset.save_to_disk`).
A .txt file is ONE document (CPT only): EOS then marks real document ends, as in litgpt's
TextFiles; split a single huge dump into several files (or use jsonl) to stream it.

CPT: documents are tokenized (with the tokenizer's own BOS, if it adds one), each followed by
EOS, concatenated and cut into blocks of exactly `training.max_seq_length` tokens, labels =
input_ids. The last partial block is padded (labels -100) rather than dropped, so no text is
lost; `packing_efficiency` = real tokens / (blocks * max_seq_length) counts that padding.

SFT: `messages` (or `prompt` + `completion`, rendered as user/assistant) go through the
tokenizer's chat template and are truncated to `max_seq_length`. With
`stage.assistant_only_loss`, labels are -100 everywhere except the assistant turns (content and
end-of-turn token). With `stage.packing`, several examples share a row (TRL's best-fit-decreasing
`pack_dataset`) and TRL's padding-free collator restarts position_ids per example; transformers
5.23 turns restarting position_ids into a block-diagonal causal mask (masking_utils.
find_packed_sequence_indices; flash-attention uses cu_seq_lens), so no example attends to
another. That holds only with NO 2-D attention_mask and no KV cache (SFTTrainer passes
use_cache=False); tests/test_sft_packing.py proves it and shows the 2-D-mask variant leaks.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import datasets
from datasets import DatasetDict, IterableDataset
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from core.errors import UserError
from train.stages import PreparedData

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
KINDS = ("cpt", "sft", "preference")
COLUMNS_NEEDED = {
    "cpt": "`text`",
    "sft": "`messages` (chat turns) or `prompt` + `completion`",
    "preference": "`prompt`, `chosen` and `rejected`",
}
IGNORE_INDEX = -100  # label value the loss skips
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
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
        if _is_saved_dataset(Path(path)):
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
            builder, files = _data_files(path, key, kind)
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
        unknown = [c for c in mapping if c not in columns]
        if unknown:
            raise UserError(
                f"{columns_key} renames '{unknown[0]}', but {key}={path} has columns [{', '.join(columns)}]: "
                f"fix the mapping in {columns_key}"
            )
        rows = rows.rename_columns(mapping)
        columns = column_names(rows)
    _check_columns(columns, kind, key, path, columns_key)
    check_rows(rows, ROW_SCHEMAS[kind], f"{key}={path}")
    return rows


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


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
        or (path / datasets.config.DATASETDICT_JSON_FILENAME).is_file()
    )


def _data_files(path: str, key: str, kind: str) -> Tuple[str, List[str]]:
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


def _check_columns(columns: List[str], kind: str, key: str, path: str, columns_key: str) -> None:
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
# mixing and eval splits: data.<kind>.path (one source) or data.<kind>.sources (a weighted mix)
# ---------------------------------------------------------------------------------------------
SOURCE = "__mix_source"  # index of the source a mixed row came from; dropped before training
MIX_STATS_ROWS = 2000  # a stream has no end to count to: its shares are measured on these first rows
MESSAGES = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
CANONICAL_FEATURES = {  # the one schema every source of a mix is mapped to, so they can be mixed
    "cpt": {"text": datasets.Value("string")},
    "sft": {"messages": MESSAGES},
    "preference": {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
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
    _check_messages(messages, f"{key} row {index}")
    return {"messages": plain_messages(messages)}


def _tag_row(row: dict, index: int, canonical: Callable, key: str, source: int) -> dict:
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


def load_mix(spec, kind: str, canonical: Callable, seed: int, num_proc: Optional[int] = None):
    """Every source of `data.<kind>.sources`, mapped to the stage's columns and tagged with its
    index in SOURCE, mixed by weight (interleave) or by fraction (sample, concatenate, shuffle)."""
    mode, values = mix_mode(spec, kind)
    features = datasets.Features({**CANONICAL_FEATURES[kind], SOURCE: datasets.Value("int32")})
    parts = []
    for i, source in enumerate(spec.sources):
        key = f"data.{kind}.sources[{i}]"
        rows = load_rows(source, kind, key=f"{key}.path", streaming=spec.streaming)
        map_kwargs = dict(with_indices=True, remove_columns=column_names(rows), features=features,
                          fn_kwargs={"canonical": canonical, "key": f"{key}.path", "source": i})
        if not spec.streaming:
            map_kwargs.update(num_proc=num_proc, desc=f"map {key} to {kind} columns")
        parts.append(rows.map(_tag_row, **map_kwargs))

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


# ---------------------------------------------------------------------------------------------
# CPT: documents -> EOS-joined token stream -> fixed blocks
# ---------------------------------------------------------------------------------------------
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


def tokenize_documents(batch: Dict[str, list], tokenizer) -> Dict[str, list]:
    """{"text": [str]} -> {"input_ids": [[int]]}, each document followed by EOS; blank documents
    are dropped (they would only add EOS tokens)."""
    eos = tokenizer.eos_token_id
    keep = [i for i, t in enumerate(batch["text"]) if isinstance(t, str) and t.strip()]
    ids = tokenizer([batch["text"][i] for i in keep], add_special_tokens=True)["input_ids"] if keep else []
    out = {"input_ids": [doc if doc and doc[-1] == eos else doc + [eos] for doc in ids]}
    if SOURCE in batch:  # a mixed row keeps its source's index
        out[SOURCE] = [batch[SOURCE][i] for i in keep]
    return out


def pad_block(block: List[int], block_size: int, pad_id: int) -> Dict[str, List[int]]:
    """One training row of exactly block_size tokens; padding gets label -100."""
    pad = block_size - len(block)
    return {"input_ids": block + [pad_id] * pad, "labels": block + [IGNORE_INDEX] * pad}


def iter_blocks(token_lists, block_size: int, pad_id: int) -> Iterator[Dict[str, List[int]]]:
    """Stream packing: concatenate token lists and cut them into block_size rows, carrying the
    remainder across input batches; only the very last block is padded."""
    buffer: List[int] = []
    for ids in token_lists:
        buffer.extend(ids)
        while len(buffer) >= block_size:
            yield pad_block(buffer[:block_size], block_size, pad_id)
            del buffer[:block_size]
    if buffer:
        yield pad_block(buffer, block_size, pad_id)


def _stream_blocks(documents: IterableDataset, block_size: int, pad_id: int):
    yield from iter_blocks((row["input_ids"] for row in documents), block_size, pad_id)


def _only_blank(where: str) -> UserError:
    return UserError(f"{where} holds only empty `text`: point it at a corpus with text")


def _data_where(spec, kind: str) -> str:
    return f"data.{kind}.path={spec.path}" if spec.path else f"data.{kind}.sources"


def prepare_cpt(cfg, tokenizer) -> PreparedData:
    spec = cfg.data.cpt
    rows = load_split_rows(cfg, "cpt", canonical_text)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    train, stats = cpt_blocks(cfg, tokenizer, rows.train, rows.names, _data_where(spec, "cpt"), spec.streaming)
    data = PreparedData(train_dataset=train, data_collator=collator, stats=stats)
    if rows.eval is not None:
        data.eval_dataset, _ = cpt_blocks(cfg, tokenizer, rows.eval, [], f"data.cpt eval split", streaming=False)
        data.eval_prompts = completion_prompts(rows.eval, "cpt", cfg.training.log_completions)
    return data


def cpt_blocks(cfg, tokenizer, rows, names: List[str], where: str, streaming: bool):
    """Documents -> (blocks of max_seq_length tokens, stats); a mix's shares are in the stats."""
    block_size = cfg.training.max_seq_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    map_kwargs = dict(batched=True, remove_columns=column_names(rows), fn_kwargs={"tokenizer": tokenizer})

    if streaming:
        # TRL's pack_dataset wraps each map batch on its own (a short block per batch); a
        # generator that carries the remainder keeps every block but the last one full.
        documents = rows.map(tokenize_documents, **map_kwargs)
        stats = {"block_size": block_size}
        if names:
            shares, measured = shares_of_stream(names, documents, lambda r: len(r["input_ids"]))
            stats.update(shares)
            report_mix("cpt", names, shares, measured, streaming=True)
            documents = documents.remove_columns(SOURCE)
        blocks = IterableDataset.from_generator(
            _stream_blocks, gen_kwargs={"documents": documents, "block_size": block_size, "pad_id": pad_id}
        )
        if next(iter(blocks.take(1)), None) is None:
            raise _only_blank(where)
        return blocks, stats

    documents = rows.map(tokenize_documents, num_proc=cfg.data.num_proc, desc="tokenize cpt", **map_kwargs)
    if len(documents) == 0:
        raise _only_blank(where)
    report_dropped(where, len(rows), len(rows) - len(documents), "blank or null `text`")
    lengths = list_lengths(documents, "input_ids")
    num_tokens = int(lengths.sum())
    shares = {}
    if names:
        shares = mix_shares(names, documents.with_format("arrow")[SOURCE].to_numpy(), lengths)
        report_mix("cpt", names, shares, len(documents), streaming=False)
        documents = documents.remove_columns(SOURCE)
    # TRL's "wrapped" packing is exactly EOS-joined fixed blocks; one map batch over the whole
    # dataset so only the final block can be short, then that block is padded.
    blocks = pack_dataset(documents, block_size, strategy="wrapped", map_kwargs={"batch_size": None})
    blocks = blocks.map(
        lambda row: pad_block(row["input_ids"], block_size, pad_id), desc="pad last cpt block"
    )
    num_blocks = len(blocks)
    stats = {
        "num_documents": len(documents),
        "dataset_tokens": num_tokens,  # not "num_tokens": TRL logs its running token count under that name
        "num_blocks": num_blocks,
        "packing_efficiency": num_tokens / (num_blocks * block_size),
        **shares,
    }
    return blocks, stats


# ---------------------------------------------------------------------------------------------
# SFT: chats -> chat template -> assistant-only labels -> optional packing
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


def _render(tokenizer, messages: List[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: List[dict]) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered chat and the [start, end) character span of each assistant turn: its
    content and its end-of-turn token, never the template's text around them."""
    text = _render(tokenizer, messages)
    spans = _spans_by_prefix(tokenizer, messages, text)
    return text, spans if spans is not None else _spans_by_marker(tokenizer, messages, text)


def _spans_by_prefix(tokenizer, messages, text) -> Optional[List[Tuple[int, int]]]:
    """Render prefixes: a turn starts where the generation prompt ends and stops where the
    template's rendering of that turn stops (less trailing whitespace). None if the template
    renders earlier turns differently as the chat grows (e.g. Mistral's system prompt)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            return None
        spans.append((len(before), len(through.rstrip())))
    return spans


ASSISTANT_MARKER = "\u2063ASSISTANT{}\u2063"  # invisible separator: never in real chat text


def _spans_by_marker(tokenizer, messages, text) -> List[Tuple[int, int]]:
    """Render the chat once with each assistant content replaced by a marker; the template text
    between markers must appear verbatim in the real rendering, which pins each content down.
    The end-of-turn token counts when the template puts eos_token right after the content."""
    marked = [
        dict(m, content=ASSISTANT_MARKER.format(i)) if m["role"] == "assistant" else m for i, m in enumerate(messages)
    ]
    pieces = re.split("\u2063ASSISTANT\\d+\u2063", _render(tokenizer, marked))
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    fail = UserError(
        "the chat template does not render assistant turns verbatim, so their tokens cannot be located: "
        "set stage.assistant_only_loss=false or use a template with {% generation %} tags"
    )
    if len(pieces) != n_assistant + 1 or not text.startswith(pieces[0]):
        raise fail
    spans, pos = [], len(pieces[0])
    for k, after in enumerate(pieces[1:]):
        last = k == n_assistant - 1
        end = len(text) - len(after) if last else text.find(after, pos)
        if end < pos or (last and not text.endswith(after)):
            raise fail
        eos = tokenizer.eos_token or ""
        spans.append((pos, end + (len(eos) if eos and after.startswith(eos) else 0)))
        pos = end + len(after)
    return spans


def tokenize_chat(tokenizer, messages: List[dict], assistant_only: bool) -> Tuple[List[int], List[int]]:
    """input_ids and labels of one chat (labels -100 outside assistant turns if assistant_only)."""
    if not assistant_only:
        ids = tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        return ids, list(ids)
    if GENERATION_TAG.search(tokenizer.chat_template or ""):
        # The template marks assistant tokens itself: use transformers' own mask.
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), enc["assistant_masks"]
    else:
        # No {% generation %} (e.g. SmolLM2's ChatML): map character spans to tokens by offsets.
        if not tokenizer.is_fast:
            raise UserError("assistant_only_loss needs a fast tokenizer or a chat template with {% generation %} tags")
        text, spans = assistant_char_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        # Overlap, not containment: BPE may fuse the template's space with the first word (" The").
        mask = [any(start < e and end > s for s, e in spans) for start, end in enc["offset_mapping"]]
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def _check_messages(messages, where: str) -> None:
    """Every row, past the ones check_rows read: the same rule."""
    problem = chat_value(messages) if messages is not None else "has no chat (messages, or prompt + completion)"
    if problem:
        raise UserError(f"{where}: the chat {problem}: fix or drop that row")


def tokenize_chats(batch: Dict[str, list], indices: List[int], tokenizer, max_length: int,
                   assistant_only: bool, key: str) -> Dict[str, list]:
    """Batched map: chat rows -> input_ids, labels, truncated (bool) per row."""
    out: Dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    columns = list(batch)
    for j, index in enumerate(indices):
        messages = to_messages({c: batch[c][j] for c in columns})
        _check_messages(messages, f"{key} row {index}")
        ids, labels = tokenize_chat(tokenizer, messages, assistant_only)
        out["input_ids"].append(ids[:max_length])
        out["labels"].append(labels[:max_length])
        out["truncated"].append(len(ids) > max_length)
    if SOURCE in batch:  # a mixed row keeps its source's index
        out[SOURCE] = list(batch[SOURCE])
    return out


def _has_loss_tokens(row: dict) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"])


def prepare_sft(cfg, tokenizer) -> PreparedData:
    spec = cfg.data.sft
    if cfg.stage.packing and spec.streaming:
        raise UserError("stage.packing=true needs the whole SFT set in memory: set data.sft.streaming=false")
    rows = load_split_rows(cfg, "sft", canonical_chat)
    where = _data_where(spec, "sft")
    data = sft_examples(cfg, tokenizer, rows.train, rows.names, "data.sft.path" if spec.path else where, where,
                        spec.streaming)
    if rows.eval is not None:
        key = "data.sft.eval_path" if spec.eval_path else "data.sft eval split"
        evaluation = sft_examples(cfg, tokenizer, rows.eval, [], key, key, streaming=False)
        data.eval_dataset = evaluation.train_dataset
        data.eval_prompts = completion_prompts(rows.eval, "sft", cfg.training.log_completions)
    return data


def sft_examples(cfg, tokenizer, rows, names: List[str], key: str, where: str, streaming: bool) -> PreparedData:
    """Chats -> tokenized (optionally packed) examples, their collator and stats."""
    max_length, packing = cfg.training.max_seq_length, bool(cfg.stage.packing)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    map_kwargs = dict(
        batched=True,
        with_indices=True,
        remove_columns=column_names(rows),
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                   "assistant_only": bool(cfg.stage.assistant_only_loss), "key": key},
    )
    if streaming:
        chats = rows.map(tokenize_chats, **map_kwargs).filter(_has_loss_tokens).remove_columns("truncated")
        stats = {}
        if names:
            stats, measured = shares_of_stream(names, chats, lambda r: len(r["input_ids"]))
            report_mix("sft", names, stats, measured, streaming=True)
            chats = chats.remove_columns(SOURCE)
        return PreparedData(chats, DataCollatorForLanguageModeling(pad_token_id=pad_id), stats)

    chats = rows.map(tokenize_chats, num_proc=cfg.data.num_proc, desc="tokenize sft", **map_kwargs)
    truncated_rows = count_not_equal(chats, "truncated", False)
    chats = chats.remove_columns("truncated")
    kept = chats.filter(_has_loss_tokens, num_proc=cfg.data.num_proc, desc="drop rows without loss tokens")
    if len(kept) == 0:
        raise UserError(
            f"{where}: no row has an assistant turn within training.max_seq_length={max_length}: "
            "add assistant turns or raise training.max_seq_length"
        )
    report_dropped(where, len(chats), len(chats) - len(kept),
                   f"no assistant token within training.max_seq_length={max_length}")
    lengths = list_lengths(kept, "input_ids")
    stats = {
        "num_examples": len(kept),
        "dataset_tokens": int(lengths.sum()),
        "loss_tokens": count_not_equal(kept, "labels", IGNORE_INDEX),
        "truncated_rows": truncated_rows,
        "dropped_rows": len(chats) - len(kept),
    }
    if names:
        shares = mix_shares(names, kept.with_format("arrow")[SOURCE].to_numpy(), lengths)
        report_mix("sft", names, shares, len(kept), streaming=False)
        stats.update(shares)
        kept = kept.remove_columns(SOURCE)
    if not packing:
        return PreparedData(kept, DataCollatorForLanguageModeling(pad_token_id=pad_id), stats)

    # Best-fit-decreasing bins of whole examples; `seq_lengths` tells the collator where each
    # example starts, so position_ids restart there (the block-diagonal mask, see the docstring).
    packed = pack_dataset(kept, max_length, strategy="bfd")
    stats.update(num_rows=len(packed), packing_efficiency=stats["dataset_tokens"] / (len(packed) * max_length))
    return PreparedData(packed, DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True), stats)
