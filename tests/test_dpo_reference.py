"""DPO's reference model: a random-init start is copied exactly, precomputed reference
log-probs give the live reference's loss at step 0, and the on-disk cache is reused."""

from __future__ import annotations

import math
import re

import pytest
import torch
from bench.preference_harness import batch_of, compose, trainer_for
from safetensors.torch import load_file
from transformers import set_seed

import train.dpo_reference as dpo_reference
import train.stages.dpo as dpo
from core.errors import UserError
from train.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A saved tiny model with other weights than the policy, to serve as the reference."""
    out = tmp_path_factory.mktemp("ref") / "model"
    cfg = compose("dpo")
    tokenizer = load_tokenizer(cfg.model)
    set_seed(7)
    model = load_model(cfg.model, torch.float32, tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # far enough from the policy to move the loss
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(dpo_reference, "REF_LOGPS_DIR", tmp_path / "ref_logps")
    return tmp_path / "ref_logps"


def test_random_init_reference_is_the_initial_policy(tmp_path):
    _, trainer = trainer_for(compose("dpo"), tmp_path)
    policy = dict(trainer.model.named_parameters())
    for name, p in trainer.ref_model.named_parameters():
        assert torch.equal(p, policy[name]), name
    loss = trainer.compute_loss(trainer.model, batch_of(trainer, [0, 1]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0


def test_precomputed_reference_gives_the_live_loss(tmp_path, other_model, cache_dir):
    ref = [f"stage.ref_model_path={other_model}", "stage.beta=0.5"]
    _, live = trainer_for(compose("dpo", *ref), tmp_path / "live")
    _, pre = trainer_for(compose("dpo", *ref, "stage.precompute_ref_log_probs=true"), tmp_path / "pre")
    assert pre.ref_model is None and pre.ref_logps_source == "computed"
    for (name, a), (_, b) in zip(live.model.named_parameters(), pre.model.named_parameters()):
        assert torch.equal(a, b), name  # same starting policy

    rows = [0, 1]
    live_batch, pre_batch = batch_of(live, rows), batch_of(pre, rows)
    with torch.no_grad():
        ref_chosen, ref_rejected = live.compute_ref_log_probs(live.ref_model, live_batch)
        live_loss = live.compute_loss(live.model, live_batch).item()
        pre_loss = pre.compute_loss(pre.model, pre_batch).item()
    assert torch.allclose(pre_batch["ref_chosen_logps"], ref_chosen, atol=1e-5)
    assert torch.allclose(pre_batch["ref_rejected_logps"], ref_rejected, atol=1e-5)
    assert abs(pre_loss - live_loss) < 1e-5, (pre_loss, live_loss)
    assert abs(live_loss - math.log(2)) > 1e-3  # the reference really differs from the policy


def test_cached_reference_log_probs_are_reused(tmp_path, other_model, cache_dir, monkeypatch):
    overrides = [f"stage.ref_model_path={other_model}", "stage.precompute_ref_log_probs=true"]
    _, first = trainer_for(compose("dpo", *overrides), tmp_path / "a")
    assert first.ref_logps_source == "computed"
    (cache,) = cache_dir.glob("*.safetensors")
    written = cache.stat().st_mtime_ns

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr(dpo, "build_reference", no_reference)
    _, second = trainer_for(compose("dpo", *overrides), tmp_path / "b")
    assert second.ref_logps_source == "cache"
    assert cache.stat().st_mtime_ns == written and len(list(cache_dir.glob("*.safetensors"))) == 1
    assert second.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]

    # other truncation -> other tokens -> a new entry, never a stale one
    monkeypatch.undo()
    monkeypatch.setattr(dpo_reference, "REF_LOGPS_DIR", cache_dir)
    short = [*overrides, "stage.max_length=40", "stage.max_prompt_length=30"]
    _, third = trainer_for(compose("dpo", *short), tmp_path / "c")
    assert third.ref_logps_source == "computed"
    assert len(list(cache_dir.glob("*.safetensors"))) == 2


def test_bad_dpo_loss_fails_before_training():
    # stage.beta and the other ranges are schema checks: tests/test_matrix_train.py
    cfg = compose("dpo", "stage.loss_type=sigmoidd")
    with pytest.raises(UserError, match=re.escape("stage.loss_type='sigmoidd' is not a DPO loss")):
        dpo.HOOKS.prepare_data(cfg, load_tokenizer(cfg.model))


def test_combined_loss_types_reach_trl(tmp_path):
    cfg = compose("dpo", "stage.loss_type='sigmoid,sft'")
    assert dpo.HOOKS.trainer_args(cfg, dict(output_dir=str(tmp_path), report_to=["none"], bf16=False)).loss_type == [
        "sigmoid", "sft"]


def test_eval_split_reference_log_probs_are_cached_in_their_own_file(tmp_path, other_model, cache_dir, monkeypatch):
    overrides = [f"stage.ref_model_path={other_model}", "data.preference.eval_fraction=0.25"]
    _, live = trainer_for(compose("dpo", *overrides), tmp_path / "live")
    _, first = trainer_for(compose("dpo", *overrides, "stage.precompute_ref_log_probs=true"), tmp_path / "a")
    files = first.ref_logps_caches
    assert set(files) == {"train", "eval"} and files["train"] != files["eval"]
    assert sorted(cache_dir.glob("*.safetensors")) == sorted(files.values())
    cached = load_file(files["eval"])
    assert len(cached["chosen"]) == len(first.eval_dataset) == 4
    assert cached["chosen"].tolist() == first.eval_dataset["ref_chosen_logps"]
    # the reference model's log-probs on the eval rows, as the live reference computes them
    batch = live.data_collator([live.eval_dataset[i] for i in range(len(live.eval_dataset))])
    with torch.no_grad():
        chosen, rejected = live.compute_ref_log_probs(live.ref_model, batch)
    assert torch.allclose(cached["chosen"], chosen, atol=1e-5)
    assert torch.allclose(cached["rejected"], rejected, atol=1e-5)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr(dpo, "build_reference", no_reference)
    _, second = trainer_for(compose("dpo", *overrides, "stage.precompute_ref_log_probs=true"), tmp_path / "b")
    assert second.ref_logps_source == "cache"
    assert second.eval_dataset["ref_rejected_logps"] == first.eval_dataset["ref_rejected_logps"]
