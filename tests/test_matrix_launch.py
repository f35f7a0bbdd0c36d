"""Every launcher at first contact, as tables: `--help` and `-h` print its command lines (the
whole docstring) and its config groups with every preset in conf/, and exit 0; `--cfg` prints
the resolved config, holding the overrides given, as YAML, runs nothing and exits 0; a typo'd
key or an unknown flag still ends in one `error:` line. Each runs the real command with torch,
transformers, trl and deepspeed poisoned: none of this may import them.

    python -m pytest -q tests/test_matrix_launch.py
"""

from __future__ import annotations

import ast

import pytest
import yaml
from tests.support.env import REPO, assert_one_line_error, run_light

LAUNCHERS = sorted(p.name for p in (REPO / "launch").glob("*.py"))

# launcher -> the config groups its usage names (study and synergy compose no config)
GROUPS = {
    "train.py": ("model", "data", "deepspeed", "logging", "lora", "stage", "size"),
    "preview.py": ("model", "data", "deepspeed", "logging", "lora", "stage", "size"),
    "eval.py": ("eval",),
    "pipeline.py": ("pipeline", "cluster"),
    "submit.py": ("pipeline", "cluster"),
    "augment.py": ("augment", "data", "model"),
    "merge.py": ("merge",),
    "study.py": (),
    "synergy.py": (),
}


def test_every_launcher_has_a_row():
    assert sorted(GROUPS) == LAUNCHERS


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", LAUNCHERS)
def test_help_prints_the_command_lines_and_the_groups(script, flag):
    proc = run_light(script, flag)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    doc = ast.get_docstring(ast.parse((REPO / "launch" / script).read_text()))
    missing = [line for line in doc.splitlines() if line.strip() not in proc.stdout]
    assert not missing, f"usage lacks docstring lines (a description cut short?): {missing}"
    for group in GROUPS[script]:
        presets = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        listed = [line for line in proc.stdout.splitlines() if line.strip().lstrip("+").startswith(group + " ")]
        assert listed and all(name in proc.stdout for name in presets), (group, presets, proc.stdout[-3000:])


# (launcher, arguments ({tmp}: the case's directory), YAML path -> value the printout must hold)
CONFIG_CASES = [
    ("train.py", ["+stage=orpo", "training.learning_rate=3e-6", "--local_rank=0"],  # deepspeed's argument
     {"training.learning_rate": 3e-6, "stage.name": "orpo", "output_dir": "outputs/orpo-tiny"}),
    ("train.py", ["+stage=sft", "model=smollm2_135m", "training.max_steps=5", "--cfg", "job"],  # Hydra's form
     {"training.max_steps": 5, "model.name": "smollm2_135m"}),
    ("preview.py", ["+stage=sft", "--samples", "2", "--memory", "--gpus=8", "training.max_seq_length=512"],
     {"training.max_seq_length": 512, "stage.name": "sft"}),
    ("eval.py", ["outputs/sft-tiny", "limit=7", "eval=domain"], {"model_dir": "outputs/sft-tiny", "limit": 7}),
    ("pipeline.py", ["pipeline=smollm2_study", "root={tmp}/runs"], {"pipeline.name": "smollm2_study",
                                                                   "root": "{tmp}/runs"}),
    ("submit.py", ["pipeline=tiny", "root={tmp}/runs", "cluster.time=01:00:00", "--dry-run"],
     {"cluster.name": "slurm", "cluster.time": "01:00:00"}),
    ("submit.py", ["+stage=sft", "training.max_steps=3", "cluster.nodes=2", "output_dir={tmp}/sft"],
     {"training.max_steps": 3, "output_dir": "{tmp}/sft"}),
    ("augment.py", ["augment=rules", "output_dir={tmp}/aug", "seed=7"], {"augment.method": "rules", "seed": 7}),
    ("merge.py", ["merge=slerp_half", "merge.model=/m/a", "merge.base_model=/m/b", "output_dir={tmp}/m", "workers=1"],
     {"merge.merge_method": "slerp", "workers": 1, "output_dir": "{tmp}/m"}),
]


def at(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


@pytest.mark.parametrize("script, args, expected", CONFIG_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_cfg_prints_the_resolved_config_and_runs_nothing(script, args, expected, tmp_path):
    fill = lambda v: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v  # noqa: E731
    args = [fill(a) for a in args] + ([] if "--cfg" in args else ["--cfg"])
    proc = run_light(script, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    for key, value in expected.items():
        assert at(printed, key) == fill(value), (key, proc.stdout[-3000:])
    assert not list(tmp_path.iterdir()), "--cfg wrote files"


TYPO_CASES = [
    ("train.py", ["+stage=cpt", "training.lerning_rate=1e-4"], "unknown config key 'training.lerning_rate'"),
    ("preview.py", ["+stage=sft", "--sample", "2"], "unknown option '--sample': launch/preview.py takes key=value "
                                                 "overrides, --samples N, --memory, "),
    ("preview.py", ["+stage=sft", "--gpus", "0"], "--gpus needs a positive number (got '0')"),
    ("eval.py", ["outputs/sft-tiny", "batchsize=4"], "unknown config key 'batchsize'"),
    ("pipeline.py", ["pipeline=tiny", "cluster.gpu_per_node=2"], "unknown config key 'cluster.gpu_per_node'"),
    ("submit.py", ["pipeline=tiny", "roots=/tmp/x"], "unknown config key 'roots'"),
    ("submit.py", ["+stage=sft", "training.max_step=3"], "unknown config key 'training.max_step'"),
    ("augment.py", ["augment=rules", "output_dir=/tmp/x", "augment.rewrite.style=[qa]"],
     "unknown config key 'augment.rewrite.style'"),
    ("merge.py", ["merge=slerp_half", "merge.modle=/m/a", "output_dir=/tmp/m"], "unknown config key 'merge.modle'"),
    ("pipeline.py", ["pipeline=tiny", "--dryrun"], "unknown option '--dryrun': launch/pipeline.py takes key=value "
                                                  "overrides, --dry-run, --cfg and --help"),
    ("submit.py", ["pipeline=tiny", "--dry_run"], "unknown option '--dry_run': launch/submit.py takes key=value "
                                                  "overrides, --dry-run, --cfg and --help"),
]


@pytest.mark.parametrize("script, args, needle", TYPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TYPO_CASES)])
def test_a_mistake_with_cfg_is_one_line(script, args, needle, tmp_path):
    proc = run_light(script, *args, "--cfg", cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert not proc.stdout
