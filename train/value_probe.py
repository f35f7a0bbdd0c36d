"""The storage probe during training (training.value_probe): after every epoch's worth of
optimizer steps, and before the first, the mean loss on the tokens of each document's `value`
inside the document, e.g. "7.75" in "Yttrium scatters neutrons with a coherent scattering length
of 7.75 fm." (data/materials/facts_held.jsonl). Whether the training wording of a fact is stored,
so that a held-out question the model cannot answer says whether storage or extraction failed.

One line per probe in <output_dir>/value_loss.jsonl:

    {"epoch": 1, "step": 38, "loss": 2.41, "value_tokens": 4120, "documents": 1480, "seconds": 21.5}

`loss` is the mean over all value tokens (nats per token) of -log p(token | the document before
it). A run whose epochs are packed into one pass (subject-packed mixed data) probes after each
1/E of its steps: each document has then been seen k times on average.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from transformers import TrainerCallback

from core.errors import UserError
from core.jsonl import read_json_objects
from core.outputs import VALUE_LOSS_FILE

PROBE_BATCH = 16  # documents per forward: the renderings are one sentence each
PROBE_FORMAT = "give a JSONL file of documents, each with `text` and the `value` it states"


def read_probe_rows(path: str) -> List[dict]:
    """The probe file's rows (JSONL: `text` and `value`), each value checked to occur in its text."""
    file = Path(path).expanduser()
    rows = []
    for number, row in read_json_objects(file, "training.value_probe", PROBE_FORMAT):
        if not isinstance(row.get("text"), str) or "value" not in row:
            raise UserError(f"training.value_probe: {file} line {number} has no string `text` and `value`: {PROBE_FORMAT}")
        text, value = row["text"], str(row["value"])
        if value not in text:
            raise UserError(f"training.value_probe: {file} line {number}: its value {value!r} does not occur in its "
                            "text: the probe scores the value's tokens inside the document")
        rows.append({"text": text, "value": value})
    return rows


def value_token_mask(offsets: List[Tuple[int, int]], start: int, end: int) -> List[bool]:
    """Per token: whether its characters overlap [start, end), the value's; never the first token,
    which no context predicts."""
    mask = [s < end and e > start and e > s for s, e in offsets]
    return [False] + mask[1:]


def tokenize_probe(rows: List[dict], tokenizer, max_length: int) -> List[Tuple[List[int], List[bool]]]:
    """(input ids as training tokenizes a document, value-token mask) per row with a value token
    to score (a value that opens its document is scored from its second token on)."""
    out = []
    for row in rows:
        start = row["text"].index(row["value"])
        enc = tokenizer(row["text"], add_special_tokens=True, return_offsets_mapping=True,
                        truncation=True, max_length=max_length)
        mask = value_token_mask([tuple(o) for o in enc["offset_mapping"]], start, start + len(row["value"]))
        if any(mask):
            out.append((list(enc["input_ids"]), mask))
    if not out:
        raise UserError("training.value_probe: no document has a value token after its first token")
    return out


@torch.no_grad()
def value_loss(model, documents: List[Tuple[List[int], List[bool]]], pad_id: int, device) -> Tuple[float, int]:
    """(summed -log p of every value token, their count) under `model`, in eval mode. Every rank
    calls it on every document: under ZeRO-3 each forward gathers the shards from all ranks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for first in range(0, len(documents), PROBE_BATCH):
            batch = documents[first:first + PROBE_BATCH]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for i, (tokens, mask) in enumerate(batch):
                ids[i, :len(tokens)] = torch.tensor(tokens)
                attention[i, :len(tokens)] = 1
                scored[i, :len(mask)] = torch.tensor(mask)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            # position t predicts token t+1; only the value positions' rows get a log-softmax
            mine = scored[:, 1:].to(device)
            picked = torch.log_softmax(logits[:, :-1][mine].float(), dim=-1)  # [value tokens, vocab]
            target = ids[:, 1:].to(device)[mine]
            total -= float(picked.gather(-1, target.unsqueeze(-1)).double().sum())
            count += int(mine.sum())
    finally:
        model.train(was_training)
    return total, count


def probe_steps(max_steps: int, epochs: int) -> Dict[int, int]:
    """{optimizer step: epoch} at the end of each of `epochs` equal shares of the run."""
    return {math.ceil(k * max_steps / epochs): k for k in range(1, epochs + 1)}


class ValueLossCallback(TrainerCallback):
    """Runs the probe before training and at each epoch's end (see the module docstring); rank 0
    appends each result to <output_dir>/value_loss.jsonl and prints it."""

    def __init__(self, documents, pad_id: int, output_dir: str, epochs: int):
        self.documents, self.pad_id, self.epochs = documents, pad_id, max(1, epochs)
        self.path = Path(output_dir) / VALUE_LOSS_FILE
        self.steps: Dict[int, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = probe_steps(state.max_steps, self.epochs)
        if state.global_step == 0:
            self.probe(args, state, model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.probe(args, state, model, self.steps[state.global_step])

    def probe(self, args, state, model, epoch: int) -> None:
        started = time.monotonic()
        total, count = value_loss(model, self.documents, self.pad_id, args.device)
        if not state.is_world_process_zero:
            return
        record = {"epoch": epoch, "step": state.global_step, "loss": round(total / count, 5), "value_tokens": count,
                  "documents": len(self.documents), "seconds": round(time.monotonic() - started, 1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"value loss after epoch {epoch} (step {state.global_step}): {record['loss']:.4f} nats per value token "
              f"({count} tokens in {len(self.documents)} documents, {record['seconds']} s)", flush=True)


def value_probe_callback(cfg, tokenizer, packed_epochs: int) -> Optional[ValueLossCallback]:
    """The callback for training.value_probe (None when unset); the file is read and checked now,
    before the model loads."""
    if not cfg.training.value_probe:
        return None
    documents = tokenize_probe(read_probe_rows(cfg.training.value_probe), tokenizer, cfg.training.max_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    epochs = packed_epochs if packed_epochs > 1 else math.ceil(cfg.training.num_train_epochs)
    return ValueLossCallback(documents, pad_id, cfg.output_dir, epochs)
