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
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

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
def load_rows(spec, kind: str, key: Optional[str] = None):
    """Rows of `data.<kind>` (a DatasetConfig): a Dataset, or an IterableDataset when
    `spec.streaming`. UserError (one line, naming `key`, by default `data.<kind>.path`) on
    anything unusable."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    key = key or f"data.{kind}.path"
    path = str(spec.path)
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
            if spec.streaming:
                rows = rows.to_iterable_dataset()
        else:
            builder, files = _data_files(path, key, kind)
            rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=spec.streaming,
                                         **({"sample_by": "document"} if builder == "text" else {}))
        if spec.max_samples is not None:
            rows = rows.take(spec.max_samples) if spec.streaming else rows.select(range(min(spec.max_samples, len(rows))))
        # A stream is only read here, so its parse errors surface here too.
        if next(iter(rows.take(1)), None) is None if spec.streaming else len(rows) == 0:
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
    _check_columns(columns, kind, key, path)
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


def _check_columns(columns: List[str], kind: str, key: str, path: str) -> None:
    have = set(columns)
    ok = {
        "cpt": "text" in have,
        "sft": "messages" in have or {"prompt", "completion"} <= have,
        "preference": {"prompt", "chosen", "rejected"} <= have,
    }[kind]
    if not ok:
        raise UserError(
            f"{key}={path} has columns [{', '.join(columns)}] but {kind} data needs "
            f"{COLUMNS_NEEDED[kind]}: rename the columns or point {key} at the right dataset"
        )


def _require_max_steps(cfg, kind: str) -> None:
    if cfg.data[kind].streaming and cfg.training.max_steps <= 0:
        raise UserError(
            f"data.{kind}.streaming=true needs training.max_steps>0 (a stream has no length): set training.max_steps"
        )


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
    texts = [t for t in batch["text"] if isinstance(t, str) and t.strip()]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    return {"input_ids": [doc if doc and doc[-1] == eos else doc + [eos] for doc in ids]}


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


def _only_blank(spec) -> UserError:
    return UserError(f"data.cpt.path={spec.path} holds only empty `text`: point it at a corpus with text")


def prepare_cpt(cfg, tokenizer) -> PreparedData:
    spec, block_size = cfg.data.cpt, cfg.training.max_seq_length
    _require_max_steps(cfg, "cpt")
    rows = load_rows(spec, "cpt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    map_kwargs = dict(batched=True, remove_columns=column_names(rows), fn_kwargs={"tokenizer": tokenizer})

    if spec.streaming:
        # TRL's pack_dataset wraps each map batch on its own (a short block per batch); a
        # generator that carries the remainder keeps every block but the last one full.
        documents = rows.map(tokenize_documents, **map_kwargs)
        blocks = IterableDataset.from_generator(
            _stream_blocks, gen_kwargs={"documents": documents, "block_size": block_size, "pad_id": pad_id}
        )
        if next(iter(blocks.take(1)), None) is None:
            raise _only_blank(spec)
        return PreparedData(train_dataset=blocks, data_collator=collator, stats={"block_size": block_size})

    documents = rows.map(tokenize_documents, num_proc=cfg.data.num_proc, desc="tokenize cpt", **map_kwargs)
    if len(documents) == 0:
        raise _only_blank(spec)
    report_dropped(f"data.cpt.path={spec.path}", len(rows), len(rows) - len(documents), "blank or null `text`")
    num_tokens = int(list_lengths(documents, "input_ids").sum())
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
    }
    return PreparedData(train_dataset=blocks, data_collator=collator, stats=stats)


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
    return out


def _has_loss_tokens(row: dict) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"])


def prepare_sft(cfg, tokenizer) -> PreparedData:
    spec, max_length = cfg.data.sft, cfg.training.max_seq_length
    key = "data.sft.path"
    packing = bool(cfg.stage.packing)
    if packing and spec.streaming:
        raise UserError("stage.packing=true needs the whole SFT set in memory: set data.sft.streaming=false")
    _require_max_steps(cfg, "sft")
    rows = load_rows(spec, "sft")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    map_kwargs = dict(
        batched=True,
        with_indices=True,
        remove_columns=column_names(rows),
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                   "assistant_only": bool(cfg.stage.assistant_only_loss), "key": key},
    )
    if spec.streaming:
        chats = rows.map(tokenize_chats, **map_kwargs).filter(_has_loss_tokens).remove_columns("truncated")
        return PreparedData(chats, DataCollatorForLanguageModeling(pad_token_id=pad_id), {})

    chats = rows.map(tokenize_chats, num_proc=cfg.data.num_proc, desc="tokenize sft", **map_kwargs)
    truncated_rows = count_not_equal(chats, "truncated", False)
    chats = chats.remove_columns("truncated")
    kept = chats.filter(_has_loss_tokens, num_proc=cfg.data.num_proc, desc="drop rows without loss tokens")
    if len(kept) == 0:
        raise UserError(
            f"{key}={spec.path}: no row has an assistant turn within training.max_seq_length={max_length}: "
            "add assistant turns or raise training.max_seq_length"
        )
    report_dropped(f"{key}={spec.path}", len(chats), len(chats) - len(kept),
                   f"no assistant token within training.max_seq_length={max_length}")
    stats = {
        "num_examples": len(kept),
        "dataset_tokens": int(list_lengths(kept, "input_ids").sum()),
        "loss_tokens": count_not_equal(kept, "labels", IGNORE_INDEX),
        "truncated_rows": truncated_rows,
        "dropped_rows": len(chats) - len(kept),
    }
    if not packing:
        return PreparedData(kept, DataCollatorForLanguageModeling(pad_token_id=pad_id), stats)

    # Best-fit-decreasing bins of whole examples; `seq_lengths` tells the collator where each
    # example starts, so position_ids restart there (the block-diagonal mask, see the docstring).
    packed = pack_dataset(kept, max_length, strategy="bfd")
    stats.update(num_rows=len(packed), packing_efficiency=stats["dataset_tokens"] / (len(packed) * max_length))
    return PreparedData(packed, DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True), stats)
