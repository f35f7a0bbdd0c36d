"""Against a real SLURM (slurmctld + slurmd + munge on localhost, tests/support/slurm_cluster.py):

- the `tiny` pipeline submitted with 2 tasks per training job: 2 ranks rendezvous through the
  SLURM variables as on two nodes; the jobs run in dependency order and end COMPLETED; every
  step's output loads; the merge (split across 2 tasks) is there; `status` lists them all;
- a training job that gets SLURM's warning signal after its first checkpoint saves a
  checkpoint, requeues itself, resumes from that checkpoint and ends with the right step count;
- a job whose requeue SLURM refuses ends FAILED, and its afterok dependent is cancelled.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from tests.support.env import REPO, SMALL_BATCH
from tests.support.study import assert_study_matches_evals
from transformers import AutoModelForCausalLM

from core.errors import PREEMPTED_EXIT_CODE
from orchestration.slurm import read_jobs
from train.checkpoint import is_complete_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]


def job_env(cluster):
    from tests.support.env import offline_env

    return cluster.env(offline_env())


def submit(cluster, *args, cwd=None):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), *args],
        capture_output=True, text=True, env=job_env(cluster), cwd=cwd or REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_tiny_study_runs_as_a_dependency_graph_of_jobs(slurm_cluster, tmp_path):
    """The tiny grid (4 stages, 3 merges, 8 evaluations, the study) as SLURM jobs: each waits
    for the jobs of the steps it reads, training jobs run 2 ranks, and the study comes last."""
    t0 = time.time()
    submit(slurm_cluster, "pipeline=tiny", "cluster=slurm", f"root={tmp_path}", "cluster.gpus_per_node=2",
           "cluster.request_gpus=false", "cluster.cpus_per_task=1", "cluster.merge_tasks=2",
           "cluster.resources.merge.cpus_per_task=1", "cluster.time=00:20:00", "pipeline.wandb=offline")
    run = tmp_path / "tiny"
    jobs = read_jobs(run / "jobs")
    plan = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert [j.step for j in jobs] == list(plan)
    infos = slurm_cluster.wait_jobs([j.job_id for j in jobs], timeout=1500)
    wall = time.time() - t0
    states = {j.step: infos[j.job_id]["JobState"] for j in jobs}
    logs = {j.step: Path(j.log).read_text() if Path(j.log).exists() else "" for j in jobs}
    assert set(states.values()) == {"COMPLETED"}, (states, {s: l[-2000:] for s, l in logs.items() if s in states})

    # Dependencies: each job waited (afterok) for the jobs of the steps it reads, and started after they ended.
    job_of = {j.step: j for j in jobs}
    for job in jobs:
        deps = [job_of[d].job_id for d in plan[job.step]["depends_on"]]
        if deps:
            assert f"--dependency=afterok:{':'.join(deps)}\n" in Path(job.script).read_text(), job.step
        for dep in deps:
            assert when(infos[job.job_id]["StartTime"]) >= when(infos[dep]["EndTime"]), (job.step, dep)

    # Training jobs ran 2 ranks, ZeRO-3 partitioned between them, from the SLURM variables.
    for step in ("cpt", "sft", "dpo", "orpo"):
        assert "[rank 0/2]" in logs[step] and "[rank 1/2]" in logs[step], logs[step][-2000:]
        assert AutoModelForCausalLM.from_pretrained(run / step).config.num_hidden_layers == 4
    assert f"path: {run / 'cpt'}" in (run / "sft" / "domainforge.yaml").read_text()
    # The merges ran as 2 workers and produced models that load.
    assert "2 worker(s)" in logs["slerp"], logs["slerp"][-2000:]
    merged = AutoModelForCausalLM.from_pretrained(run / "slerp")
    assert merged.num_parameters() == AutoModelForCausalLM.from_pretrained(run / "orpo").num_parameters()
    # The study read every evaluation.
    assert_study_matches_evals(run)

    status = submit(slurm_cluster, "status", "pipeline=tiny", f"root={tmp_path}").stdout
    for job in jobs:
        assert re.search(rf"^{re.escape(job.step)}\s+{job.job_id}\s+COMPLETED\s+{re.escape(job.output_dir)} \(finished\)$",
                         status, flags=re.M), status
    # Resubmitting a finished pipeline submits nothing.
    again = submit(slurm_cluster, "pipeline=tiny", "cluster=slurm", f"root={tmp_path}", "cluster.request_gpus=false", "cluster.cpus_per_task=1")
    assert "every step is complete, nothing to submit" in again.stdout
    print(f"\ntiny study on SLURM ({len(jobs)} jobs, training on 2 ranks): {wall:.0f} s wall")


def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    out = tmp_path / "cpt"
    max_steps, save_steps = 30, 5
    submit(slurm_cluster, "+stage=cpt", f"output_dir={out}", *SMALL_BATCH, f"training.max_steps={max_steps}",
           f"training.save_steps={save_steps}", "training.save_total_limit=null", "training.max_seq_length=128",
           "cluster=slurm", "cluster.gpus_per_node=2", "cluster.request_gpus=false", "cluster.cpus_per_task=1", "cluster.time=00:20:00")
    (job,) = read_jobs(out / "jobs")

    # After the first periodic checkpoint, send what SLURM sends before a time limit.
    first = out / "checkpoints" / f"checkpoint-{save_steps}"
    deadline = time.time() + 300
    while not is_complete_checkpoint(first):
        assert time.time() < deadline, Path(job.log).read_text()[-3000:]
        assert slurm_cluster.job_info(job.job_id).get("JobState") in ("PENDING", "RUNNING"), Path(job.log).read_text()[-3000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, env=job_env(slurm_cluster))

    info = slurm_cluster.wait_jobs([job.job_id], timeout=600)[job.job_id]
    log = Path(job.log).read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "1", info

    saved = re.search(r"preemption: SIGUSR1 received, saving checkpoint-(\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert save_steps <= step < max_steps
    assert f"requeueing job {job.job_id}" in log
    # The requeued run resumed from exactly the checkpoint the signal wrote.
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'}" in log, log[-3000:]
    # ... and finished with the right step count: the final state counts max_steps, and the
    # second run trained only the remaining steps.
    last = out / "checkpoints" / f"checkpoint-{max_steps}" / "trainer_state.json"
    state = json.loads(last.read_text())
    assert state["global_step"] == max_steps and state["max_steps"] == max_steps
    logged_steps = sorted({row["step"] for row in state["log_history"] if "loss" in row})
    assert logged_steps == list(range(1, max_steps + 1))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_scancel_is_not_undone_by_a_requeue(slurm_cluster, tmp_path):
    """scancel sends SIGTERM like a preemption does; the job must stay cancelled."""
    out = tmp_path / "cpt"
    submit(slurm_cluster, "+stage=cpt", f"output_dir={out}", *SMALL_BATCH, "training.max_steps=500", "training.max_seq_length=128",
           "cluster=slurm", "cluster.gpus_per_node=2", "cluster.request_gpus=false", "cluster.cpus_per_task=1")
    (job,) = read_jobs(out / "jobs")
    log = Path(job.log)
    deadline = time.time() + 300
    while "[rank 1/2]" not in (log.read_text() if log.exists() else ""):  # training is under way
        assert time.time() < deadline and slurm_cluster.job_info(job.job_id)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.5)
    subprocess.run(["scancel", job.job_id], check=True, env=job_env(slurm_cluster))
    info = slurm_cluster.wait_jobs([job.job_id], timeout=120)[job.job_id]
    time.sleep(15)  # a requeued job would be eligible again after cred_expire (10 s here)
    info = slurm_cluster.job_info(job.job_id)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log.read_text()[-3000:]
    assert "requeueing" not in log.read_text()


def test_a_refused_requeue_fails_the_job_and_cancels_its_dependents(slurm_cluster, tmp_path):
    """A job submitted with --no-requeue whose ranks stop for a requeue: SLURM
    refuses `scontrol requeue`, and the job must end FAILED, not COMPLETED, so that an afterok
    dependent is cancelled instead of starting on a model that was never written. The ranks are
    a stand-in interpreter that exits as a preempted rank does (75), to keep this test short."""
    ranks = tmp_path / "bin" / "python"
    ranks.parent.mkdir()
    ranks.write_text(f"#!/bin/sh\nexit {PREEMPTED_EXIT_CODE}\n")
    ranks.chmod(0o755)
    out = tmp_path / "cpt"
    submit(slurm_cluster, "+stage=cpt", f"output_dir={out}", "cluster=slurm", "cluster.request_gpus=false",
           "cluster.gpus_per_node=1", "cluster.cpus_per_task=1", "cluster.requeue=false", "cluster.sbatch_args=[--no-requeue]",
           f"cluster.python={ranks}")
    (job,) = read_jobs(out / "jobs")
    dependent = subprocess.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{job.job_id}", "--kill-on-invalid-dep=yes",
         f"--output={tmp_path / 'dependent.log'}", "--wrap", f"touch {tmp_path / 'dependent-ran'}"],
        capture_output=True, text=True, env=job_env(slurm_cluster), check=True,
    ).stdout.strip().split(";")[0]

    info = slurm_cluster.wait_jobs([job.job_id], timeout=120)[job.job_id]
    log = Path(job.log).read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", f"{PREEMPTED_EXIT_CODE}:0", "0"), log
    assert f"SLURM refused to requeue job {job.job_id}" in log
    deadline = time.time() + 60
    while slurm_cluster.job_info(dependent).get("JobState") != "CANCELLED":
        assert time.time() < deadline, slurm_cluster.job_info(dependent)
        time.sleep(1)
    assert not (tmp_path / "dependent-ran").exists()
