"""SFT data: `messages` (or `prompt` + `completion`, rendered as user/assistant) go through the
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

import re
from typing import Dict, List, Optional, Tuple

from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from core.errors import UserError
from train.data import IGNORE_INDEX, PreparedData, count_not_equal, list_lengths, map_processes
from train.data.chat import fold_system_turn
from train.data.mix import (
    SOURCE, canonical_chat, completion_prompts, data_where, load_split_rows, mix_shares, report_mix, shares_of_stream,
)
from train.data.sources import check_messages, column_names, report_dropped, to_messages

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


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
    messages = fold_system_turn(tokenizer, messages)  # a folded system text is user text: no loss
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


def tokenize_chats(batch: Dict[str, list], indices: List[int], tokenizer, max_length: int,
                   assistant_only: bool, key: str) -> Dict[str, list]:
    """Batched map: chat rows -> input_ids, labels, truncated (bool) per row."""
    out: Dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    columns = list(batch)
    for j, index in enumerate(indices):
        messages = to_messages({c: batch[c][j] for c in columns})
        check_messages(messages, f"{key} row {index}")
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
    where = data_where(spec, "sft")
    data = sft_examples(cfg, tokenizer, rows.train, rows.names, "data.sft.path" if spec.path else where, where,
                        spec.streaming)
    if rows.eval is not None:
        key = "data.sft.eval_path" if spec.eval_path else "data.sft eval split"
        evaluation = sft_examples(cfg, tokenizer, rows.eval, [], key, key, streaming=False)
        data.eval_dataset = evaluation.train_dataset
        prompts = completion_prompts(rows.eval, "sft", cfg.training.log_completions)
        data.eval_prompts = [fold_system_turn(tokenizer, p) for p in prompts]
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

    num_proc = map_processes(len(rows), cfg.data.num_proc)
    chats = rows.map(tokenize_chats, num_proc=num_proc, desc="tokenize sft", **map_kwargs)
    truncated_rows = count_not_equal(chats, "truncated", False)
    chats = chats.remove_columns("truncated")
    kept = chats.filter(_has_loss_tokens, num_proc=num_proc, desc="drop rows without loss tokens")
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
