"""The SLURM client: submits one batch job per pipeline step, chained with --dependency=afterok,
and reports the status of the jobs a submission recorded.

    python launch/submit.py pipeline=tiny cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8
    python launch/submit.py status pipeline=tiny

Each step's script (orchestration/job_scripts.py) is written into `<run dir>/jobs/` and kept
there, with the job logs and `jobs.jsonl` (one line per submitted job: step, job id, script,
log, output directory).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig

from core.errors import UserError
from orchestration.checks import (
    check_global_batches, check_outside_models, check_resumes, check_step_environment, validate_step_configs,
)
from orchestration.job_scripts import print_resources, python_known_here, python_of, render_step, resource_row
from orchestration.planner import plan_pipeline
from orchestration.preflight import check_data, print_plan
from orchestration.steps import JOBS_DIR, STEP_KINDS, Plan, Step, read_plan_file, write_plan_file
from train.config import compose_train_config

JOBS_FILE = "jobs.jsonl"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


# ---------------------------------------------------------------------------------------------
# submission
# ---------------------------------------------------------------------------------------------
@dataclass
class JobRecord:
    step: str
    job_id: str
    script: str
    log: str
    output_dir: str
    submitted: float


def require_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(
            "sbatch not found: this machine has no SLURM client; submit from a login node of the cluster, "
            "or run here with python launch/pipeline.py pipeline=<name> (or deepspeed launch/train.py +stage=<s>)"
        )
    return sbatch


def sbatch(script: Path) -> str:
    proc = subprocess.run([require_sbatch(), "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
        hint = " (a CPU-only partition? cluster.request_gpus=false)" if "gres" in reason.lower() else ""
        raise UserError(f"sbatch rejected {script}: {reason}: fix the cluster.* settings{hint} (see docs/slurm.md)")
    return proc.stdout.strip().split(";")[0]


def read_jobs(jobs_dir: Path) -> List[JobRecord]:
    path = jobs_dir / JOBS_FILE
    if not path.is_file():
        return []
    return [JobRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def latest_jobs(jobs_dir: Path) -> Dict[str, JobRecord]:
    """The newest job of each step."""
    return {r.step: r for r in read_jobs(jobs_dir)}


def record_job(jobs_dir: Path, record: JobRecord) -> None:
    with open(jobs_dir / JOBS_FILE, "a") as f:
        f.write(json.dumps(asdict(record)) + "\n")


def submit_plan(plan: Plan, steps: List[Step], cluster: DictConfig, dry_run: bool, out=sys.stdout) -> List[JobRecord]:
    """Submit `steps` (in order) as a chain of jobs; finished steps are skipped."""
    if cluster.name != "slurm":
        raise UserError(
            f"launch/submit.py needs cluster=slurm (got cluster={cluster.name}): add cluster=slurm, or run "
            f"here with python launch/pipeline.py pipeline={plan.pipeline}"
        )
    todo = [s for s in steps if not s.is_complete()]
    for step in steps:
        if step.is_complete():
            print(f"step {step.name}: complete ({step.output_dir}), not submitted", file=out)
    if not todo:
        print(f"pipeline {plan.pipeline}: every step is complete, nothing to submit", file=out)
        return []
    if python_known_here(cluster):  # dry runs too: this needs no cluster
        check_step_environment(plan, todo, python_of(cluster))
    check_resumes(todo, cluster)
    check_global_batches(todo, cluster)
    if not dry_run:
        require_sbatch()
    check_outside_models(plan, todo)
    sources = check_data(plan, todo)
    known = latest_jobs(plan.jobs_dir)
    states = {} if dry_run else job_states([r.job_id for r in known.values()])
    active = {name: r for name, r in known.items() if states.get(r.job_id, "") in ACTIVE_STATES}
    for step in todo:
        if step.name in active:
            r = active[step.name]
            raise UserError(
                f"step '{step.name}' already has job {r.job_id} ({states[r.job_id]}) writing {step.output_dir}: "
                f"wait for it (python launch/submit.py status), or scancel {r.job_id} first"
            )

    # Each job waits (afterok) for the jobs of the steps it reads, queued now or before: the
    # branches of a grid run side by side, and a failed step cancels only what depends on it.
    job_of = {name: r.job_id for name, r in active.items()}
    records, rows = [], []
    if not dry_run:
        plan.jobs_dir.mkdir(parents=True, exist_ok=True)
        write_plan_file(plan)
    for step in todo:
        waits = []
        for dep in step.depends_on:
            dep_step = plan.select(dep)[0]
            if dep_step.is_complete():
                continue
            if dep not in job_of:
                raise UserError(
                    f"step '{step.name}' needs step '{dep}' first ({dep_step.output_dir} is not finished and no job "
                    f"of it is queued): submit from step {dep} (drop step=) or run it first"
                )
            waits.append(job_of[dep])
        dependency = ":".join(waits) or None
        script, text = render_step(plan, step, cluster, dependency)
        if dry_run:
            print(f"# ---- {script} (not submitted)", file=out)
            print(text, file=out)
            rows.append(resource_row(step, text))
            records.append(JobRecord(step.name, "", str(script), "", str(step.output_dir), 0.0))
            job_of[step.name] = f"<job of {step.name}>"
            continue
        script.write_text(text)
        job_id = sbatch(script)
        log = str(script.parent / f"{step.index:02d}-{step.name}-{job_id}.log")
        record = JobRecord(step.name, job_id, str(script), log, str(step.output_dir), time.time())
        record_job(plan.jobs_dir, record)
        records.append(record)
        print(
            f"step {step.name}: job {job_id}"
            + (f" (after {dependency})" if dependency else "")
            + f" -> {step.output_dir}",
            file=out,
            flush=True,
        )
        job_of[step.name] = job_id
    if not dry_run:
        print(f"scripts and logs: {plan.jobs_dir}; follow with python launch/submit.py status", file=out)
    else:
        print_resources(rows, out)
        ranks = {row[0]: int(row[3]) for row in rows}  # each training job's tasks: its ranks
        print_plan(plan, todo, sources, ranks, out)
    return records


def stage_plan(train_args: List[str]) -> Plan:
    """A one-step plan for `submit.py +stage=<s> ...`: the run directory is its output_dir."""
    cfg = compose_train_config(train_args)
    out = Path(cfg.output_dir).expanduser().resolve()
    args = [a for a in train_args if not a.startswith("output_dir=")] + [f"output_dir={out}"]
    step = Step(cfg.stage.name, 0, out, "train", args, stage=cfg.stage.name)
    return Plan(f"stage-{cfg.stage.name}", out, [step])


def submit_pipeline(cfg: DictConfig, dry_run: bool) -> List[JobRecord]:
    plan = plan_pipeline(cfg)
    steps = plan.steps if cfg.step is None else plan.steps[plan.select(cfg.step)[0].index:][:1]
    validate_step_configs(plan)
    return submit_plan(plan, steps, cfg.cluster, dry_run)


# ---------------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------------
def _run(cmd: List[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def job_states(job_ids: List[str]) -> Dict[str, str]:
    """SLURM state of each job: squeue for queued jobs, then scontrol (recently finished), then
    sacct (accounting, when the cluster has it)."""
    ids = [j for j in job_ids if j]
    if not ids:
        return {}
    states: Dict[str, str] = {}
    text = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T"]) or ""
    for line in text.splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state
    for job in ids:
        if job in states:
            continue
        text = _run(["scontrol", "show", "job", "-o", job]) or ""
        for field in text.split():
            if field.startswith("JobState="):
                states[job] = field.split("=", 1)[1]
        if job not in states:
            text = _run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"]) or ""
            if text.strip():
                states[job] = text.split()[0]
    return states


def print_status(run_dir: Path, out=sys.stdout) -> List[Dict[str, str]]:
    records = read_jobs(run_dir / JOBS_DIR)
    if not records:
        raise UserError(
            f"no submitted jobs recorded in {run_dir / JOBS_DIR / JOBS_FILE}: submit first "
            "(python launch/submit.py pipeline=<name> cluster=slurm), or name the run: status pipeline=<name> root=<dir>"
        )
    states = job_states([r.job_id for r in records])
    described = read_plan_file(run_dir)
    rows = []
    for r in records:
        step = described.get(r.step, {})
        done = STEP_KINDS[step.get("kind", "train")].is_complete(Path(r.output_dir), step.get("tasks", []))
        rows.append(dict(
            step=r.step,
            job=r.job_id,
            state=states.get(r.job_id, "UNKNOWN"),
            output=r.output_dir + (" (finished)" if done else ""),
            log=r.log,
        ))
    widths = {k: max(len(k), *(len(row[k]) for row in rows)) for k in ("step", "job", "state")}
    print(f"{'step':<{widths['step']}}  {'job':<{widths['job']}}  {'state':<{widths['state']}}  output", file=out)
    for row in rows:
        print(f"{row['step']:<{widths['step']}}  {row['job']:<{widths['job']}}  {row['state']:<{widths['state']}}  "
              f"{row['output']}", file=out)
    print(f"scripts and logs: {run_dir / JOBS_DIR}", file=out)
    return rows
