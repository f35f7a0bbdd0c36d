"""Every way a user can get `launch/pipeline.py` or `launch/submit.py` wrong, as one table:
(entry point, arguments, the one `error:` line's substrings). Each case runs the real command
(both start in well under a second: no torch) and asserts exit 2, no traceback, and nothing
written under the pipeline root: no step output, no job scripts.

    python -m pytest -q tests/test_matrix_pipeline.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.support.env import assert_one_line_error, launch

STEP = "pipeline tiny, step 'cpt': "
# (id, script, arguments ({tmp}: the case's directory), needles)
CASES = [
    # composition and the cluster
    ("unknown-pipeline", "pipeline.py", ["pipeline=nope"], ["unknown pipeline 'nope'", "tiny"]),
    ("unknown-cluster", "pipeline.py", ["cluster=cloud"], ["unknown cluster 'cloud'", "local", "slurm"]),
    ("typo-key", "pipeline.py", ["pipeline.stepz=[]"], ["pipeline.stepz"]),
    ("nodes-zero", "pipeline.py", ["cluster.nodes=0"], ["cluster.nodes=0: must be >= 1"]),
    ("gpus-zero", "pipeline.py", ["cluster.gpus_per_node=0"], ["cluster.gpus_per_node=0: must be >= 1"]),
    ("tasks-zero", "submit.py", ["cluster.tasks=0", "--dry-run"], ["cluster.tasks=0: must be >= 1"]),
    ("tasks-above-slots", "submit.py", ["cluster.tasks=20", "--dry-run"], ["cluster.tasks=20 is more than", "1 x 8"]),
    ("tasks-below-nodes", "submit.py", ["cluster.nodes=3", "cluster.tasks=2", "--dry-run"],
     ["cluster.tasks=2 is fewer than cluster.nodes=3"]),
    ("merge-tasks-zero", "submit.py", ["cluster.merge_tasks=0", "--dry-run"], ["cluster.merge_tasks=0: must be >= 1"]),
    ("cpus-zero", "submit.py", ["cluster.cpus_per_task=0", "--dry-run"], ["cluster.cpus_per_task=0: must be >= 1"]),
    ("port-privileged", "submit.py", ["cluster.master_port=80", "--dry-run"],
     ["cluster.master_port=80: must be in [1024, 65535]"]),
    ("signal-negative", "submit.py", ["cluster.signal_seconds=-1", "--dry-run"],
     ["cluster.signal_seconds=-1: must be >= 0"]),
    ("nodes-not-a-number", "submit.py", ["cluster.nodes=two", "--dry-run"], ["cluster.nodes", "'two'"]),
    ("local-on-slurm", "pipeline.py", ["cluster=slurm"], ["runs on this machine", "launch/submit.py"]),
    ("local-two-nodes", "pipeline.py", ["cluster.nodes=2"], ["runs on one node", "cluster=slurm"]),
    # the root every step writes under
    ("root-is-a-file", "pipeline.py", ["root={tmp}/a_file"], ["root=", "is an existing file"]),
    ("root-under-a-file", "submit.py", ["root={tmp}/a_file/runs", "--dry-run"], ["root=", "cannot be created"]),
    # steps
    ("unknown-step", "pipeline.py", ["step=nope"], ["unknown step 'nope' in pipeline tiny", "choose one of cpt, eval-cpt-epoch-1, eval-cpt, sft"]),
    ("unknown-stage", "pipeline.py", ["pipeline.steps.1.stage=rlhf"], ["step 'sft' has unknown stage 'rlhf'", "choose one of cpt, sft, mixed, dpo, orpo"]),
    ("input-from-later-step", "pipeline.py", ["pipeline.steps.0.input=sft"], ["does not come before it"]),
    ("duplicate-step", "pipeline.py", ["pipeline.steps.1.name=cpt"], ["two steps are named 'cpt'"]),
    ("reserved-step-name", "pipeline.py", ["pipeline.steps.0.name=jobs"], ["step name 'jobs' is reserved"]),
    ("merge-unknown-model", "pipeline.py", ["pipeline.steps.4.merge.model=mystery"],
     ["merge.model names 'mystery'", "not a step"]),
    ("merge-unknown-preset", "submit.py", ["pipeline.steps.5.merge.preset=dare", "--dry-run"],
     ["step 'slerp': unknown merge 'dare'"]),
    # evaluation steps and the study
    ("unknown-task", "submit.py", ["pipeline.eval.tasks=[materials_nope]", "--dry-run"],
     ["step 'eval-cpt-epoch-1'", "unknown task 'materials_nope'"]),
    ("merge-of-an-eval", "pipeline.py", ["pipeline.steps.5.merge.model=eval-orpo"],
     ["merge.model names 'eval-orpo', an evaluation step"]),
    ("epochs-not-whole", "pipeline.py", ["pipeline.steps.0.overrides=['training.num_train_epochs=1.5']"],
     ["cpt_epochs evaluates each CPT epoch", "whole epochs"]),
    ("eval-override-typo", "submit.py", ["pipeline.eval.overrides=['limt=3']", "--dry-run"],
     ["step 'eval-cpt-epoch-1'", "unknown config key 'limt'"]),
    ("start-not-a-model", "pipeline.py", ["pipeline.start={tmp}"], ["not a local model directory", "pipeline.start"]),
    # a step's own config, composed before any job starts
    ("step-value", "pipeline.py", ["pipeline.overrides=['training.learning_rate=-1']"],
     [STEP + "training.learning_rate=-1.0: must be > 0"]),
    ("step-typo", "submit.py", ["pipeline.overrides=['training.lerning_rate=1']", "--dry-run"],
     [STEP, "unknown config key 'training.lerning_rate'"]),
    ("merge-recipe-dtype", "submit.py",
     ["cluster=slurm", "pipeline.steps.5.merge.overrides=['merge.dtype=float13']", "--dry-run"],
     ["step 'slerp': dtype 'float13' is not supported", "bfloat16"]),
    ("merge-recipe-t", "submit.py",
     ["cluster=slurm", "pipeline.steps.4.merge.overrides=['merge.parameters.t=1.5']", "--dry-run"],
     ["step 'slerp-dpo'", "parameters.t has 1.5, outside [0, 1]"]),
    ("step-stage-value", "pipeline.py", ["pipeline.steps.2.overrides=['stage.beta=0']"],
     ["step 'dpo': stage.beta=0.0: must be > 0"]),
    ("override-unquoted", "pipeline.py", ["pipeline.overrides=[training.max_steps=4]"],
     ["cannot parse the override", "quote list items"]),
    # submit's single-stage form and status
    ("stage-value", "submit.py", ["+stage=cpt", "training.learning_rate=-1", "--dry-run"],
     ["training.learning_rate=-1.0: must be > 0"]),
    ("stage-cluster", "submit.py", ["+stage=cpt", "cluster.nodes=0", "--dry-run"], ["cluster.nodes=0: must be >= 1"]),
    ("status-of-nothing", "submit.py", ["status", "{tmp}/nothing"], ["no submitted jobs recorded", "submit first"]),
]


@pytest.mark.parametrize("case, script, args, needles", CASES, ids=[c[0] for c in CASES])
def test_pipeline_rejects(case, script, args, needles, tmp_path):
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    root = tmp_path / "runs"
    if not any(a.startswith("root=") for a in argv) and argv[:1] != ["status"]:
        argv.append(f"root={root}")
    proc = launch(script, argv, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert_one_line_error(proc, *needles)
    assert not root.exists(), sorted(str(p) for p in root.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
