"""training.global_batch_size: gradient accumulation derived from the world size, at run start,
in login-node planning, and on a resume on another world size."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from omegaconf import OmegaConf

from core.checkpoints import recorded_global_batch
from core.errors import UserError
from tests.support.env import REPO, assert_one_line_error, launch, offline_env, run_light, tail
from train.config import TrainingConfig, compose_train_config, derive_gradient_accumulation, resolve_batch


def training(**values):
    return OmegaConf.merge(OmegaConf.structured(TrainingConfig), values)


def test_accumulation_is_the_global_batch_over_per_device_batch_and_ranks():
    assert derive_gradient_accumulation(training(global_batch_size=96, per_device_train_batch_size=6), 8) == 2
    assert derive_gradient_accumulation(training(global_batch_size=96, per_device_train_batch_size=6), 16) == 1
    assert derive_gradient_accumulation(training(global_batch_size=96, per_device_train_batch_size=2), 3) == 16


def test_without_a_global_batch_the_accumulation_is_the_set_value_or_one():
    assert derive_gradient_accumulation(training(), 4) == 1
    assert derive_gradient_accumulation(training(gradient_accumulation_steps=3), 4) == 3


def test_a_global_batch_the_ranks_cannot_keep_is_refused_with_settings_that_would():
    with pytest.raises(UserError) as err:
        derive_gradient_accumulation(training(global_batch_size=96, per_device_train_batch_size=5), 16)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("training.global_batch_size=96 is not a multiple of training.per_device_train_batch_size=5")
    assert "16 rank(s)" in message
    assert "training.per_device_train_batch_size=3 or training.per_device_train_batch_size=6 (to keep 96)" in message
    assert "training.global_batch_size=80 or training.global_batch_size=160" in message


def test_a_global_batch_no_per_device_batch_can_keep_names_the_global_batches_that_fit():
    with pytest.raises(UserError, match=r"no per-device batch keeps 24 on 16 rank\(s\); use training.global_batch_size=48$"):
        derive_gradient_accumulation(training(global_batch_size=24, per_device_train_batch_size=3), 16)


def test_an_explicit_accumulation_must_agree_with_the_global_batch():
    agreeing = training(global_batch_size=96, per_device_train_batch_size=6, gradient_accumulation_steps=2)
    assert derive_gradient_accumulation(agreeing, 8) == 2
    with pytest.raises(UserError) as err:
        derive_gradient_accumulation(agreeing, 16)
    message = str(err.value)
    assert "\n" not in message
    assert "training.gradient_accumulation_steps=2 disagrees with training.global_batch_size=96, which needs 1 on 16 rank(s)" \
        in message
    assert "training.gradient_accumulation_steps=null" in message and "training.global_batch_size=null" in message


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_the_8b_presets_keep_the_papers_global_batch_of_96_on_any_world_size(stage):
    t = compose_train_config([f"+stage={stage}", "model=llama3_1_8b", "data.allow_demo=true"]).training
    assert (t.per_device_train_batch_size, t.global_batch_size) == (6, 96)
    assert derive_gradient_accumulation(t, 16) == 1
    assert derive_gradient_accumulation(t, 8) == 2  # the paper's 6 x 2 on its 8 GPUs


def test_resolving_records_the_effective_global_batch_and_accumulation():
    t = training(global_batch_size=96, per_device_train_batch_size=6)
    assert resolve_batch(t, 4) == 96 and t.gradient_accumulation_steps == 4
    untouched = training(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    assert resolve_batch(untouched, 4) == 24 and untouched.global_batch_size == 24


def test_a_resume_on_another_world_size_keeps_the_checkpoints_global_batch(tmp_path):
    (tmp_path / "batch.json").write_text(json.dumps(
        {"world_size": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}))
    assert recorded_global_batch(tmp_path) == 4
    assert recorded_global_batch(tmp_path / "missing") is None
    t = training(per_device_train_batch_size=1)
    assert resolve_batch(t, 1, tmp_path) == 4 and t.gradient_accumulation_steps == 4
    same = training(per_device_train_batch_size=2, gradient_accumulation_steps=1)  # 2 x 1 x 2 ranks: the same 4
    assert resolve_batch(same, 2, tmp_path) == 4
    assert resolve_batch(training(per_device_train_batch_size=1), 1, tmp_path / "missing") == 1  # nothing recorded


def test_a_resume_that_cannot_keep_its_global_batch_is_refused_naming_what_would(tmp_path):
    """The Trainer derives the steps per epoch, max_steps, the epochs already trained and the
    schedule from the new dataloader: another global batch would end the run early (and publish
    it) or stretch its schedule, so a resume keeps the checkpoint's, or is refused."""
    (tmp_path / "batch.json").write_text(json.dumps(
        {"world_size": 2, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}))  # 12
    with pytest.raises(UserError, match=rf"resume: {tmp_path} was trained with training.global_batch_size=12, which 8 rank\(s\) "
                                        r"of training.per_device_train_batch_size=3 cannot make: "
                                        r"no per-device batch can; run on 4 or 6 ranks, or resume=never"):
        resolve_batch(training(per_device_train_batch_size=3), 8, tmp_path)
    with pytest.raises(UserError, match=r"12, which 4 rank\(s\) of training.per_device_train_batch_size=2 cannot make: "
                                        r"training.per_device_train_batch_size=1 or training.per_device_train_batch_size=3 "
                                        r"keeps it, or resume=never"):
        resolve_batch(training(per_device_train_batch_size=2), 4, tmp_path)
    for asked in (dict(global_batch_size=24), dict(gradient_accumulation_steps=2)):  # 3 x 2 x 1 rank = 6
        with pytest.raises(UserError, match=r"training.global_batch_size=12 and this run asks for (24|6) on 1 rank\(s\) "
                                            r"\(training.per_device_train_batch_size=3, .*\): a resume keeps its "
                                            r"checkpoint's global batch.*set training.global_batch_size=12 and "
                                            r"training.gradient_accumulation_steps=null, or resume=never"):
            resolve_batch(training(per_device_train_batch_size=3, **asked), 1, tmp_path)


def test_submit_refuses_a_global_batch_the_cluster_cannot_keep_before_anything_queues(tmp_path, fake_flash_attn):
    """The paper's ORPO global batch (24) cannot be kept on 2 nodes x 8 GPUs: the dry run says so."""
    proc = run_light("submit.py", "pipeline=llama_instruct_grid", "cluster=slurm", "cluster.nodes=2", f"root={tmp_path}",
                     "pipeline.start=/models/Meta-Llama-3.1-8B-Instruct", "data.allow_demo=true", "--dry-run",
                     env=offline_env(PATH=str(tmp_path) + os.pathsep + os.environ["PATH"],
                                     PYTHONPATH=f"{fake_flash_attn}{os.pathsep}{REPO}"))
    assert_one_line_error(proc, "step 'orpo'", "training.global_batch_size=24", "16 rank(s)",
                          "training.global_batch_size=48")


@pytest.mark.integration
def test_a_two_rank_run_trains_with_the_global_batch_it_was_given(tmp_path):
    """2 ranks x 1 sequence x derived accumulation 2 = 4 sequences an optimizer step: logged, in
    the resolved config and the model card, and in the tokens the Trainer counted."""
    out = tmp_path / "run"
    proc = launch("train.py", ["+stage=cpt", "training.per_device_train_batch_size=1", "training.global_batch_size=4",
                               "training.gradient_checkpointing=false", "training.max_seq_length=64",
                               "training.max_steps=2", f"output_dir={out}"], ranks=2)
    assert proc.returncode == 0, tail(proc)
    resolved = yaml.safe_load((out / "domainforge.yaml").read_text())["training"]
    assert (resolved["global_batch_size"], resolved["gradient_accumulation_steps"]) == (4, 2)
    logged = [line for line in (proc.stdout + proc.stderr).splitlines() if "'loss'" in line]
    assert logged and all("'global_batch_size': 4" in line for line in logged), tail(proc)
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == 2 * 4 * 64  # steps x sequences x tokens, over both ranks
    card = json.loads((out / "lineage.json").read_text())
    assert card["step"]["hyperparameters"]["training"]["global_batch_size"] == 4
