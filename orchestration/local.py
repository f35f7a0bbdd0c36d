"""The local runner: a pipeline's steps in order on this machine, each as a process (training
under deepspeed), finished steps skipped.

    python launch/pipeline.py pipeline=tiny

Outputs go to `<root>/<pipeline>/<step>/`. A step whose output holds a finished model
(config.json, written last) is skipped, so a rerun continues where the last one stopped; a
step that failed reruns and resumes from its newest checkpoint (`resume=auto`).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from typing import List

from omegaconf import DictConfig

from core.config import REPO_ROOT
from core.errors import PREEMPTED_EXIT_CODE, UserError
from evaluation.parallel import gpu_count
from orchestration.checks import (
    check_global_batches, check_outside_models, check_resumes, check_step_environment, validate_step_configs,
)
from orchestration.config import training_world_size
from orchestration.job_scripts import print_resources, render_step, resource_row
from orchestration.planner import plan_pipeline
from orchestration.preflight import check_data, print_plan
from orchestration.steps import STEP_KINDS, STUDY_FILE, Plan, Step, step_env, write_plan_file


class StepFailed(UserError):
    exit_code = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_command(script: str, args: List[str], processes: int) -> List[str]:
    """An evaluation in `processes` processes, one per GPU (torch.distributed.run sets RANK,
    LOCAL_RANK and WORLD_SIZE; evaluation/parallel.py decides how many of them work)."""
    if processes == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script,
            *args]


def local_eval_processes(cluster: DictConfig) -> int:
    """One evaluation process per GPU this machine shows, up to cluster.gpus_per_node; 1 without GPUs
    (CPU ranks would only split a CPU's cores)."""
    return max(1, min(cluster.gpus_per_node, gpu_count()))


def deepspeed_command(script: str, args: List[str], cluster: DictConfig) -> List[str]:
    # A free port: other deepspeed runs on this machine may hold the default 29500.
    return ["deepspeed", "--num_gpus", str(cluster.gpus_per_node), "--master_port", str(free_port()), script, *args]


def per_gpu_command(script: str, args: List[str], cluster: DictConfig) -> List[str]:
    return eval_command(script, args, local_eval_processes(cluster))


def python_command(script: str, args: List[str], cluster: DictConfig) -> List[str]:
    return [sys.executable, script, *args]


LAUNCHERS = {"deepspeed": deepspeed_command, "per_gpu": per_gpu_command, "python": python_command}
"""StepKind.launcher -> (script, args, cluster) -> the command that runs a step here."""


def local_command(plan: Plan, step: Step, cluster: DictConfig) -> List[str]:
    kind = STEP_KINDS[step.kind]
    return LAUNCHERS[kind.launcher](str(REPO_ROOT / "launch" / kind.entry_point), step.args, cluster)


def check_dependencies(plan: Plan, step: Step, ready) -> None:
    """Each step `step` reads must be finished (`ready(dep_step)`) before it runs."""
    for dep in step.depends_on:
        dep_step = plan.select(dep)[0]
        if not ready(dep_step):
            raise UserError(
                f"pipeline {plan.pipeline}: step '{step.name}' needs step '{dep}' first ({dep_step.output_dir} "
                f"is not finished): run python launch/pipeline.py pipeline={plan.pipeline} step={dep}"
            )


def print_local_plan(plan: Plan, selected: List[Step], cluster: DictConfig, sources) -> None:
    """A dry run's output: what would run, what each step takes, and the pre-flight's findings."""
    todo = [s for s in selected if not s.is_complete()]
    for step in selected:
        if step.is_complete():
            print(f"step {step.name}: complete ({step.output_dir}), would be skipped")
    for step in todo:  # a step may read one that runs before it in this call
        check_dependencies(plan, step, lambda dep: dep.is_complete() or dep in todo[:todo.index(step)])
    rows = [resource_row(s, render_step(plan, s, cluster, None)[1]) for s in todo]
    print_resources(rows, sys.stdout, time_limits=False)
    print_plan(plan, todo, sources, {s.name: training_world_size(cluster) for s in todo}, sys.stdout)
    print(f"pipeline {plan.pipeline}: dry run, every check passed; nothing was run or written")


def run_local(cfg: DictConfig, dry_run: bool = False) -> Plan:
    """Run the pipeline's steps in order on this machine, skipping finished ones. A dry run makes
    every check, prints the plan and runs nothing."""
    if cfg.cluster.name != "local":
        raise UserError(
            f"launch/pipeline.py runs on this machine (cluster=local), not cluster={cfg.cluster.name}: "
            f"submit with python launch/submit.py pipeline={cfg.pipeline.name} cluster={cfg.cluster.name}"
        )
    if cfg.cluster.nodes != 1:
        raise UserError(f"cluster=local runs on one node, not cluster.nodes={cfg.cluster.nodes}: use cluster=slurm")
    plan = plan_pipeline(cfg)
    selected = plan.select(cfg.step)
    validate_step_configs(plan)
    check_step_environment(plan, [s for s in selected if not s.is_complete()])
    check_resumes(selected, cfg.cluster)
    check_global_batches(selected, cfg.cluster)
    check_outside_models(plan, selected)
    sources = check_data(plan, selected)
    if dry_run:
        print_local_plan(plan, selected, cfg.cluster, sources)
        return plan
    write_plan_file(plan)
    for step in selected:
        if step.is_complete():
            print(f"pipeline {plan.pipeline}: step {step.name} is complete ({step.output_dir}), skipping "
                  f"[{step.index + 1}/{len(plan.steps)}]", flush=True)
            continue
        check_dependencies(plan, step, lambda dep: dep.is_complete())
        cmd = local_command(plan, step, cfg.cluster)
        print(f"pipeline {plan.pipeline}: step {step.name}: {shlex.join(cmd)} [{step.index + 1}/{len(plan.steps)}]",
              flush=True)
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", **step_env(plan, step)))
        if code == PREEMPTED_EXIT_CODE:
            raise StepFailed(
                f"pipeline {plan.pipeline}: step '{step.name}' stopped on a signal after saving a checkpoint: "
                "rerun the same command to resume"
            )
        if code == UserError.exit_code:
            # The step already printed its one-line error; add where the pipeline stopped.
            print(
                f"pipeline {plan.pipeline}: stopped at step '{step.name}'; fix it and rerun the same command "
                "(finished steps are skipped)", file=sys.stderr, flush=True,
            )
            sys.exit(code)
        if code != 0 and step.is_complete():
            # Published during this call (finished steps are skipped above); the final file is
            # written last, so the output is whole: a rank that crashed at teardown costs nothing.
            print(f"pipeline {plan.pipeline}: step '{step.name}' exited {code} after publishing {step.output_dir}; "
                  "the output is complete, going on", file=sys.stderr, flush=True)
            continue
        if code != 0 or not step.is_complete():
            raise StepFailed(
                f"pipeline {plan.pipeline}: step '{step.name}' failed (exit {code}, see the output above): "
                f"fix the cause and rerun the same command; finished steps are skipped and '{step.name}' "
                "resumes from its newest checkpoint"
            )
    print(f"pipeline {plan.pipeline}: done, outputs in {plan.run_dir}", flush=True)
    if (plan.run_dir / STUDY_FILE).is_file():
        plots = " ".join(str(p) for p in sorted(plan.run_dir.glob("study_*.png")))
        print(f"pipeline {plan.pipeline}: study report {plan.run_dir / 'study.md'}; plots {plots}", flush=True)
    return plan
