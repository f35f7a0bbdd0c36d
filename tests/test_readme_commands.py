"""Every configuration-driven command in README.md composes as written: the same overrides
through the same composer the entry point uses, so a renamed key or preset breaks this test
before it breaks a reader. (The commands' runs are the integration tests' business.)"""

from __future__ import annotations

import re
import shlex

import pytest
from tests.support.env import REPO

from core.cli import wants_help, without_cli_flags
from evaluation.config import compose_eval_config
from merge.config import compose_merge_config
from orchestration.config import compose_pipeline_job
from train.augment.config import compose_augment_config
from train.config import compose_train_config


def readme_commands() -> list:
    """(script, args, env): env holds the block's `export NAME=value` lines before the command."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split("&&")[-1].strip()
            words = shlex.split(line)
            if words[:1] == ["export"]:
                name, value = words[1].split("=", 1)
                env[name] = value.replace("$PWD", str(REPO))
            script = next((w for w in words if w.startswith("launch/")), None)
            if script:
                commands.append((script, words[words.index(script) + 1:], dict(env)))
    return commands


def compose(script: str, args: list):
    if wants_help(args):
        return None  # every launcher's --help runs in tests/test_matrix_launch.py
    args = without_cli_flags(args)  # --cfg
    if script == "launch/train.py":
        return compose_train_config(args)
    if script in ("launch/pipeline.py", "launch/submit.py"):
        return compose_pipeline_job([a for a in args if a not in ("status", "--dry-run")])
    if script == "launch/eval.py":
        return compose_eval_config([f"model_dir={args[0]}", *args[1:]])
    if script == "launch/augment.py":
        return compose_augment_config(args)
    if script == "launch/merge.py" and all("=" in a for a in args):
        return compose_merge_config(args)
    return None  # file arguments (a recipe, a run directory): run by the integration tests


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_it_promises():
    scripts = {script for script, _, _ in COMMANDS}
    assert {"launch/train.py", "launch/pipeline.py", "launch/submit.py", "launch/eval.py", "launch/merge.py",
            "launch/study.py", "launch/augment.py"} <= scripts, scripts
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("script,args,env", COMMANDS, ids=[" ".join([s, *a])[:80] for s, a, _ in COMMANDS])
def test_readme_command_composes(script, args, env, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    compose(script, args)  # a UserError (unknown key, bad value, missing preset) fails the test
