"""Against a real SLURM (slurmctld + slurmd + munge on localhost, tests/support/slurm_cluster.py):

- a short pipeline (cpt -> sft, their SLERP, an evaluation of each, the study) submitted one
  step at a time, then whole: a step whose job is queued is refused; training jobs run 2 ranks
  that rendezvous through the SLURM variables as on two nodes; the jobs run in dependency order
  and end COMPLETED; every step's output loads; the merge (split across 2 tasks) is there;
  `status` lists them all;
- the ways SLURM stops a training job, each against the same job left alone (fault-matrix cells):
  the time-limit warning (checkpoint, requeue, resume), `scancel --signal=TERM --batch`
  (checkpoint, cancelled), a preemption by a higher-priority partition (checkpoint, requeue,
  resume), a plain scancel (checkpoint within KillWait, cancelled);
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
from tests.support.trajectory import assert_same_trajectory, read_trajectory
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
    logs = {j.step: Path(j.log).read_text(errors="replace") if Path(j.log).exists() else "" for j in jobs}
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


# One CPT job on 2 ranks, checkpointing every 5 of its 30 steps: the interrupted cells below and
# the same job left alone (run once per module).
MAX_STEPS, SAVE_STEPS = 30, 5
CPT_JOB = ["+stage=cpt", *SMALL_BATCH, f"training.max_steps={MAX_STEPS}", f"training.save_steps={SAVE_STEPS}",
           "training.save_total_limit=null", "training.max_seq_length=128", "cluster=slurm", "cluster.gpus_per_node=2",
           "cluster.request_gpus=false", "cluster.cpus_per_task=1", "cluster.time=00:20:00"]


def submit_cpt(cluster, out):
    submit(cluster, *CPT_JOB, f"output_dir={out}")
    (job,) = read_jobs(out / "jobs")
    return job


def wait_for_first_checkpoint(cluster, job, out):
    first = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    deadline = time.time() + 300
    while not is_complete_checkpoint(first):
        log = Path(job.log).read_text(errors="replace") if Path(job.log).exists() else ""
        assert time.time() < deadline, log[-3000:]
        assert cluster.job_info(job.job_id).get("JobState") in ("PENDING", "RUNNING"), log[-3000:]
        time.sleep(0.5)


@pytest.fixture(scope="module")
def left_alone(slurm_cluster, tmp_path_factory):
    """The CPT job run to its end without interruption: its steps, learning rates, tokens and losses."""
    out = tmp_path_factory.mktemp("left-alone") / "cpt"
    job = submit_cpt(slurm_cluster, out)
    info = slurm_cluster.wait_jobs([job.job_id], timeout=600)[job.job_id]
    assert info["JobState"] == "COMPLETED", Path(job.log).read_text(errors="replace")[-3000:]
    trajectory = read_trajectory(out)
    assert trajectory.global_step == MAX_STEPS
    return trajectory


def assert_same_as_left_alone(out, left_alone):
    """The interrupted run finished as the run left alone did: every step, its learning rate,
    tokens seen and loss, and the final model."""
    assert_same_trajectory(read_trajectory(out), left_alone)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


@pytest.mark.faults(ci=True)
def test_warning_signal_checkpoints_requeues_and_resumes(slurm_cluster, left_alone, tmp_path):
    """SLURM's time-limit warning (--signal=B:USR1) after the first checkpoint: a checkpoint at the
    next step, a requeue, a resume from it, and the same run as left alone."""
    out = tmp_path / "cpt"
    job = submit_cpt(slurm_cluster, out)
    wait_for_first_checkpoint(slurm_cluster, job, out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, env=job_env(slurm_cluster))

    info = slurm_cluster.wait_jobs([job.job_id], timeout=600)[job.job_id]
    log = Path(job.log).read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "1", info

    saved = re.search(r"preemption: SIGUSR1 received, saving checkpoint-(\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert SAVE_STEPS < step < MAX_STEPS  # no work lost beyond the signal
    assert re.search(rf"SIGUSR1 \(the time-limit warning, or scancel --signal=USR1 --batch\): srun exited with status "
                     rf"\d+, checkpoint-{step} was written by this job; requeueing job {job.job_id}", log), log[-3000:]
    # The requeued run resumed from exactly the checkpoint the signal wrote, and trained only the rest.
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'}" in log, log[-3000:]
    assert_same_as_left_alone(out, left_alone)
    # `status` of a single-stage run, by its directory.
    status = submit(slurm_cluster, "status", str(out)).stdout
    assert re.search(rf"^cpt\s+{job.job_id}\s+COMPLETED\s+{re.escape(str(out))} \(finished\)$", status, flags=re.M), status


@pytest.mark.faults(ci=True)
def test_sigterm_to_the_batch_script_checkpoints_and_cancels(slurm_cluster, left_alone, tmp_path):
    """`scancel --signal=TERM --batch` after the first checkpoint: the ranks get SIGUSR1 (srun would
    turn SIGTERM into SIGKILL), save at the next step, and the job ends CANCELLED, not requeued,
    with no final model; its steps are those of the run left alone."""
    out = tmp_path / "cpt"
    job = submit_cpt(slurm_cluster, out)
    wait_for_first_checkpoint(slurm_cluster, job, out)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job.job_id], check=True, env=job_env(slurm_cluster))

    slurm_cluster.wait_jobs([job.job_id], timeout=300)
    time.sleep(12)  # a requeued job would be eligible again after cred_expire (10 s here)
    info = slurm_cluster.job_info(job.job_id)
    log = Path(job.log).read_text(errors="replace")
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-3000:]
    saved = re.search(r"preemption: SIGUSR1 received, saving checkpoint-(\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert SAVE_STEPS < step < MAX_STEPS and is_complete_checkpoint(out / "checkpoints" / f"checkpoint-{step}")
    assert re.search(rf"SIGTERM reached the batch script of job {job.job_id} \(scancel --signal=TERM --batch\): srun "
                     rf"exited with status \d+, checkpoint-{step} was written by this job; cancelling the job, not requeueing",
                     log), log[-3000:]
    assert "forcing job termination" not in log and "requeueing job" not in log
    assert not (out / "config.json").exists()  # no final model from a stopped run
    stopped = read_trajectory(out)
    assert stopped.global_step == step
    assert_same_trajectory(stopped, left_alone, upto=step)


@pytest.mark.faults
def test_preemption_checkpoints_requeues_and_resumes(slurm_cluster, left_alone, tmp_path):
    """A job of the higher-priority `urgent` partition preempts the CPT job (PreemptMode=REQUEUE,
    GraceTime): SLURM sends SIGTERM to the ranks only, they save at the next step, the batch script
    requeues, the urgent job runs, and the CPT job resumes and ends as the run left alone."""
    out = tmp_path / "cpt"
    job = submit_cpt(slurm_cluster, out)
    wait_for_first_checkpoint(slurm_cluster, job, out)
    urgent = subprocess.run(
        ["sbatch", "--parsable", "--partition=urgent", "--exclusive", f"--output={tmp_path / 'urgent.log'}",
         "--wrap", "sleep 2"], capture_output=True, text=True, env=job_env(slurm_cluster), check=True,
    ).stdout.strip().split(";")[0]

    info = slurm_cluster.wait_jobs([job.job_id, urgent], timeout=600)
    log = Path(job.log).read_text(errors="replace")
    assert info[job.job_id]["JobState"] == "COMPLETED", log[-3000:]
    assert info[job.job_id]["Restarts"] == "1", info
    assert info[urgent]["JobState"] == "COMPLETED", info[urgent]
    saved = re.search(r"preemption: SIGTERM received, saving checkpoint-(\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert SAVE_STEPS < step < MAX_STEPS
    assert re.search(rf"domainforge: preempted \(PreemptTime=[0-9T:-]+\): srun exited with status \d+, "
                     rf"checkpoint-{step} was written by this job; requeueing job {job.job_id}", log), log[-3000:]
    assert "forcing job termination" not in log
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'}" in log, log[-3000:]
    # The urgent job ran while the CPT job waited in the queue.
    assert when(info[job.job_id]["StartTime"]) >= when(info[urgent]["EndTime"])
    assert_same_as_left_alone(out, left_alone)


@pytest.mark.faults
def test_a_plain_scancel_checkpoints_within_killwait_and_stays_cancelled(slurm_cluster, left_alone, tmp_path):
    """A plain scancel: SLURM sends SIGTERM to every process of the job and SIGKILL KillWait (30 s)
    later. srun says "forcing job termination", but the job is already ending and its ranks live
    on (measured on SLURM 22.05): they save at the next step; the job stays CANCELLED, with no
    final model, and its steps are those of the run left alone."""
    out = tmp_path / "cpt"
    job = submit_cpt(slurm_cluster, out)
    wait_for_first_checkpoint(slurm_cluster, job, out)
    subprocess.run(["scancel", job.job_id], check=True, env=job_env(slurm_cluster))
    slurm_cluster.wait_jobs([job.job_id], timeout=120)
    time.sleep(12)  # a requeued job would be eligible again after cred_expire (10 s here)
    info = slurm_cluster.job_info(job.job_id)
    log = Path(job.log).read_text(errors="replace")
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log[-3000:]
    assert "srun: forcing job termination" in log
    saved = re.search(r"preemption: SIG(?:TERM|USR1) received, saving checkpoint-(\d+)", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert SAVE_STEPS < step < MAX_STEPS and is_complete_checkpoint(out / "checkpoints" / f"checkpoint-{step}")
    assert re.search(rf"SLURM is ending job {job.job_id} \(JobState=[A-Z]+\): the ranks had SIGTERM and KillWait "
                     rf"seconds to save; srun exited with status \d+, checkpoint-{step} was written by this job", log), log[-3000:]
    assert "requeueing" not in log and not (out / "config.json").exists()
    stopped = read_trajectory(out)
    assert stopped.global_step == step
    assert_same_trajectory(stopped, left_alone, upto=step)


@pytest.mark.faults(ci=True)
def test_two_nodes_stopped_by_the_warning_resume_on_one(two_slurm_nodes, left_alone, tmp_path):
    """CPT on 2 real SLURM nodes x 1 rank (each slurmd in its own network namespace, gloo between
    them): the time-limit warning after the first checkpoint saves at the next step; resubmitted on
    1 node, the job converts the checkpoint to the universal format, keeps the global batch (2 x 1
    -> 1 x 2) and ends as the run left alone (2 ranks on one node)."""
    cluster, out = two_slurm_nodes, tmp_path / "cpt"
    # cluster.max_requeues=0: the stopped job does not requeue itself on 2 nodes; the user resubmits on 1.
    submit(cluster, *CPT_JOB, f"output_dir={out}", "cluster.nodes=2", "cluster.gpus_per_node=1", "cluster.max_requeues=0")
    (job,) = read_jobs(out / "jobs")
    wait_for_first_checkpoint(cluster, job, out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, env=job_env(cluster))
    info = cluster.wait_jobs([job.job_id], timeout=300)[job.job_id]
    log = Path(job.log).read_text(errors="replace")
    assert (info["JobState"], info["NumNodes"]) == ("FAILED", "2"), log[-3000:]
    first, second = cluster.nodes  # the rendezvous: the first host of the node list, 1 rank per node
    assert f"master {first}:" in log and "[rank 0/2]" in log and "[rank 1/2]" in log, log[-3000:]
    assert "the cap is cluster.max_requeues=0: not requeueing" in log
    step = int(re.search(r"preemption: SIGUSR1 received, saving checkpoint-(\d+)", log).group(1))
    assert SAVE_STEPS < step < MAX_STEPS and not (out / "config.json").exists()

    # The same command on 1 node, without the batch settings: the checkpoint's global batch is kept.
    on_one = [a for a in CPT_JOB if a != "training.gradient_accumulation_steps=1"]
    submit(cluster, *on_one, f"output_dir={out}", "cluster.nodes=1", "cluster.gpus_per_node=1")
    resumed = read_jobs(out / "jobs")[-1]
    info = cluster.wait_jobs([resumed.job_id], timeout=600)[resumed.job_id]
    log = Path(resumed.log).read_text(errors="replace")
    assert (info["JobState"], info["NumNodes"]) == ("COMPLETED", "1"), log[-3000:]
    assert f"checkpoint-{step} was written on 2 ranks and this run has 1" in log, log[-3000:]
    assert "the global batch stays 2" in log and "resume: converted" in log
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{step}'}" in log
    assert_same_as_left_alone(out, left_alone)


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
    log = Path(job.log).read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", f"{PREEMPTED_EXIT_CODE}:0", "0"), log
    assert f"SLURM refused to requeue job {job.job_id}" in log
    deadline = time.time() + 60
    while slurm_cluster.job_info(dependent).get("JobState") != "CANCELLED":
        assert time.time() < deadline, slurm_cluster.job_info(dependent)
        time.sleep(1)
    assert not (tmp_path / "dependent-ran").exists()
