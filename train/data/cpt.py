"""CPT data: documents are tokenized (with the tokenizer's own BOS, if it adds one), each
followed by EOS, concatenated and cut into blocks of exactly `training.max_seq_length` tokens,
labels = input_ids. The last partial block is padded (labels -100) rather than dropped, so no text
is lost; `packing_efficiency` = real tokens / (blocks * max_seq_length) counts that padding.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from datasets import IterableDataset
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from core.errors import UserError
from train.data import IGNORE_INDEX, PreparedData, list_lengths, map_processes
from train.data.mix import (
    SOURCE, canonical_text, completion_prompts, data_where, load_split_rows, mix_shares, report_mix, shares_of_stream,
)
from train.data.sources import column_names, report_dropped


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


def prepare_cpt(cfg, tokenizer) -> PreparedData:
    spec = cfg.data.cpt
    rows = load_split_rows(cfg, "cpt", canonical_text)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    train, stats = cpt_blocks(cfg, tokenizer, rows.train, rows.names, data_where(spec, "cpt"), spec.streaming)
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

    documents = rows.map(tokenize_documents, num_proc=map_processes(len(rows), cfg.data.num_proc), desc="tokenize cpt",
                         **map_kwargs)
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
