"""Against a real SLURM (slurmctld + slurmd + munge on localhost, tests/support/slurm_cluster.py):

- a short pipeline (cpt -> sft, their SLERP, an evaluation of each, the study) submitted one
  step at a time, then whole: a step whose job is queued is refused; training jobs run 2 ranks
  that rendezvous through the SLURM variables as on two nodes; the jobs run in dependency order
  and end COMPLETED; every step's output loads; the merge (split across 2 tasks) is there;
  `status` lists them all;
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
from tests.support.env import REPO, SMALL_BATCH, assert_one_line_error
from tests.support.study import assert_study_matches_evals
from transformers import AutoModelForCausalLM

from core.errors import PREEMPTED_EXIT_CODE
from orchestration.slurm import read_jobs
from train.checkpoint import is_complete_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1800)]


def job_env(cluster):
    from tests.support.env import offline_env

    return cluster.env(offline_env())


def submit(cluster, *args, cwd=None, check=True):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), *args],
        capture_output=True, text=True, env=job_env(cluster), cwd=cwd or REPO, timeout=300,
    )
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr[-3000:]
    return proc


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


# cpt -> sft, their SLERP, each model evaluated on one task, and the study: every kind of job
# (the whole tiny grid runs locally, in tests/test_study.py).
SHORT_PIPELINE = [
    "pipeline=tiny", "pipeline.steps=[{name:cpt,stage:cpt},{name:sft,stage:sft},"
    "{name:slerp,merge:{base_model:cpt,model:sft,overrides:['merge.dtype=float32']}}]",
    "pipeline.eval.tasks=[materials_sft_mc_loglik]", "pipeline.eval.cpt_epochs=false",
    "cluster=slurm", "cluster.gpus_per_node=2", "cluster.request_gpus=false", "cluster.cpus_per_task=1",
    "cluster.merge_tasks=2", "cluster.resources.merge.cpus_per_task=1", "cluster.time=00:20:00",
    "pipeline.wandb=offline",
]
# The steps each job waits for: sft is submitted while cpt's job is queued; the rest once cpt and sft are done.
WAITS_FOR = {"cpt": [], "sft": ["cpt"], "eval-cpt": [], "eval-sft": [], "slerp": [], "eval-slerp": ["slerp"],
             "study": ["eval-cpt", "eval-sft", "eval-slerp"]}


def test_a_pipeline_runs_as_a_dependency_graph_of_jobs(slurm_cluster, tmp_path):
    """A short pipeline as SLURM jobs, submitted a step at a time and then whole: a step with a
    queued job is not submitted twice; each job waits for the jobs of the steps it reads,
    training jobs run 2 ranks, the merge 2 tasks, and the study comes last."""
    t0 = time.time()
    pipeline = [*SHORT_PIPELINE, f"root={tmp_path}"]
    run = tmp_path / "tiny"
    submit(slurm_cluster, *pipeline, "step=cpt")
    (cpt,) = read_jobs(run / "jobs")
    # The whole pipeline, while cpt's job is queued or running, is refused before anything is submitted.
    refused = submit(slurm_cluster, *pipeline, check=False)
    assert refused.returncode == 2
    assert_one_line_error(refused, f"step 'cpt' already has job {cpt.job_id}", f"scancel {cpt.job_id}")
    assert [j.job_id for j in read_jobs(run / "jobs")] == [cpt.job_id]
    # One step whose input is still queued waits for its job.
    submit(slurm_cluster, *pipeline, "step=sft")
    sft = read_jobs(run / "jobs")[-1]
    assert sft.step == "sft" and f"--dependency=afterok:{cpt.job_id}\n" in Path(sft.script).read_text()
    slurm_cluster.wait_jobs([cpt.job_id, sft.job_id], timeout=600)
    # The rest, once cpt and sft are done: those two are skipped.
    rest = submit(slurm_cluster, *pipeline).stdout
    assert "step cpt: complete" in rest and "step sft: complete" in rest, rest

    jobs = read_jobs(run / "jobs")
    plan = {s["name"]: s for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert sorted(j.step for j in jobs) == sorted(plan)
    infos = slurm_cluster.wait_jobs([j.job_id for j in jobs], timeout=900)
    wall = time.time() - t0
    states = {j.step: infos[j.job_id]["JobState"] for j in jobs}
    logs = {j.step: Path(j.log).read_text() if Path(j.log).exists() else "" for j in jobs}
    assert set(states.values()) == {"COMPLETED"}, (states, {s: l[-2000:] for s, l in logs.items() if s in states})

    # Dependencies: each job waited (afterok) for the jobs of the steps it reads that were not
    # finished when it was submitted, and started after they ended.
    job_of = {j.step: j for j in jobs}
    for job in jobs:
        deps = [job_of[d].job_id for d in WAITS_FOR[job.step]]
        script = Path(job.script).read_text()
        assert (f"--dependency=afterok:{':'.join(deps)}\n" in script) if deps else "--dependency" not in script, job.step
        for dep in deps:
            assert when(infos[job.job_id]["StartTime"]) >= when(infos[dep]["EndTime"]), (job.step, dep)

    # Training jobs ran 2 ranks, ZeRO-3 partitioned between them, from the SLURM variables.
    for step in ("cpt", "sft"):
        assert "[rank 0/2]" in logs[step] and "[rank 1/2]" in logs[step], logs[step][-2000:]
        assert AutoModelForCausalLM.from_pretrained(run / step).config.num_hidden_layers == 4
    assert f"path: {run / 'cpt'}" in (run / "sft" / "domainforge.yaml").read_text()
    # The merge ran as 2 workers and produced a model that loads.
    assert "2 worker(s)" in logs["slerp"], logs["slerp"][-2000:]
    merged = AutoModelForCausalLM.from_pretrained(run / "slerp")
    assert merged.num_parameters() == AutoModelForCausalLM.from_pretrained(run / "sft").num_parameters()
    # The study read every evaluation.
    assert_study_matches_evals(run, models={"cpt", "sft", "slerp"}, merges={("slerp", "slerp")},
                               plots=("study_bars.png", "study_synergy.png"))

    status = submit(slurm_cluster, "status", "pipeline=tiny", f"root={tmp_path}").stdout
    for job in jobs:
        assert re.search(rf"^{re.escape(job.step)}\s+{job.job_id}\s+COMPLETED\s+{re.escape(job.output_dir)} \(finished\)$",
                         status, flags=re.M), status
    # Resubmitting a finished pipeline submits nothing.
    again = submit(slurm_cluster, *pipeline)
    assert "every step is complete, nothing to submit" in again.stdout
    print(f"\nshort pipeline on SLURM ({len(jobs)} jobs, training on 2 ranks): {wall:.0f} s wall")


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
    # `status` of a single-stage run, by its directory.
    status = submit(slurm_cluster, "status", str(out)).stdout
    assert re.search(rf"^cpt\s+{job.job_id}\s+COMPLETED\s+{re.escape(str(out))} \(finished\)$", status, flags=re.M), status


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
