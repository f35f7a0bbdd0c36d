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
from train.config import (TrainingConfig, check_schedule_of_samples, compose_train_config, derive_gradient_accumulation,
                          optimizer_steps, resolve_batch)


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


PAPER_8B = {"cpt": (6, 96, True, 3072, 2e-5), "sft": (6, 96, True, 3076, 2e-5), "dpo": (2, 32, True, 2048, 5e-7),
            "orpo": (3, 24, True, 2048, 3e-6)}
"""Per stage: per-device batch, global batch, checkpointing, max_seq_length, learning rate of the paper's 8B runs."""


def batch_settings(t):
    return (t.per_device_train_batch_size, t.global_batch_size, t.gradient_checkpointing, t.max_seq_length,
            t.learning_rate)


@pytest.mark.parametrize("stage", sorted(PAPER_8B))
def test_the_size_preset_of_a_small_model_replaces_the_papers_8b_batch(stage):
    """The 8B presets keep the paper's numbers; the embedded default (conf/size/tiny.yaml) and
    smollm2_135m (conf/size/smollm2_135m.yaml) train a few sequences a rank, accumulation 1."""
    paper = compose_train_config([f"+stage={stage}", "model=llama3_1_8b", "data.allow_demo=true"]).training
    assert batch_settings(paper) == PAPER_8B[stage]
    tiny = compose_train_config([f"+stage={stage}"]).training
    rate = 1e-4 if stage == "dpo" else 1e-3  # conf/size/stage/tiny_dpo.yaml
    assert batch_settings(tiny) == (4, None, False, 512, rate) and tiny.warmup_steps == 0.1
    assert derive_gradient_accumulation(tiny, 2) == 1
    small = compose_train_config([f"+stage={stage}", "model=smollm2_135m"]).training
    assert batch_settings(small) == (2, None, False, 1024, PAPER_8B[stage][4])


def test_the_command_line_wins_over_the_size_preset_and_size_picks_another():
    typed = compose_train_config(["+stage=cpt", "training.per_device_train_batch_size=2", "training.learning_rate=3e-4",
                                  "training.global_batch_size=8"]).training
    assert (typed.per_device_train_batch_size, typed.learning_rate, typed.global_batch_size) == (2, 3e-4, 8)
    assert typed.max_seq_length == 512  # the size's, for the keys not typed
    other = compose_train_config(["+stage=cpt", "model=llama3_1_8b", "data.allow_demo=true", "size=tiny"]).training
    assert batch_settings(other) == (4, None, False, 512, 1e-3)
    other_dpo = compose_train_config(["+stage=dpo", "model=llama3_1_8b", "data.allow_demo=true", "size=tiny"]).training
    assert batch_settings(other_dpo) == (4, None, False, 512, 1e-4)  # with the size's DPO part
    with pytest.raises(UserError, match=r"^unknown size 'tiyn': choose one of smollm2_135m, tiny \(presets in conf/size/"):
        compose_train_config(["+stage=cpt", "size=tiyn"])


def test_optimizer_steps_are_the_trainers():
    """The README's CPT on the demo data (15 blocks of 3072 tokens) with the paper's 8B batch ran
    5 steps in 5 epochs on 2 ranks (measured); with the tiny size's, 88 blocks of 512 make 55."""
    paper = training(per_device_train_batch_size=6, global_batch_size=96, num_train_epochs=5)
    assert optimizer_steps(paper, 15, 2) == 5
    tiny = training(per_device_train_batch_size=4, num_train_epochs=5)
    assert optimizer_steps(tiny, 88, 2) == 55
    assert optimizer_steps(training(per_device_train_batch_size=4, gradient_accumulation_steps=3), 88, 2) == 4
    assert optimizer_steps(training(per_device_train_batch_size=4, num_train_epochs=0.5), 88, 2) == 6
    assert optimizer_steps(training(per_device_train_batch_size=4, max_steps=7), 88, 2) == 7


def test_a_max_steps_run_within_its_warmup_is_refused_when_composed():
    """Before any data is read: --cfg, pipeline.py and submit.py --dry-run compose the same way."""
    with pytest.raises(UserError, match=r"^the learning-rate warm-up \(training.warmup_steps=100: 100 optimizer step\(s\)\) "
                                        r"does not end before the run does \(50 optimizer step\(s\): training.max_steps=50\)"):
        compose_train_config(["+stage=orpo", "model=llama3_1_8b", "data.allow_demo=true", "training.max_steps=50"])
    assert compose_train_config(["+stage=orpo", "training.max_steps=50"]).training.warmup_steps == 0.1  # tiny: 5 steps


def test_a_warmup_that_does_not_end_before_the_run_is_refused_in_one_line():
    paper_sft = training(per_device_train_batch_size=6, global_batch_size=96, warmup_steps=0.1)
    with pytest.raises(UserError) as err:
        check_schedule_of_samples(paper_sft, 12, 2, "sequences")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("the learning-rate warm-up (training.warmup_steps=0.1: 1 optimizer step(s)) does not end "
                              "before the run does (1 optimizer step(s): 12 sequences / (training.per_device_train_batch_size=6 "
                              "x 8 accumulation x 2 rank(s)) x training.num_train_epochs=1): its only step would train "
                              "at learning rate 0")
    for key in ("training.max_steps", "training.num_train_epochs", "training.global_batch_size"):
        assert key in message
    with pytest.raises(UserError, match=r"training.warmup_steps=100: 100 optimizer step\(s\)\) does not end before the "
                                        r"run does \(73 optimizer step\(s\)"):
        check_schedule_of_samples(training(per_device_train_batch_size=3, warmup_steps=100), 437, 2, "pairs")
    check_schedule_of_samples(training(per_device_train_batch_size=3, warmup_steps=72), 437, 2, "pairs")  # ends before
    check_schedule_of_samples(training(per_device_train_batch_size=6, warmup_steps=0.1, max_steps=2), 12, 2)
    constant = training(per_device_train_batch_size=6, warmup_steps=5, lr_scheduler_type="constant")  # no warm-up
    check_schedule_of_samples(constant, 12, 2)


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
