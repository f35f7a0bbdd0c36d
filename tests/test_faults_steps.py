"""A step whose process crashes while it tears down, after its final save (docs/failure-modes.md):
the model is published (config.json last), so the local pipeline goes on and the SLURM job ends
as done; a crash before the publish still stops both. The steps are stand-ins that publish (or
not) and then really abort (SIGABRT, as a native thread aborting at exit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration import local
from orchestration.config import compose_pipeline_job
from orchestration.job_scripts import render_step
from orchestration.planner import plan_pipeline

TWO_STEPS = ["pipeline=tiny", "pipeline.steps=[{name:cpt,stage:cpt},{name:sft,stage:sft}]", "pipeline.eval.tasks=[]"]
ABORT = 128 + 6  # a shell's status for a process killed by SIGABRT


def publish_then_abort(output_dir: Path, publish: bool) -> str:
    """Python that writes the step's config.json (the last file of a final save) when `publish`,
    then aborts."""
    write = (f"out = pathlib.Path({str(output_dir)!r}); out.mkdir(parents=True, exist_ok=True); "
             "(out / 'config.json').write_text('{}'); ") if publish else ""
    return f"import os, pathlib; {write}os.abort()"


def run_with_stand_in_steps(tmp_path, monkeypatch, cpt_publishes: bool):
    """launch/pipeline.py's run_local on cpt -> sft, each step a process: cpt aborts (after
    publishing or not), sft publishes and exits 0. Returns the steps started, in order."""
    started = []

    def command(plan, step, cluster):
        started.append(step.name)
        if step.name == "cpt":
            return [sys.executable, "-c", publish_then_abort(step.output_dir, cpt_publishes)]
        return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(step.output_dir)!r}); "
                                      "p.mkdir(parents=True, exist_ok=True); (p / 'config.json').write_text('{}')"]

    monkeypatch.setattr(local, "local_command", command)
    local.run_local(compose_pipeline_job([*TWO_STEPS, f"root={tmp_path}"]))
    return started


def test_local_step_that_aborts_after_publishing_counts_as_done(tmp_path, monkeypatch, capsys):
    assert run_with_stand_in_steps(tmp_path, monkeypatch, cpt_publishes=True) == ["cpt", "sft"]
    captured = capsys.readouterr()
    cpt = tmp_path / "tiny" / "cpt"
    assert f"step 'cpt' exited -6 after publishing {cpt}; the output is complete, going on" in captured.err
    assert "pipeline tiny: done" in captured.out


def test_local_step_that_aborts_before_publishing_stops_the_pipeline(tmp_path, monkeypatch):
    with pytest.raises(local.StepFailed, match="step 'cpt' failed \\(exit -6"):
        run_with_stand_in_steps(tmp_path, monkeypatch, cpt_publishes=False)
    assert not (tmp_path / "tiny" / "sft").exists()


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("publishes, status", [(True, 0), (False, ABORT)])
def test_slurm_training_job_that_aborts_after_publishing_counts_as_done(tmp_path, publishes, status):
    """The rendered train.sbatch, run whole in bash with stand-in srun and scontrol: srun's ranks
    publish the model (or not) and abort; the job exits 0 (afterok dependents start) only when
    the model was published during the job."""
    cfg = compose_pipeline_job([*TWO_STEPS, "cluster=slurm", f"root={tmp_path}"])
    plan = plan_pipeline(cfg)
    step = plan.steps[0]
    script = render_step(plan, step, cfg.cluster, None)[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = publish_then_abort(step.output_dir, publishes)
    stand_in(bin_dir, "srun", f"sleep 0.05; exec {sys.executable} -c \"{python}\"")
    stand_in(bin_dir, "scontrol", 'case "$1 $2" in "show hostnames") echo node1;; '
                                  '"show job") echo "JobId=42 JobState=RUNNING";; esac')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node1")
    env.pop("SLURM_RESTART_COUNT", None)
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stdout + proc.stderr
    done = (f"domainforge: a rank exited with status {ABORT} after the final model was published in "
            f"{step.output_dir}; it is complete, the job counts as done")
    assert (done in proc.stdout) is publishes, proc.stdout
    assert "requeue" not in proc.stdout
