"""Presets outside the repository: a preset given as a .yaml path (`model=/x/m.yaml`,
`pipeline=/x/p.yaml`) and a directory of the user's own presets ($DOMAINFORGE_CONF, laid out like
conf/), which a pipeline passes on to every job, since each job recomposes its config."""

from __future__ import annotations

import re

import pytest

from core.config import USER_CONF_ENV
from core.errors import UserError
from orchestration.checks import validate_step_configs
from orchestration.config import compose_pipeline_job
from orchestration.planner import plan_pipeline
from orchestration.steps import step_env
from tests.support.env import assert_one_line_error, launch, offline_env
from train.config import compose_train_config

MODEL = """\
name: my_llama
tokenizer_path: ${repo:train/assets/tiny_tokenizer}
arch: {model_type: llama, vocab_size: 2048, hidden_size: 64, intermediate_size: 128,
       num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}
"""
PIPELINE = """\
name: my_pipe
model: my_llama
overrides: [training.max_steps=2]
steps:
  - name: sft
    stage: sft
  - name: dpo
    stage: dpo
"""


@pytest.fixture
def user_conf(tmp_path, monkeypatch):
    conf = tmp_path / "my-conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my_llama.yaml").write_text(MODEL)
    monkeypatch.setenv(USER_CONF_ENV, str(conf))
    return conf


def test_a_user_model_preset_composes_by_name_and_by_path(user_conf, monkeypatch):
    assert compose_train_config(["+stage=sft", "model=my_llama"]).model.arch.hidden_size == 64
    monkeypatch.delenv(USER_CONF_ENV)
    by_path = compose_train_config(["+stage=sft", f"model={user_conf / 'model' / 'my_llama.yaml'}"])
    assert by_path.model.name == "my_llama"


def test_a_preset_file_named_like_a_repo_preset_is_the_one_used(tmp_path):
    (tmp_path / "tiny.yaml").write_text(MODEL)
    assert compose_train_config(["+stage=sft", f"model={tmp_path / 'tiny.yaml'}"]).model.name == "my_llama"


def test_train_cfg_shows_a_user_preset(user_conf):
    proc = launch("train.py", ["+stage=sft", "model=my_llama", "--cfg"], env=offline_env(**{USER_CONF_ENV: str(user_conf)}))
    assert proc.returncode == 0, proc.stderr
    assert "name: my_llama" in proc.stdout and "hidden_size: 64" in proc.stdout


def test_a_pipeline_by_path_passes_the_user_presets_to_every_job(user_conf, tmp_path, monkeypatch):
    (tmp_path / "my_pipe.yaml").write_text(PIPELINE)
    plan = plan_pipeline(compose_pipeline_job([f"pipeline={tmp_path / 'my_pipe.yaml'}", f"root={tmp_path / 'runs'}"]))
    assert plan.pipeline == "my_pipe" and plan.run_dir == tmp_path / "runs" / "my_pipe"
    for step in plan.steps:
        assert step_env(plan, step)[USER_CONF_ENV] == str(user_conf)
    train_steps = [s for s in plan.steps if s.kind == "train"]
    assert [s.name for s in train_steps] == ["sft", "dpo"] and all("model=my_llama" in s.args for s in train_steps)
    validate_step_configs(plan)  # each job's config composes with the user's presets

    # A job sees only what the plan gives it: compose the first one in a clean environment.
    monkeypatch.delenv(USER_CONF_ENV)
    job_env = offline_env(**step_env(plan, train_steps[0]))
    proc = launch("train.py", [*train_steps[0].args, "--cfg"], env=job_env)
    assert proc.returncode == 0, proc.stderr
    assert "name: my_llama" in proc.stdout
    assert USER_CONF_ENV not in offline_env()
    proc = launch("train.py", [*train_steps[0].args, "--cfg"], env=offline_env())
    assert_one_line_error(proc, "unknown model 'my_llama'")


def test_submit_dry_run_plans_a_pipeline_given_by_path(user_conf, tmp_path):
    (tmp_path / "my_pipe.yaml").write_text(PIPELINE)
    args = [f"pipeline={tmp_path / 'my_pipe.yaml'}", "cluster=slurm", f"root={tmp_path / 'runs'}", "--dry-run"]
    proc = launch("submit.py", args, env=offline_env(**{USER_CONF_ENV: str(user_conf)}), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"export {USER_CONF_ENV}={user_conf}" in proc.stdout
    assert proc.stdout.count("model=my_llama") == 2


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["+stage=sft", "model=/nonexistent/my.yaml"], {}, r"model=/nonexistent/my.yaml: no such file; give a \.yaml file"),
        (["+stage=sft", "model=my_lama"], "user", r"unknown model 'my_lama': choose one of .*my_llama.*tiny \(presets in conf/model/ and .*my-conf/model/\)"),
        (["+stage=sft"], {USER_CONF_ENV: "/nonexistent/conf"}, rf"{USER_CONF_ENV}=/nonexistent/conf is not a directory"),
    ],
)
def test_bad_preset_locations_are_one_line(argv, env, message, user_conf):
    env = {USER_CONF_ENV: str(user_conf)} if env == "user" else env
    proc = launch("train.py", argv, env=offline_env(**{USER_CONF_ENV: "", **env}))
    assert re.search(message, assert_one_line_error(proc))


def test_a_broken_preset_file_is_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("name: x\noverrides: [a=${b}]\n")
    with pytest.raises(UserError, match=r"broken.yaml, line 2: not valid YAML"):
        compose_pipeline_job([f"pipeline={tmp_path / 'broken.yaml'}"])


def test_a_missing_pipeline_file_is_one_line(tmp_path):
    proc = launch("submit.py", [f"pipeline={tmp_path / 'nope.yaml'}", "cluster=slurm", "--dry-run"], timeout=120)
    assert_one_line_error(proc, f"pipeline={tmp_path / 'nope.yaml'}: no such file")


def test_a_pipeline_model_file_reaches_the_jobs_as_an_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "my_llama.yaml").write_text(MODEL)
    (tmp_path / "my_pipe.yaml").write_text(PIPELINE.replace("model: my_llama", "model: my_llama.yaml"))
    monkeypatch.chdir(tmp_path)  # jobs run in the checkout, not here
    plan = plan_pipeline(compose_pipeline_job(["pipeline=my_pipe.yaml", f"root={tmp_path / 'runs'}"]))
    train_steps = [s for s in plan.steps if s.kind == "train"]
    assert all(f"model={tmp_path / 'my_llama.yaml'}" in s.args for s in train_steps)
    validate_step_configs(plan)
