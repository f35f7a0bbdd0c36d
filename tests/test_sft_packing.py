"""Packed SFT rows never let one example attend to another.

A tiny random Llama (fp32) sees the same examples packed into one row (train/data/sft.py: TRL's
bfd packing + padding-free collator, position_ids restarting per example, no 2-D mask) and one
by one. Per-example losses must match to ~1e-5 for sdpa and eager. The control feeds the same
packed row WITH a 2-D all-ones attention_mask (what a plain collator sends): transformers then
skips its packed-sequence mask and examples leak into each other, so the control must differ.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.config import compose_train_config
from tests.support.models import tiny_llama
from train.data import IGNORE_INDEX
from train.data.sft import prepare_sft
from train.model import load_tokenizer

MAX_LEN = 256


@pytest.fixture(scope="module")
def sft_data():
    overrides = ["+stage=sft", f"training.max_seq_length={MAX_LEN}", "data.sft.max_samples=24"]
    cfg = compose_train_config(overrides + ["stage.packing=true"])
    tokenizer = load_tokenizer(cfg.model)
    packed = prepare_sft(cfg, tokenizer)
    single = prepare_sft(compose_train_config(overrides + ["stage.packing=false"]), tokenizer)
    row = max(packed.train_dataset.to_list(), key=lambda r: len(r["seq_lengths"]))  # most examples
    return tokenizer, packed, single, row


def fp32_llama(attn: str, vocab_size: int):
    """A random 2-layer fp32 Llama in eval mode, with the attention implementation `attn`."""
    return tiny_llama(None, 0, layers=2, hidden=64, vocab=vocab_size, dtype="float32", max_positions=MAX_LEN,
                      attn=attn).eval()


def example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one example; logits [n, vocab], labels [n]."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)


def packed_example_losses(model, batch, seq_lengths, labels, **extra):
    """Per-example losses from one packed row; batch tensors are [1, sum(seq_lengths)]."""
    with torch.no_grad():  # SFTTrainer always passes use_cache=False
        logits = model(**batch, **extra, use_cache=False).logits[0]
    out, start = [], 0
    for n in seq_lengths:
        out.append(example_loss(logits[start : start + n], labels[start : start + n]))
        start += n
    return torch.stack(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_losses_equal_examples_alone(attn, sft_data):
    tokenizer, packed, single, row = sft_data
    model = fp32_llama(attn, len(tokenizer))
    whole_examples = single.train_dataset["input_ids"]
    assert len(row["seq_lengths"]) >= 3
    batch = packed.data_collator([row])  # the collator the trainer uses
    assert "attention_mask" not in batch
    labels = torch.tensor(row["labels"])
    packed_losses = packed_example_losses(
        model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, row["seq_lengths"], labels
    )

    alone = []
    start = 0
    for n in row["seq_lengths"]:
        ids = torch.tensor(row["input_ids"][start : start + n])
        assert ids.tolist() in whole_examples  # a whole, real example
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
        alone.append(example_loss(logits, labels[start : start + n]))
        start += n
    alone = torch.stack(alone)
    torch.testing.assert_close(packed_losses, alone, rtol=0, atol=1e-5)

    # Control: the same packed row with a 2-D mask leaks across examples, so this test can fail.
    leaky = packed_example_losses(
        model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, row["seq_lengths"], labels,
        attention_mask=torch.ones_like(batch["input_ids"]),
    )
    assert torch.allclose(leaky[0], alone[0], atol=1e-5)  # the first example sees nothing before it
    assert (leaky[1:] - alone[1:]).abs().min() > 1e-3


def test_trainer_loss_packed_equals_unpacked(sft_data):
    """Through SFTTrainer.compute_loss (the training path): a packed batch and the same examples
    as a padded batch give the same token-mean loss."""
    from trl import SFTConfig, SFTTrainer

    tokenizer, packed, single, row = sft_data
    examples, start = [], 0
    for n in row["seq_lengths"]:
        examples.append({"input_ids": row["input_ids"][start : start + n], "labels": row["labels"][start : start + n]})
        start += n
    args = SFTConfig(
        output_dir="unused", report_to=[], bf16=False, use_cpu=True, max_length=MAX_LEN,
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
    )
    losses = {}
    for name, data, batch_rows in [("packed", packed, [row]), ("unpacked", single, examples)]:
        trainer = SFTTrainer(
            model=fp32_llama("sdpa", len(tokenizer)), args=args, train_dataset=data.train_dataset,
            data_collator=data.data_collator, processing_class=tokenizer,
        )
        trainer.model.train()  # dropout is 0 in LlamaConfig, so train mode is deterministic
        with torch.no_grad():
            losses[name] = trainer.compute_loss(trainer.model, trainer._prepare_inputs(data.data_collator(batch_rows)))
    torch.testing.assert_close(losses["packed"], losses["unpacked"], rtol=0, atol=1e-5)
