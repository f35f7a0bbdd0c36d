"""Pipelines: every preset composes and resolves (inputs chain, merges read the right
directories), and every bad input is one line and a non-zero exit. The local runner's real
run (deepspeed, tiny model) is the integration test at the bottom."""

from __future__ import annotations

import pytest
from tests.support.env import REPO, assert_one_line_error, launch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from core.errors import UserError
from orchestration.checks import validate_step_configs
from orchestration.config import PipelineJobConfig, compose_pipeline_job
from orchestration.local import local_command
from orchestration.planner import plan_pipeline
from train.config import compose_train_config

PRESETS = sorted(p.stem for p in (REPO / "conf" / "pipeline").glob("*.yaml"))


def preset_args(preset, tmp_path):
    """What a preset needs on the command line: the follow-up reads the knowledge study's arm, and
    merges the Instruct model, which a machine where no run converted its GGUF file lacks (the plan
    refuses then: tests/test_knowledge_study.py), so a directory stands in for it too."""
    if preset == "smollm2_knowledge_followup":
        from tests.support.models import stand_in_model

        smollm2 = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                   "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}
        arm = stand_in_model(tmp_path / "arm", smollm2)
        instruct = stand_in_model(tmp_path / "instruct", smollm2)
        return [f"pipeline.models.arm={arm}", f"pipeline.start={instruct}"]
    return []


def arg(step, key):
    """The value of `key=...` in a step's launch arguments."""
    values = [a.split("=", 1)[1] for a in step.args if a.startswith(key + "=")]
    assert len(values) == 1, (key, step.args)
    return values[0]


def model_steps(plan):
    return [s for s in plan.steps if s.kind in ("train", "merge")]


def test_presets_are_the_papers_recipes(tmp_path):
    assert PRESETS == [
        "knowledge_mixed",  # the knowledge-injection schedules: tests/test_knowledge.py
        "knowledge_pit",
        "knowledge_standard",
        "llama_instruct_cpt_sft_dpo",
        "llama_instruct_cpt_sft_orpo_slerp",
        "llama_instruct_grid",
        "mistral_base_cpt_sft_slerp",
        "smollm2_augment",
        "smollm2_knowledge",  # the three schedules as branches, on SmolLM2: tests/test_knowledge.py
        "smollm2_knowledge_followup",
        "smollm2_study",
        "smollm_base_cpt_sft_dpo",
        "tiny",
        "tiny_augment",
    ]
    plans = {p: plan_pipeline(compose_pipeline_job([f"pipeline={p}", "data.allow_demo=true", *preset_args(p, tmp_path)]))
             for p in PRESETS}
    steps = {p: [s.stage or "merge" for s in model_steps(plan)] for p, plan in plans.items()}
    assert steps["llama_instruct_cpt_sft_orpo_slerp"] == ["cpt", "sft", "orpo", "merge"]
    assert steps["llama_instruct_cpt_sft_dpo"] == ["cpt", "sft", "dpo"]
    assert steps["mistral_base_cpt_sft_slerp"] == ["cpt", "sft", "merge"]
    assert steps["smollm_base_cpt_sft_dpo"] == ["cpt", "sft", "dpo"]
    # docs/STUDY.md's run: the grid on SmolLM2, each strategy after SFT merged with the start model.
    assert steps["smollm2_study"] == ["cpt", "sft", "dpo", "orpo", "merge", "merge", "merge"]
    # the knowledge study's best arm: SFT then merged, and merged as it is
    assert steps["smollm2_knowledge_followup"] == ["sft", "merge", "merge"]
    # The paper's grid: every strategy, each merged with the Instruct model it started from.
    # Full fine-tuning against LoRA is an axis: sft-lora branches from the same CPT model.
    # Merge methods are an axis too: the preference models are also merged linearly and by TIES.
    assert steps["llama_instruct_grid"] == ["cpt", "sft", "dpo", "orpo", "sft"] + ["merge"] * 9
    grid_steps = model_steps(plans["llama_instruct_grid"])
    assert [s.parents for s in grid_steps[4:]] == [
        [], ["start", "cpt"], ["start", "sft"], ["start", "dpo"], ["start", "orpo"], ["start", "sft-lora"],
        ["start", "dpo"], ["start", "orpo"], ["start", "dpo"], ["start", "orpo"]]
    assert [s.method for s in grid_steps[5:]] == ["slerp"] * 5 + ["linear"] * 2 + ["ties"] * 2
    sft_lora = model_steps(plans["llama_instruct_grid"])[4].args
    assert "training.finetune=lora" in sft_lora and any(a.startswith("model.path=") and a.endswith("/cpt")
                                                        for a in sft_lora), sft_lora
    # tiny covers every kind of step: all four stages, merges, evaluations, the study.
    assert steps["tiny"] == ["cpt", "sft", "dpo", "orpo", "merge", "merge", "merge"]
    assert {s.kind for s in plans["tiny"].steps} == {"train", "merge", "eval", "study"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_step_of_every_preset_composes(preset, tmp_path):
    plan = plan_pipeline(compose_pipeline_job([f"pipeline={preset}", f"root={tmp_path}", "data.allow_demo=true",
                                               *preset_args(preset, tmp_path)]))
    validate_step_configs(plan)  # composes each step's train/merge config: no typo anywhere
    assert [s.output_dir for s in model_steps(plan)] == [tmp_path / preset / s.name for s in model_steps(plan)]


def test_each_step_reads_the_previous_output(tmp_path):
    plan = plan_pipeline(compose_pipeline_job(["pipeline=tiny", f"root={tmp_path}"]))
    cpt, sft, dpo, orpo, slerp_dpo, slerp, linear = model_steps(plan)
    run = tmp_path / "tiny"
    assert "model.path" not in " ".join(cpt.args)  # the preset's own (random-init) model
    assert arg(sft, "model.path") == str(run / "cpt")
    assert arg(dpo, "model.path") == str(run / "sft")
    assert arg(orpo, "model.path") == str(run / "sft")  # input: sft in the preset
    assert arg(orpo, "output_dir") == str(run / "orpo")
    assert arg(sft, "training.max_steps") == "4"  # pipeline-wide overrides reach every stage
    assert (arg(slerp, "merge.base_model"), arg(slerp, "merge.model")) == (str(run / "sft"), str(run / "orpo"))
    assert arg(slerp, "merge") == "paper_slerp" and arg(slerp, "merge.dtype") == "float32"
    assert slerp.depends_on == ["sft", "orpo"]
    # the same parents merged by a second method; the plan names each merge's method for the study
    assert arg(linear, "merge") == "linear_average" and linear.merge_models == slerp.merge_models
    assert (slerp.method, linear.method) == ("slerp", "linear")
    assert linear.describe()["method"] == "linear" and cpt.describe()["method"] is None


@pytest.mark.parametrize("gpus_per_node, visible, processes", [(8, 8, 8), (8, 4, 4), (1, 8, 1), (2, 0, 1)])
def test_local_eval_step_starts_one_process_per_gpu(gpus_per_node, visible, processes, tmp_path, monkeypatch):
    """Up to cluster.gpus_per_node evaluation processes, one per GPU the machine shows; without
    GPUs (CPU ranks would only share the cores), the plain single command."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg = compose_pipeline_job(["pipeline=tiny", f"root={tmp_path}", f"cluster.gpus_per_node={gpus_per_node}"])
    plan = plan_pipeline(cfg)
    step = next(s for s in plan.steps if s.kind == "eval")
    cmd = local_command(plan, step, cfg.cluster)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    assert cmd[1:5] == launcher if processes > 1 else cmd[1].endswith("launch/eval.py")
    assert cmd[-len(step.args):] == step.args


def test_merge_with_the_start_and_outside_models(tmp_path):
    llama = plan_pipeline(compose_pipeline_job([
        "pipeline=llama_instruct_cpt_sft_orpo_slerp", f"root={tmp_path}", "pipeline.start=/models/llama-instruct",
    ]))
    assert arg(llama.steps[0], "model.path") == "/models/llama-instruct"
    assert arg(llama.steps[-1], "merge.base_model") == "/models/llama-instruct"
    assert arg(llama.steps[-1], "merge.model") == str(tmp_path / llama.pipeline / "orpo")
    mistral = plan_pipeline(compose_pipeline_job([
        "pipeline=mistral_base_cpt_sft_slerp", f"root={tmp_path}", "pipeline.models.instruct=/models/m-instruct",
    ]))
    assert arg(mistral.steps[-1], "merge.base_model") == "/models/m-instruct"


def plan_of(steps):
    cfg = OmegaConf.merge(
        OmegaConf.structured(PipelineJobConfig),
        {"pipeline": {"name": "p", "model": "tiny", "steps": steps}, "cluster": {"name": "local"}},
    )
    return plan_pipeline(cfg)


def test_merge_of_a_later_step_is_refused():
    with pytest.raises(UserError, match=r"step 'm' merge.model names step 'b', which does not come before it"):
        plan_of([
            {"name": "a", "stage": "cpt"},
            {"name": "m", "merge": {"base_model": "a", "model": "b"}},
            {"name": "b", "stage": "sft"},
        ])
    with pytest.raises(UserError, match=r"names `start`, but model tiny is random-init"):
        plan_of([{"name": "a", "stage": "cpt"}, {"name": "m", "merge": {"base_model": "start", "model": "a"}}])


@pytest.mark.integration
def test_local_pipeline_skips_finished_steps_and_reruns_failed_ones(tmp_path):
    two_steps = ["pipeline=tiny", "pipeline.steps=[{name:cpt,stage:cpt},{name:sft,stage:sft}]", f"root={tmp_path}",
                 "cluster.gpus_per_node=2", "pipeline.eval.tasks=[]"]
    # Missing data is refused before any step runs (the pre-flight), in sft's one line.
    proc = launch("pipeline.py", [*two_steps, "pipeline.steps.1.overrides=['data.sft.path=/nonexistent.jsonl']"])
    assert_one_line_error(proc, "step 'sft'", "/nonexistent.jsonl")
    assert proc.returncode == 2 and not (tmp_path / "tiny" / "cpt").exists()
    # Data an earlier step writes is checked when its reader runs: sft fails after cpt finished,
    # with its one error line, then where it stopped.
    written_by_cpt = tmp_path / "tiny" / "cpt" / "chats.jsonl"
    proc = launch("pipeline.py", [*two_steps, f"pipeline.steps.1.overrides=['data.sft.path={written_by_cpt}']"])
    assert_one_line_error(proc, str(written_by_cpt))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pipeline tiny: stopped at step 'sft'")
    assert (tmp_path / "tiny" / "cpt" / "config.json").is_file()
    assert not (tmp_path / "tiny" / "sft" / "config.json").exists()
    # The rerun skips cpt and runs sft on cpt's output, through the deepspeed launcher (2 ranks).
    proc = launch("pipeline.py", two_steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step cpt is complete" in proc.stdout and "skipping" in proc.stdout
    assert "deepspeed --num_gpus 2" in proc.stdout
    assert "[rank 1/2]" in proc.stdout + proc.stderr
    sft = tmp_path / "tiny" / "sft"
    assert OmegaConf.load(sft / "domainforge.yaml").model.path == str(tmp_path / "tiny" / "cpt")
    model = AutoModelForCausalLM.from_pretrained(sft)
    assert model.num_parameters() > 1e6


def test_tiny_and_study_pipelines_keep_their_batch_under_the_paper_presets(tmp_path):
    """The stage presets carry the paper's 8B batch settings (6 x 2, checkpointing); the tiny
    pipeline (the tests' and a laptop's) and the documented SmolLM2 study keep theirs."""
    for preset, batch in [("tiny", 1), ("smollm2_study", 2)]:
        plan = plan_pipeline(compose_pipeline_job([f"pipeline={preset}", f"root={tmp_path}"]))
        for step in (s for s in plan.steps if s.kind == "train"):
            t = compose_train_config(step.args).training
            assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing) == \
                (batch, 1, False), (preset, step.name)
