"""Every command in README.md's code blocks runs as written, up to the point where it would
start spending compute: submit.py commands run their `--dry-run` on a login node (every check a
submission makes), pipeline.py commands are planned and checked as launch/pipeline.py checks
them, train/eval/augment/merge commands compose with their checks, and the file-argument
launchers (merge.py CONFIG OUT, synergy.py, study.py) parse their command lines with their own
parsers. Every check returns what it composed, planned or parsed; CHECKED_ELSEWHERE lists the
commands it passes over, and why. The README's own placeholders (/models/..., /data/...)
become tiny stand-ins; nothing else is changed, so a renamed key, a mistyped flag or a preset
that refuses what the README gives fails here.
flash-attn is faked (an importable, empty package), as a GPU node has it installed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.env import POISON, REPO, offline_env

from core.cli import wants_help, without_cli_flags
from core.errors import UserError
from evaluation.config import compose_eval_config
from evaluation.run import check_task_names
from evaluation.synergy import synergy_parser
from merge.cli import file_form_parser
from merge.config import compose_merge_config, options_from, recipe_from_config
from merge.recipe import check_recipe
from orchestration.config import compose_pipeline_job
from orchestration.local import run_local
from orchestration.study import study_parser
from train.attention import check_attention_installed
from train.augment.config import compose_augment_config
from train.config import compose_train_config
from train.preview import parse_flags

PLACEHOLDER = re.compile(r"/(models|data)/[^\s,\]'\"]+")
"""README paths that stand for the reader's own model or data."""
CHECKED_ELSEWHERE = {
    ("launch/train.py", "--help"): "every launcher's --help runs in tests/test_matrix_launch.py",
}
"""README commands check_command passes over (it returns None for them), with the reason."""
DATA_STAND_INS = {"cpt": "cpt.jsonl", "sft": "sft.jsonl", "preference": "preference.jsonl"}


def readme_commands(text: str) -> list:
    """(script, args, env): env holds the block's `export NAME=value` lines before the command."""
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


COMMANDS = readme_commands((REPO / "README.md").read_text())


class StandIns:
    """Tiny stand-ins for the README's placeholder paths, under `root`."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model

    def eval_set(self, path: Path) -> None:
        rows = [{"question": f"Which letter {i}?", "options": ["a", "b", "c", "d"], "answer": "B"} for i in range(4)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data_file(self, placeholder: str, key: str) -> str:
        """A file (or, for a glob, a file it matches) holding data of the kind `key` names."""
        target = self.root / placeholder.lstrip("/")
        made = Path(str(target).replace("*", "part"))
        made.parent.mkdir(parents=True, exist_ok=True)
        kind = next((k for k in DATA_STAND_INS if f"data.{k}." in key), None)
        if kind is not None:
            shutil.copy(REPO / "data" / "materials" / DATA_STAND_INS[kind], made)
        elif "eval_sets" in key:
            self.eval_set(made)
        else:
            raise AssertionError(f"no stand-in for the README's {placeholder} in {key}: add one here")
        return str(target)

    def replace(self, arg: str) -> str:
        key = arg.split("=", 1)[0]
        return PLACEHOLDER.sub(
            lambda m: str(self.model) if m.group(1) == "models" else self.data_file(m.group(0), key), arg)


def submit_dry_run(args: list, root: Path, fake_flash_attn: Path) -> None:
    """launch/submit.py --dry-run on a login node (no torch), with flash-attn installed."""
    argv = [*args, f"root={root / 'runs'}"] if not any(a.startswith("+stage=") for a in args) else list(args)
    if "--dry-run" not in argv:
        argv.append("--dry-run")
    proc = subprocess.run([sys.executable, "-c", POISON, str(REPO / "launch" / "submit.py"), *argv], cwd=root,
                          env=offline_env(PYTHONPATH=str(fake_flash_attn)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def plan_locally(args: list, root: Path):
    """launch/pipeline.py's own pre-flight: every check before its first step, nothing run."""
    overrides = [a for a in args if a != "--dry-run"]  # launch/pipeline.py's own flag
    return run_local(compose_pipeline_job([*overrides, f"root={root / 'runs'}"]), dry_run=True)


FILE_FORM_PARSERS = {"launch/merge.py": file_form_parser, "launch/synergy.py": synergy_parser,
                     "launch/study.py": study_parser}
"""The argparse parser each file-argument launcher parses its command line with."""


def parse_file_arguments(script: str, args: list):
    """A file-argument launcher's command line, parsed by the launcher's own parser: an unknown
    flag, a bad value or a missing argument raises its one-line UserError. The files it names
    are not needed (the README's do not exist here)."""
    parsed = FILE_FORM_PARSERS[script]().parse_args(args)
    if script == "launch/merge.py":
        options_from(parsed)  # the option values, as launch/merge.py takes them
    return parsed


def check_command(script: str, args: list, root: Path, fake_flash_attn: Path):
    """Run `script args` up to its first expensive step and return what it composed or parsed
    (None only for CHECKED_ELSEWHERE); a user error raises or fails an assert."""
    if wants_help(args):
        return None
    if script == "launch/submit.py" and "status" not in args:
        return submit_dry_run(args, root, fake_flash_attn)
    args = without_cli_flags(args)  # --cfg
    if script in ("launch/pipeline.py", "launch/submit.py"):  # submit.py status: composes, then asks SLURM
        if "status" in args:
            return compose_pipeline_job([a for a in args if a != "status"])
        return plan_locally(args, root)
    if script == "launch/train.py":
        cfg = compose_train_config(args)
        check_attention_installed(cfg.model.attn_implementation)
        return cfg
    if script == "launch/preview.py":
        return compose_train_config(parse_flags(args)[1])  # less --samples, --memory, --gpus
    if script == "launch/eval.py":
        cfg = compose_eval_config([f"model_dir={args[0]}", *args[1:]])
        check_task_names(cfg)
        return cfg
    if script == "launch/augment.py":
        return compose_augment_config(args)
    if script == "launch/merge.py" and all("=" in a for a in args):
        return check_recipe(recipe_from_config(compose_merge_config(args)))
    return parse_file_arguments(script, args)


@pytest.fixture
def stand_ins(tmp_path, tiny_pair, fake_flash_attn, monkeypatch) -> StandIns:
    monkeypatch.syspath_prepend(str(fake_flash_attn))  # this process's checks find flash_attn too
    return StandIns(tmp_path / "placeholders", tiny_pair["base"])


def test_the_readme_has_the_commands_it_promises():
    scripts = {script for script, _, _ in COMMANDS}
    assert {"launch/train.py", "launch/pipeline.py", "launch/submit.py", "launch/eval.py", "launch/merge.py",
            "launch/study.py", "launch/augment.py"} <= scripts, scripts
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("script,args,env", COMMANDS, ids=[" ".join([s, *a])[:80] for s, a, _ in COMMANDS])
def test_readme_command_runs_as_written(script, args, env, stand_ins, tmp_path, fake_flash_attn, monkeypatch):
    for name, value in env.items():  # the block's export lines; launched commands inherit them
        monkeypatch.setenv(name, value)
    checked = check_command(script, [stand_ins.replace(a) for a in args], tmp_path, fake_flash_attn)
    assert (checked is None) == ((script, " ".join(args)) in CHECKED_ELSEWHERE), \
        f"{script} {' '.join(args)}: check_command returned {checked!r}; check it or add it to CHECKED_ELSEWHERE"


MISTYPED = """
```bash
python launch/merge.py merge.yml outputs/merged --wrokers two
python launch/synergy.py outputs/merged --jsn outputs/merged-synergy.json
python launch/merge.py merge.yml outputs/merged --workers two
python launch/study.py outputs/pipelines/llama_instruct_grid outputs/pipelines/tiny
python launch/train.py +stage=cpt trainng.learning_rate=1e-4
python launch/submit.py pipeline=llama_instruct_cpt_sft_orpo_slerp cluster=slurm pipeline.start=/models/Llama \\
    model.attn_implementation=sdpa
python launch/submit.py pipeline=tiny cluster=slurm --dry-run data.cpt.pth=/data/corpus.jsonl
```
"""


@pytest.mark.parametrize("script,args,env", readme_commands(MISTYPED),
                         ids=["flag", "flag-2", "value", "arguments", "key", "demo-data", "key-2"])
def test_a_mistyped_readme_command_fails_the_check(script, args, env, stand_ins, tmp_path, fake_flash_attn):
    """The check above catches what a reader would trip on: a misspelt flag of a file-argument
    launcher, a misspelt key, an 8B preset left on the bundled demo data."""
    with pytest.raises((UserError, AssertionError)):
        check_command(script, [stand_ins.replace(a) for a in args], tmp_path, fake_flash_attn)
