"""Your own data in a pipeline: `data=`/`data.*`/`model.*` on the pipeline's command line reach
every training step; `pipeline.eval.eval_sets` plans evaluations of your own sets; the 7B+
presets refuse the bundled demo corpus unless data.allow_demo=true, in train.py and at plan time."""

from __future__ import annotations

import json

import pytest
from tests.support.env import assert_one_line_error, run_light

from core.errors import UserError
from orchestration.checks import validate_step_configs
from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline
from train.config import compose_train_config

DEMO_FIX = ("bundled demo data", "data.allow_demo=true")


def plan(tmp_path, *args):
    return plan_pipeline(compose_pipeline_job(["pipeline=tiny", f"root={tmp_path}", *args]))


def test_data_and_model_keys_reach_every_training_step_after_the_presets_overrides(tmp_path):
    steps = plan(tmp_path, "data=materials_replay", "data.sft.path=chats.jsonl", "model.attn_implementation=eager").steps
    trained = [s for s in steps if s.kind == "train"]
    assert len(trained) == 4
    for step in trained:
        mine = step.args.index("data.sft.path=chats.jsonl")
        assert step.args.index("training.max_steps=4") < step.args.index("data=materials_replay") < mine  # preset's first
        assert step.config.data.sft.path == "chats.jsonl" and step.config.model.attn_implementation == "eager"
    assert not any("chats.jsonl" in " ".join(s.args) for s in steps if s.kind != "train")


def test_model_path_is_refused_for_pipeline_start(tmp_path):
    with pytest.raises(UserError, match=r"model.path .*pipeline.start=<model dir>"):
        plan(tmp_path, "model.path=/models/x")


def test_a_mistyped_data_key_fails_the_plan_naming_the_step(tmp_path):
    with pytest.raises(UserError, match=r"pipeline tiny, step 'cpt': unknown config key 'data.cpt.pth'"):
        validate_step_configs(plan(tmp_path, "data.cpt.pth=corpus.jsonl"))


def write_eval_set(path):
    path.write_text("".join(json.dumps({"question": f"Q{i}?", "options": ["a", "b"], "answer": "A"}) + "\n"
                            for i in range(3)))
    return path


def test_eval_sets_alone_evaluate_every_model(tmp_path):
    mine = write_eval_set(tmp_path / "mine.jsonl")
    steps = plan(tmp_path / "runs", "pipeline.eval.tasks=[]", f"pipeline.eval.eval_sets=[{mine}]").steps
    evals = [s for s in steps if s.kind == "eval"]
    assert len(evals) == 8 and steps[-1].kind == "study"  # 2 CPT epochs, 3 more stages, 3 merges
    for step in evals:
        assert step.tasks == ["mine_loglik", "mine_gen"]
        assert f"eval_sets=[{mine}]" in step.args and "tasks=[]" in step.args
    validate_step_configs(plan(tmp_path / "runs", "pipeline.eval.tasks=[]", f"pipeline.eval.eval_sets=[{mine}]"))


def test_eval_sets_join_the_bundled_tasks(tmp_path):
    mine = write_eval_set(tmp_path / "mine.jsonl")
    step = next(s for s in plan(tmp_path / "runs", f"pipeline.eval.eval_sets=[{mine}]").steps if s.kind == "eval")
    assert step.tasks[-2:] == ["mine_loglik", "mine_gen"] and len(step.tasks) > 2


def test_a_missing_eval_set_fails_the_plan(tmp_path):
    with pytest.raises(UserError, match=r"pipeline tiny: pipeline.eval.eval_sets: .*nothing.jsonl not found"):
        plan(tmp_path, f"pipeline.eval.eval_sets=[{tmp_path / 'nothing.jsonl'}]")


@pytest.mark.parametrize("stage,kind", [("cpt", "cpt"), ("sft", "sft"), ("dpo", "preference")])
def test_an_8b_preset_refuses_the_demo_data_unless_allowed(stage, kind):
    with pytest.raises(UserError, match=rf"model=mistral_7b_v0_3 .*\(data.{kind}\).*data.{kind}.path=.*data.allow_demo=true"):
        compose_train_config([f"+stage={stage}", "model=mistral_7b_v0_3"])
    assert compose_train_config([f"+stage={stage}", "model=mistral_7b_v0_3", "data.allow_demo=true"])
    assert compose_train_config([f"+stage={stage}", "model=mistral_7b_v0_3", f"data.{kind}.path=mine.jsonl"])
    assert compose_train_config([f"+stage={stage}"]).model.demo_data_ok  # the tiny default trains on it


def test_train_py_refuses_in_one_line():
    assert_one_line_error(run_light("train.py", "+stage=cpt", "model=llama3_1_8b", "--cfg"), *DEMO_FIX, "data.cpt.path=")


def test_submit_refuses_at_plan_time_naming_the_step(tmp_path):
    proc = run_light("submit.py", "pipeline=llama_instruct_cpt_sft_orpo_slerp", "cluster=slurm", f"root={tmp_path}",
                     "model.attn_implementation=sdpa", "--dry-run")
    assert_one_line_error(proc, "pipeline llama_instruct_cpt_sft_orpo_slerp, step 'cpt'", *DEMO_FIX)
    assert "#!/bin/bash" not in proc.stdout
