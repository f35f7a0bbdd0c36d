"""Preference pairs for the DPO and ORPO stages: validate, render with the chat template,
tokenize and truncate once, here, so both trainers see the same tokens.

A row is `prompt`, `chosen`, `rejected`, each either a plain string or chat messages (TRL's
conversational preference format; `chosen`/`rejected` holding the whole conversation with an
implicit prompt works too). Plain strings become a user turn and an assistant turn, so every
row is rendered with the tokenizer's chat template, as the model will see it at inference.

Output rows (TRL DPOTrainer's tokenized format): `prompt_ids`, `chosen_ids`, `rejected_ids`.
Truncation is TRL's classic rule: when prompt + longer answer exceeds `max_length`, keep the
last `max_prompt_length` prompt tokens (the end of the question and the assistant header),
then cut each answer to `max_length - max_prompt_length` tokens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from datasets import Dataset
from trl.data_utils import common_prefix_length, maybe_extract_prompt

from core.errors import UserError
from train.data import PreparedData, count_not_equal, list_lengths, map_processes
from train.data.chat import fold_system_turn
from train.data.mix import SOURCE, load_split_rows, mix_shares, plain_messages, report_mix
from train.model import max_positions

log = logging.getLogger("domainforge")

PAIR_KEYS = ("prompt", "chosen", "rejected")


def as_messages(value: Any, role: str) -> List[Dict[str, str]]:
    """A plain string becomes one chat turn; chat messages pass through."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _is_blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return len(value) == 0


def to_conversation(row: Dict[str, Any], index: int, source: str) -> Dict[str, List[Dict[str, str]]]:
    """Validate one row and return it as chat messages: prompt, chosen, rejected."""
    for key in ("chosen", "rejected"):
        if _is_blank(row.get(key)):
            raise UserError(
                f"{source}: row {index} has no '{key}': every preference row needs prompt, chosen and "
                "rejected (strings or chat messages); fix or drop that row"
            )
    if _is_blank(row.get("prompt")):
        if isinstance(row["chosen"], str):
            raise UserError(
                f"{source}: row {index} has no 'prompt': plain-text rows need prompt, chosen and rejected"
            )
        row = maybe_extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
    return {
        "prompt": as_messages(row["prompt"], "user"),
        "chosen": as_messages(row["chosen"], "assistant"),
        "rejected": as_messages(row["rejected"], "assistant"),
    }


def canonical_pair(row: Dict[str, Any], index: int, key: str) -> Dict[str, List[Dict[str, str]]]:
    """A mixed source's row in the one schema every source is mapped to: chat messages."""
    return {name: plain_messages(turns) for name, turns in to_conversation(dict(row), index, key).items()}


def tokenize_conversation(conv: Dict[str, List[Dict[str, str]]], tokenizer) -> Dict[str, List[int]]:
    """TRL DPOTrainer's tokenization: the completion starts where prompt and prompt+answer diverge
    (some templates render a prompt alone differently from one followed by an answer)."""

    def ids(messages, **kwargs):
        messages = fold_system_turn(tokenizer, messages)
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt = ids(conv["prompt"], add_generation_prompt=True)
    prompt_chosen = ids(conv["prompt"] + conv["chosen"])
    prompt_rejected = ids(conv["prompt"] + conv["rejected"])
    prompt_len = min(common_prefix_length(prompt, prompt_chosen), common_prefix_length(prompt, prompt_rejected))
    return {
        "prompt_ids": prompt[:prompt_len],
        "chosen_ids": prompt_chosen[prompt_len:],
        "rejected_ids": prompt_rejected[prompt_len:],
    }


def truncate_pair(
    prompt: List[int], chosen: List[int], rejected: List[int], max_prompt_length: int, max_length: int
) -> Tuple[List[int], List[int], List[int], bool]:
    """TRL's classic preference truncation; returns the pieces and whether anything was cut."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer <= max_length:
        return prompt, chosen, rejected, False
    prompt = prompt[-max_prompt_length:]  # keep the end: the question and the assistant header
    if len(prompt) + longer > max_length:
        keep = max_length - len(prompt)
        chosen, rejected = chosen[:keep], rejected[:keep]
    return prompt, chosen, rejected, True


def check_lengths(stage_cfg, model_limit: int = 0) -> None:
    if model_limit and stage_cfg.max_length > model_limit:
        raise UserError(
            f"stage.max_length={stage_cfg.max_length} exceeds the model's limit of {model_limit} positions "
            f"(max_position_embeddings): set stage.max_length<={model_limit}"
        )
    if stage_cfg.max_prompt_length >= stage_cfg.max_length:
        raise UserError(
            f"stage.max_prompt_length={stage_cfg.max_prompt_length} must be below stage.max_length="
            f"{stage_cfg.max_length} to leave room for the answers: lower stage.max_prompt_length"
        )


def tokenize_preference_rows(
    rows,
    tokenizer,
    max_prompt_length: int,
    max_length: int,
    source: str = "data.preference",
    num_proc: Optional[int] = None,
) -> Tuple[Dataset, Dict[str, float]]:
    """Rows (a list of dicts or a datasets.Dataset) -> tokenized, truncated pairs and their stats.
    A mixed row's SOURCE index is kept in the SOURCE column."""
    conversations, sources = [], []
    for i, row in enumerate(rows):
        conversations.append(to_conversation(dict(row), i, source))
        if SOURCE in row:
            sources.append(row[SOURCE])
    if not conversations:
        raise UserError(f"{source} is empty: it needs rows of prompt, chosen and rejected")
    identical = sum(c["chosen"] == c["rejected"] for c in conversations)
    if identical == len(conversations):
        raise UserError(
            f"{source}: chosen equals rejected in every one of the {identical} rows, so there is no preference "
            "to learn: the rejected answer must differ (e.g. a plausible but wrong answer)"
        )

    def tokenize(conv):
        return tokenize_conversation(conv, tokenizer)

    num_proc = map_processes(len(conversations), num_proc)
    tokenized = Dataset.from_list(conversations).map(
        tokenize, remove_columns=list(PAIR_KEYS), num_proc=num_proc, desc="Tokenizing preference pairs"
    )
    if sources:
        tokenized = tokenized.add_column(SOURCE, sources)

    prompt_lengths = list_lengths(tokenized, "prompt_ids")
    too_long = prompt_lengths[prompt_lengths >= max_length]
    if too_long.size:
        longest = int(too_long.max())
        raise UserError(
            f"{source}: {too_long.size} of {prompt_lengths.size} rows have a prompt of at least stage.max_length="
            f"{max_length} tokens (longest {longest}), leaving no room for the answer: raise "
            f"stage.max_length={longest + max_length - max_prompt_length} or shorten those prompts"
        )

    def truncate(row):
        p, c, r, cut = truncate_pair(
            row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], max_prompt_length, max_length
        )
        return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "truncated": cut}

    tokenized = tokenized.map(truncate, num_proc=num_proc, desc="Truncating preference pairs")
    truncated = count_not_equal(tokenized, "truncated", False)
    tokenized = tokenized.remove_columns("truncated")
    stats = {
        "preference_rows": float(len(tokenized)),
        "truncated_rows": float(truncated),
        "identical_pairs": float(identical),
    }
    return tokenized, stats


def prepare_preference(cfg, tokenizer) -> PreparedData:
    """`cfg.data.preference` -> PreparedData for the DPO/ORPO stages (called before any output exists)."""
    check_lengths(cfg.stage, max_positions(cfg.model))
    spec = cfg.data.preference
    rows = load_split_rows(cfg, "preference", canonical_pair)
    where = f"data.preference.path={spec.path}" if spec.path else "data.preference.sources"
    dataset, stats = pairs_of(cfg, tokenizer, rows.train, where)
    if rows.names:
        lengths = sum(list_lengths(dataset, c) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        shares = mix_shares(rows.names, dataset.with_format("arrow")[SOURCE].to_numpy(), lengths)
        report_mix("preference", rows.names, shares, len(dataset), streaming=False)  # pairs are read whole
        stats.update(shares)
        dataset = dataset.remove_columns(SOURCE)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"preference data: {len(dataset)} pairs from {Path(spec.path).name if spec.path else 'the mix'}; "
            f"{int(stats['truncated_rows'])} truncated to stage.max_prompt_length={cfg.stage.max_prompt_length} / "
            f"stage.max_length={cfg.stage.max_length}; {int(stats['identical_pairs'])} with chosen == rejected",
            flush=True,
        )
    data = PreparedData(train_dataset=dataset, stats=stats)
    if rows.eval is not None:
        where = f"data.preference.eval_path={spec.eval_path}" if spec.eval_path else "data.preference eval split"
        data.eval_dataset, _ = pairs_of(cfg, tokenizer, rows.eval, where)
        head = rows.eval.select(range(min(cfg.training.log_completions, len(rows.eval))))
        data.eval_prompts = [fold_system_turn(tokenizer, to_conversation(dict(row), i, where)["prompt"])
                             for i, row in enumerate(head)]
    return data


def pairs_of(cfg, tokenizer, rows, where: str) -> Tuple[Dataset, Dict[str, float]]:
    return tokenize_preference_rows(
        rows, tokenizer, cfg.stage.max_prompt_length, cfg.stage.max_length, source=where, num_proc=cfg.data.num_proc
    )
