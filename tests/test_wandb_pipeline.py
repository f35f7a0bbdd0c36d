"""W&B across a pipeline: every step's run, training or not, lands in one project and entity
(pipeline.wandb_project / pipeline.wandb_entity), in one group named after the pipeline."""

from __future__ import annotations

import os

import pytest
import wandb

from core.wandb_runs import DEFAULT_WANDB_PROJECT, log_wandb_run
from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline
from orchestration.steps import step_env
from tests.support.wandb_offline import find_offline_runs, run_info
from train.config import compose_train_config


def plan_of(tmp_path, *overrides):
    return plan_pipeline(compose_pipeline_job(["pipeline=tiny", f"root={tmp_path}", "pipeline.wandb=offline", *overrides]))


def test_every_step_kind_gets_the_same_project_and_entity(tmp_path):
    plan = plan_of(tmp_path, "pipeline.wandb_project=materials-study", "pipeline.wandb_entity=my-team")
    kinds = {s.kind for s in plan.steps}
    assert kinds == {"train", "merge", "eval", "study"}
    for step in plan.steps:
        env = step_env(plan, step)
        assert (env["WANDB_PROJECT"], env["WANDB_ENTITY"], env["WANDB_RUN_GROUP"]) == ("materials-study", "my-team", "tiny")


def test_training_runs_log_to_the_pipeline_project(tmp_path, monkeypatch):
    from train.tracking import configure_wandb

    plan = plan_of(tmp_path, "pipeline.wandb_project=materials-study", "pipeline.wandb_entity=my-team")
    train_step = next(s for s in plan.steps if s.kind == "train")
    cfg = compose_train_config(train_step.args)
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_DIR", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    configure_wandb(cfg.logging, "cpt", str(tmp_path / "out"))
    assert os.environ["WANDB_PROJECT"] == step_env(plan, train_step)["WANDB_PROJECT"] == "materials-study"
    assert os.environ["WANDB_ENTITY"] == "my-team"


def test_the_default_project_is_the_training_default(tmp_path):
    plan = plan_of(tmp_path)
    assert {step_env(plan, s)["WANDB_PROJECT"] for s in plan.steps} == {DEFAULT_WANDB_PROJECT}
    assert all("WANDB_ENTITY" not in step_env(plan, s) for s in plan.steps)
    train_step = next(s for s in plan.steps if s.kind == "train")
    assert compose_train_config(train_step.args).logging.project == DEFAULT_WANDB_PROJECT


@pytest.mark.parametrize("kind", ["merge", "eval"])
def test_a_real_offline_run_lands_in_the_pipeline_project(kind, tmp_path, monkeypatch):
    plan = plan_of(tmp_path, "pipeline.wandb_project=materials-study", "pipeline.wandb_entity=my-team")
    step = next(s for s in plan.steps if s.kind == kind)
    for key, value in step_env(plan, step).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    (tmp_path / "wandb-runs").mkdir()
    wandb.teardown()  # wandb reads the environment once per process; a step is one process
    assert log_wandb_run(kind, {"step": step.name}, {"score": 0.5}) is not None
    wandb.teardown()  # the step's process exits here: wandb's service flushes the run file
    (path,) = find_offline_runs(tmp_path / "wandb-runs")
    info = run_info(path)
    assert (info["project"], info["entity"], info["group"], info["job_type"]) == ("materials-study", "my-team", "tiny", kind)
    assert info["name"] == step.name
