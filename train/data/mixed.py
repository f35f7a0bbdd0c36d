"""Mixed data: raw text (loss on every token) and chat Q&A (loss on the answers) in one run, in
the proportions `data.mixed.sources` sets (weights or fractions, train/data/mix.py).

Every example keeps its kind, token by token, in LOSS_KIND (TEXT or CHAT), through packing and
the collator, so the trainer can report each kind's loss (train/stages/mixed.py). A document
longer than `max_seq_length` is cut into chunks of that length (each chunk one example); a chat
is truncated as SFT truncates it. With `stage.packing` (the default) examples share rows by best
fit and attend only to themselves (position_ids restart per example, as SFT packing does:
train/data/sft.py), so a document never sees another document or a Q&A in its context.

Documents with a `subject` (fact renderings: data/make_materials.py's facts_*.jsonl) are packed
by subject: no row holds two documents about one subject, since a model that can copy a fact from
a neighbouring rendering learns to copy instead of storing it (the Physics of LMs 3.1 replication,
github.com/ykrmm/PhysicsLLM_3.1: 7% against 97%). Their order is then re-drawn for every epoch: a
run of `training.num_train_epochs=E` packs E differently shuffled copies and trains one pass over
them, so each document is seen E times, each time beside other documents.

`data.mixed.general` with `general_share` replays general documents beside every source (each
source brings its own, drawn by seed and the source's name), so that each step holds that share of
general tokens and schedules of the same sources in another order train on the same tokens.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import pad

from core.errors import UserError
from train.data import IGNORE_INDEX, PreparedData, count_not_equal, list_lengths, map_processes
from train.data.chat import fold_system_turn
from train.data.mix import (
    CANONICAL_FEATURES, MIXED_CANONICAL, SOURCE, DatasetSpec, completion_prompts, load_split_rows, mix_shares,
    report_mix, tag_row,
)
from train.data.sft import tokenize_chat
from train.data.sources import check_messages, load_rows, report_dropped

LOSS_KIND = "loss_kind"  # per token: the kind of example it belongs to; -1 on padding
SUBJECT = "subject"  # what a document is about (a text source's `subject` column); None: unknown
TEXT, CHAT = 0, 1
KIND_NAMES = {TEXT: "text", CHAT: "chat"}


def chunks(ids: List[int], size: int) -> List[List[int]]:
    return [ids[start:start + size] for start in range(0, len(ids), size)]


def tokenize_mixed(batch: Dict[str, list], indices: List[int], tokenizer, max_length: int,
                   assistant_only: bool, key: str) -> Dict[str, list]:
    """Batched map: mixed rows -> examples with input_ids, labels and LOSS_KIND (one per token).
    A text row becomes its document + EOS cut into max_length chunks (none if blank); a chat
    row one example, truncated."""
    out: Dict[str, list] = {"input_ids": [], "labels": [], LOSS_KIND: [], SOURCE: [], SUBJECT: [], "truncated": []}
    eos = tokenizer.eos_token_id
    for j, index in enumerate(indices):
        text = batch["text"][j]
        if text is not None:
            if not text.strip():
                continue
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            ids = ids if ids and ids[-1] == eos else ids + [eos]
            examples, kind, truncated = [(c, list(c)) for c in chunks(ids, max_length)], TEXT, False
        else:
            messages = [dict(m) for m in batch["messages"][j]]
            check_messages(messages, f"{key} row {index}")
            ids, labels = tokenize_chat(tokenizer, messages, assistant_only)
            examples, kind, truncated = [(ids[:max_length], labels[:max_length])], CHAT, len(ids) > max_length
        for ids, labels in examples:
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out[LOSS_KIND].append([kind] * len(ids))
            out[SOURCE].append(batch[SOURCE][j])
            out[SUBJECT].append(batch[SUBJECT][j])
            out["truncated"].append(truncated)
    return out


def _has_loss_tokens(row: dict) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"])


def kind_stats(examples) -> Dict[str, float]:
    """Each kind's examples, tokens and loss tokens (the tokens its loss is computed on), in Arrow."""
    import numpy as np
    import pyarrow.compute as pc

    table = examples.with_format("arrow")
    kinds = pc.list_element(table[LOSS_KIND], 0).to_numpy()
    labels = table["labels"]
    parents = pc.list_parent_indices(labels).to_numpy()
    trained = pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX).to_numpy(zero_copy_only=False)
    loss_tokens = np.bincount(parents[trained], minlength=len(kinds))
    lengths = list_lengths(examples, "input_ids")
    stats = {}
    for kind, name in KIND_NAMES.items():
        mine = kinds == kind
        stats[f"kind/{name}/examples"] = int(mine.sum())
        stats[f"kind/{name}/tokens"] = int(lengths[mine].sum())
        stats[f"kind/{name}/loss_tokens"] = int(loss_tokens[mine].sum())
    return stats


def report_kinds(stats: Dict[str, float]) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    total = max(sum(stats[f"kind/{n}/loss_tokens"] for n in KIND_NAMES.values()), 1)
    parts = "; ".join(
        f"{n} {stats[f'kind/{n}/examples']} examples, {stats[f'kind/{n}/tokens']} tokens, "
        f"{stats[f'kind/{n}/loss_tokens']} loss tokens ({stats[f'kind/{n}/loss_tokens'] / total:.1%})"
        for n in KIND_NAMES.values()
    )
    print(f"mixed data: {parts}", flush=True)


def prepare_mixed(cfg, tokenizer) -> PreparedData:
    spec = cfg.data.mixed
    if spec.streaming:
        raise UserError("data.mixed.streaming=true: a mixed run packs its examples in memory: "
                        "set data.mixed.streaming=false")
    rows = load_split_rows(cfg, "mixed", canonical=None)
    data = mixed_examples(cfg, tokenizer, rows.train, rows.names, "data.mixed.sources", packed_epochs(cfg))
    if rows.eval is not None:
        evaluation = mixed_examples(cfg, tokenizer, rows.eval.add_column(SOURCE, [0] * len(rows.eval)), [],
                                    "data.mixed eval split")
        data.eval_dataset = evaluation.train_dataset
        chats = rows.eval.filter(lambda r: r["messages"] is not None)
        prompts = completion_prompts(chats, "sft", cfg.training.log_completions)
        data.eval_prompts = [fold_system_turn(tokenizer, p) for p in prompts]
    return data


def mixed_examples(cfg, tokenizer, rows, names: List[str], where: str, epochs: int = 1) -> PreparedData:
    """Mixed rows -> examples (packed with `stage.packing`; by subject, `epochs` orders, when the
    documents have subjects), their collator and stats."""
    max_length = cfg.training.max_seq_length
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    num_proc = map_processes(len(rows), cfg.data.num_proc)
    examples = rows.map(
        tokenize_mixed, batched=True, with_indices=True, remove_columns=rows.column_names,
        num_proc=num_proc, desc="tokenize mixed",
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                   "assistant_only": bool(cfg.stage.assistant_only_loss), "key": where},
    )
    truncated_rows = count_not_equal(examples, "truncated", False)
    examples = examples.remove_columns("truncated")
    kept = examples.filter(_has_loss_tokens, num_proc=num_proc, desc="drop rows without loss tokens")
    if len(kept) == 0:
        raise UserError(f"{where}: no example has a token to train on within training.max_seq_length={max_length}: "
                        "check the sources' text and assistant turns")
    report_dropped(where, len(examples), len(examples) - len(kept), "blank text, or no assistant token within "
                   f"training.max_seq_length={max_length}")
    if names and cfg.data.mixed.general_share > 0:
        kept = with_general_replay(cfg, tokenizer, kept, names)
        names = [*names, GENERAL]
    lengths = list_lengths(kept, "input_ids")
    stats = {"num_examples": len(kept), "dataset_tokens": int(lengths.sum()),
             "loss_tokens": count_not_equal(kept, "labels", IGNORE_INDEX), "truncated_rows": truncated_rows,
             **kind_stats(kept)}
    report_kinds(stats)
    if names:
        shares = mix_shares(names, kept.with_format("arrow")[SOURCE].to_numpy(), lengths)
        report_mix("mixed", names, shares, len(kept), streaming=False)
        stats.update(shares)
    kept = kept.remove_columns(SOURCE)
    subjects = list(kept[SUBJECT])
    kept = kept.remove_columns(SUBJECT)
    if not cfg.stage.packing:
        return PreparedData(kept, KindCollator(pad_token_id=pad_id), stats)
    if any(s is not None for s in subjects):
        packed = pack_by_subject(kept, subjects, max_length, epochs, cfg.training.seed)
        stats.update(packed_epochs=epochs)
    else:
        packed = pack_dataset(kept, max_length, strategy="bfd")
    epochs = stats.get("packed_epochs", 1)
    stats.update(num_rows=len(packed),
                 packing_efficiency=epochs * stats["dataset_tokens"] / (len(packed) * max_length))
    return PreparedData(packed, KindCollator(pad_token_id=pad_id, padding_free=True), stats)


GENERAL = "general"
"""The name the general replay (data.mixed.general) goes by in the logged mix shares."""


def with_general_replay(cfg, tokenizer, kept, names: List[str]):
    """`kept` plus, for each source, general examples worth general_share of the source and its
    replay together (share / (1 - share) of the source's tokens). Each source draws them in its
    own order, seeded by training.seed and the source's name, so a source brings the same general
    text to whatever step it trains in: schedules that hold the same sources see the same tokens."""
    import zlib

    import datasets
    import numpy as np

    spec, share = cfg.data.mixed, cfg.data.mixed.general_share
    rows = load_rows(DatasetSpec(path=spec.general), "cpt", key="data.mixed.general")
    features = datasets.Features({**CANONICAL_FEATURES["mixed"], SOURCE: datasets.Value("int32")})
    rows = rows.map(tag_row, with_indices=True, remove_columns=rows.column_names, features=features,
                    fn_kwargs={"canonical": MIXED_CANONICAL["text"], "key": "data.mixed.general", "source": len(names)})
    general = rows.map(tokenize_mixed, batched=True, with_indices=True, remove_columns=rows.column_names,
                       desc="tokenize general replay",
                       fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.training.max_seq_length,
                                  "assistant_only": False, "key": "data.mixed.general"}).remove_columns("truncated")
    general_lengths = list_lengths(general, "input_ids")
    sources, lengths = kept.with_format("arrow")[SOURCE].to_numpy(), list_lengths(kept, "input_ids")
    picked = []
    for i, name in enumerate(names):
        budget = share / (1 - share) * lengths[sources == i].sum()
        order = np.random.default_rng([cfg.training.seed, zlib.crc32(name.encode())]).permutation(len(general))
        picked += take_tokens(order, general_lengths, budget)
    return datasets.concatenate_datasets([kept, general.select(picked)]) if picked else kept


def take_tokens(order, lengths, budget: float) -> List[int]:
    """Indices in `order`, cycled, until their lengths sum to the one nearest `budget`."""
    picked, total = [], 0
    while lengths.sum() > 0:
        for i in order:
            if total + lengths[i] / 2 > budget:
                return picked
            picked.append(int(i))
            total += int(lengths[i])
    return picked


def packed_epochs(cfg) -> int:
    """How many differently ordered copies a subject-packed dataset holds: the run's epochs when
    it runs whole epochs (the trainer then makes one pass over them), else 1."""
    epochs = cfg.training.num_train_epochs
    if cfg.training.max_steps > 0 or epochs != int(epochs) or epochs <= 1:
        return 1
    if cfg.training.keep_epoch_models:
        raise UserError("training.keep_epoch_models with subject-packed data (a `subject` column): its epochs are "
                        "packed into one pass, so there is no model per epoch: drop keep_epoch_models, or the "
                        "subject column")
    return int(epochs)


OPEN_BLOCKS = 64
"""Blocks kept open for filling at once: the oldest is closed past this, so packing stays linear."""


def blocks_by_subject(lengths, subjects, order, block_size: int) -> List[List[int]]:
    """Example indices per block, in `order` (first fit): an example goes into the first open
    block with room and no example of its subject, else opens a block."""
    blocks, open_blocks = [], []
    for i in order:
        length, subject = int(lengths[i]), subjects[i]
        target = next((b for b in open_blocks
                       if b["room"] >= length and (subject is None or subject not in b["subjects"])), None)
        if target is None:
            target = {"ids": [], "room": block_size, "subjects": set()}
            blocks.append(target)
            open_blocks.append(target)
            if len(open_blocks) > OPEN_BLOCKS:
                open_blocks.pop(0)
        target["ids"].append(i)
        target["room"] -= length
        if subject is not None:
            target["subjects"].add(subject)
    return [b["ids"] for b in blocks]


def pack_by_subject(examples, subjects: List, block_size: int, epochs: int, seed: int):
    """`epochs` packings of the examples, each in a fresh random order, concatenated: rows of
    input_ids, labels, LOSS_KIND and seq_lengths (as TRL's pack_dataset makes them)."""
    import datasets
    import numpy as np

    columns = {c: list(examples[c]) for c in ("input_ids", "labels", LOSS_KIND)}
    lengths = [len(ids) for ids in columns["input_ids"]]
    rows = {c: [] for c in (*columns, "seq_lengths")}
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(lengths))
        for ids in blocks_by_subject(lengths, subjects, order, block_size):
            for c, values in columns.items():
                rows[c].append([v for i in ids for v in values[i]])
            rows["seq_lengths"].append([lengths[i] for i in ids])
    return datasets.Dataset.from_dict(rows)


class KindCollator(DataCollatorForLanguageModeling):
    """TRL's collator, plus LOSS_KIND laid out exactly as the labels are (flattened when padding
    free, right-padded with -1 otherwise)."""

    def torch_call(self, examples):
        kinds = [torch.tensor(e[LOSS_KIND]) for e in examples]
        batch = super().torch_call([{k: v for k, v in e.items() if k != LOSS_KIND} for e in examples])
        if self.padding_free:
            kinds = [torch.cat(kinds)]
        batch[LOSS_KIND] = pad(kinds, padding_value=-1, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        return batch
