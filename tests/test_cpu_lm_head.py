"""The CPU LM head (train/cpu_lm_head.py): on CPU ranks the SFT-family trainers score tokens
from the model's full logits, with the loss, gradients and metrics of TRL's fused head.

    python -m pytest -q tests/test_cpu_lm_head.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from tests.support.models import tiny_llama
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from train.config import compose_train_config
from train.cpu_lm_head import answer_fused_calls_from_full_logits
from train.data.sft import prepare_sft
from train.model import load_tokenizer
from train.stages import get_stage
from train.stages.sft import PretokenizedSFTStage

TRAINER_OUTPUTS = ("log_probs", "entropy", "is_top1")  # what SFTTrainer asks of the fused head
# (weights, autocast): DeepSpeed's fp32 and bf16 (bf16 weights), and the plain Trainer's bf16 (autocast)
PRECISIONS = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16-autocast": (torch.float32, True)}
# Largest relative gradient difference, ||ours - TRL|| / ||TRL|| per parameter. Measured on this
# model: < 1e-6 in fp32 and with bf16 weights (the same bf16 logits, fp32-accumulated GEMMs);
# up to 0.8% under autocast, where TRL accumulates the head's gradient GEMMs in fp32 and the
# model's own head returns them in bf16. Stated: 1e-5, 1e-5 and 2e-2.
GRAD_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-5, "bf16-autocast": 2e-2}


def labelled_batch(model, seed=0):
    """[2, 160] tokens (more than the head's ROWS); every other label is the model's own
    top-1 prediction (so is_top1 has hits), and two spans are masked with -100, one where row 0 starts."""
    ids = torch.randint(0, model.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)  # predicted[t] is the guess for token t + 1
    labels = ids.clone()
    labels[:, 1::2] = predicted[:, :-1:2]
    labels[0, :10] = -100
    labels[1, 30:40] = -100
    return ids, labels


def fused_call(model, ids, labels, autocast, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, **kwargs)
    out.loss.backward()
    return out


def relative_gradient_differences(reference, model):
    return {name: float((p.grad.float() - q.grad.float()).norm() / p.grad.float().norm())
            for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters())}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("num_items_in_batch", [None, 250], ids=["own-count", "accumulated-count"])
def test_the_cpu_head_gives_trls_loss_gradients_and_metrics(precision, num_items_in_batch):
    dtype, autocast = PRECISIONS[precision]
    base = tiny_llama(None, layers=2, dtype="float32")
    trl_model, ours = copy.deepcopy(base).to(dtype), copy.deepcopy(base).to(dtype)
    add_fused_lm_head(trl_model, outputs=TRAINER_OUTPUTS)
    add_fused_lm_head(ours, outputs=TRAINER_OUTPUTS)
    answer_fused_calls_from_full_logits(ours)
    ids, labels = labelled_batch(base)
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    expected = fused_call(trl_model, ids, labels, autocast, **kwargs)
    got = fused_call(ours, ids, labels, autocast, **kwargs)

    assert torch.equal(got.label_mask, labels[:, 1:] != -100)
    assert int(expected.is_top1.sum()) > 20  # the test has hits to compare
    assert torch.equal(got.is_top1, expected.is_top1)
    assert not got.log_probs[~got.label_mask].any() and not got.entropy[~got.label_mask].any()
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, expected.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=0)
    differences = relative_gradient_differences(trl_model, ours)
    assert max(differences.values()) < GRAD_TOLERANCE[precision], differences


def test_pre_shifted_labels_are_scored_as_given():
    """Under context/sequence parallelism the trainer passes `shift_labels`: no second shift."""
    base = tiny_llama(None, layers=1, dtype="float32")
    trl_model, ours = copy.deepcopy(base), copy.deepcopy(base)
    for model in (trl_model, ours):
        add_fused_lm_head(model, outputs=TRAINER_OUTPUTS)
    answer_fused_calls_from_full_logits(ours)
    ids, labels = labelled_batch(base)
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected, got = (m(input_ids=ids, shift_labels=shifted, fused_lm_head=True) for m in (trl_model, ours))
    assert got.log_probs.shape == (2, 160)
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    cfg = compose_train_config(["+stage=sft", "data.sft.max_samples=8", "training.max_seq_length=128"])
    tokenizer = load_tokenizer(cfg.model)
    stage = get_stage("sft")
    data = stage.prepare_data(cfg, tokenizer)
    args = stage.trainer_args(cfg, dict(output_dir=str(tmp_path_factory.mktemp("sft")), report_to=["none"],
                                        bf16=False, max_steps=1))
    return cfg, tokenizer, data, args


def test_the_sft_stage_trainer_computes_the_logits_once_and_logs_trls_metrics(sft_setup):
    """The stage's trainer on a CPU: the model's lm_head runs once a step on every position (TRL's
    head bypasses the module), and the loss, gradients and logged metrics are plain SFTTrainer's."""
    cfg, tokenizer, data, args = sft_setup
    base = tiny_llama(None, layers=2, dtype="float32")
    trainers = {
        "ours": get_stage("sft").build_trainer(cfg, args, copy.deepcopy(base), tokenizer, data, []),
        "trl": PretokenizedSFTStage("sft", prepare_sft, SFTTrainer).build_trainer(
            cfg, args, copy.deepcopy(base), tokenizer, data, []),
    }
    batch = trainers["trl"]._prepare_inputs(next(iter(trainers["trl"].get_train_dataloader())))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts masked, answers trained
    head_outputs = {name: [] for name in trainers}
    losses = {}
    for name, trainer in trainers.items():
        trainer.model.train()
        trainer.model.lm_head.register_forward_hook(lambda m, i, out, seen=head_outputs[name]: seen.append(out.shape))
        # an accumulated step's count: this micro-batch's label tokens and another's
        num_items = (batch["labels"][:, 1:] != -100).sum() + 37
        losses[name] = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items)
        losses[name].backward()
    assert head_outputs == {"ours": [(*batch["input_ids"].shape, base.config.vocab_size)], "trl": []}
    torch.testing.assert_close(losses["ours"], losses["trl"], rtol=1e-6, atol=0)
    differences = relative_gradient_differences(trainers["trl"].model, trainers["ours"].model)
    assert max(differences.values()) < GRAD_TOLERANCE["fp32"], differences
    metrics = {name: {key: trainer._metrics["train"][key] for key in ("entropy", "mean_token_accuracy", "num_tokens")}
               for name, trainer in trainers.items()}
    assert metrics["ours"]["num_tokens"] == metrics["trl"]["num_tokens"] == [batch["input_ids"].numel()]  # packed
    for key in ("entropy", "mean_token_accuracy"):
        assert metrics["ours"][key] == pytest.approx(metrics["trl"][key], rel=1e-5), (key, metrics)
