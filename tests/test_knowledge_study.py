"""The knowledge-injection study on SmolLM2 (conf/pipeline/smollm2_knowledge.yaml): its three arms
branch from the start model and train exactly as the schedule presets they copy
(knowledge_standard, knowledge_mixed, knowledge_pit), plus the general replay; the storage probe and
the study's four tasks reach every step."""

from __future__ import annotations

from pathlib import Path

from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline

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
