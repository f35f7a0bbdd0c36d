"""The sbatch script of each pipeline step: orchestration/sbatch/<template> (train, merge, eval,
augment or task.sbatch: each step kind names its own in STEP_KINDS, orchestration/steps.py) filled
with the step's command, environment, and the tasks, nodes and GPUs its kind needs.
orchestration/slurm.py writes them into `<run dir>/jobs/` and submits them.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Dict, List, Optional

from omegaconf import DictConfig

from core.config import REPO_ROOT
from core.errors import PREEMPTED_EXIT_CODE
from core.secrets import redact
from orchestration.config import check_ranks, kind_cluster, training_world_size
from orchestration.steps import STEP_KINDS, Plan, Step, step_env
from train.augment.methods import augment_method


class SbatchTemplate(Template):
    """`@{name}` placeholders only: bash's own `$` and `${...}` pass through untouched."""

    delimiter = "@"
    pattern = r"@\{(?P<braced>[a-z_]+)\}|(?P<escaped>@@)|(?P<named>(?!))|(?P<invalid>(?!))"


def render_template(name: str, values: Dict[str, object]) -> str:
    text = (Path(__file__).parent / "sbatch" / name).read_text()
    # A secret typed into an override (or setup line) must not land in a script on disk.
    return redact(SbatchTemplate(text).substitute({k: str(v) for k, v in values.items()}))


def common_sbatch_lines(cluster: DictConfig, dependency: Optional[str]) -> List[str]:
    lines = []
    for option in ("partition", "account", "qos"):
        if cluster.get(option):
            lines.append(f"--{option}={cluster[option]}")
    if cluster.mem is not None:  # "0" is a value: all of the node's memory
        lines.append(f"--mem={cluster.mem}")
    if cluster.cpus_per_task:
        lines.append(f"--cpus-per-task={cluster.cpus_per_task}")
    if cluster.requeue:
        lines.append("--requeue")
    if dependency:
        # If the previous job fails, cancel this one instead of leaving it pending forever, so
        # resubmitting the pipeline is all it takes to continue.
        lines += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    lines += list(cluster.sbatch_args)
    return lines


def srun_cpus_line(cluster: DictConfig) -> str:
    """srun does not take --cpus-per-task from sbatch since SLURM 22.05 (its release notes):
    without this its tasks get one core each, whatever the allocation."""
    return f"export SRUN_CPUS_PER_TASK={cluster.cpus_per_task}" if cluster.cpus_per_task else ""


def python_of(cluster: DictConfig) -> str:
    """cluster.python; else `python` from the PATH the setup made (the environment it activates),
    or without a setup the interpreter running submit.py."""
    return cluster.python or ("python" if cluster.setup else sys.executable)


def python_known_here(cluster: DictConfig) -> bool:
    """Whether this node can ask the jobs' interpreter what it has installed: not when it is a bare
    name that only the jobs' setup lines (module load, venv activation) put on PATH."""
    return not (cluster.setup and not Path(python_of(cluster)).is_absolute())


def setup_lines(cluster: DictConfig) -> str:
    """cluster.setup before strict mode (conda's and many module scripts read unset variables and
    test commands that fail); each line is checked, so a failed `module load` ends the job here."""
    if not cluster.setup:
        return ""
    lines = ["# cluster.setup, before strict mode: site scripts often read unset variables"]
    for line in cluster.setup:
        failed = shlex.quote(f"domainforge: cluster.setup line failed: {line}")
        lines.append(f"{{ {line}\n}} || {{ echo {failed} >&2; exit 1; }}")  # the newline ends a trailing comment
    return "\n".join(lines)


def env_lines(plan: Plan, step: Step) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in step_env(plan, step).items())


def cluster_env_lines(cluster: DictConfig) -> str:
    """cluster.env: double-quoted, so the job's shell expands $USER, $TMPDIR, $SLURM_JOB_ID."""
    escape = str.maketrans({"\\": "\\\\", '"': '\\"', "`": "\\`"})
    return "\n".join(f'export {k}="{str(v).translate(escape)}"' for k, v in cluster.env.items())


def python_check_line(cluster: DictConfig) -> str:
    python = shlex.quote(python_of(cluster))
    return (f"command -v {python} >/dev/null || {{ echo \"domainforge: no interpreter {python} on $(hostname)"
            f" after cluster.setup: activate an environment there or set cluster.python\" >&2; exit 1; }}")


@dataclass
class JobText:
    """What every step's script is rendered with; each kind adds its own values."""

    plan: Plan
    step: Step
    cluster: DictConfig
    title: str
    script: Path
    log: Path
    dependency: Optional[str]

    def render(self, sbatch_lines: List[str], tasks: int = 1, **values) -> str:
        """The step kind's template filled with the common values (the step's own command among them)
        and `values`; a job of several tasks labels each output line with its task number."""
        kind = STEP_KINDS[self.step.kind]
        entry = f"launch/{kind.entry_point}"
        command = [python_of(self.cluster), entry, *self.step.args]
        env = [env_lines(self.plan, self.step), cluster_env_lines(self.cluster), srun_cpus_line(self.cluster),
               python_check_line(self.cluster)]
        return render_template(kind.sbatch_template, dict(
            title=self.title,
            script=self.script,
            job_name=f"df-{self.plan.pipeline}-{self.step.name}",
            log=self.log,
            time=self.cluster.time,
            sbatch_lines="\n".join(f"#SBATCH {line}" for line in sbatch_lines),
            repo=shlex.quote(str(REPO_ROOT)),
            setup=setup_lines(self.cluster),
            env="\n".join(filter(None, env)),
            command=" \\\n        ".join(shlex.quote(a) for a in command),
            srun_label=" --label" if tasks > 1 else "",
            tasks=tasks,
            **values,
        ))


# Derived ports lie below Linux's ephemeral range (32768-60999, where the kernel picks the ports
# of outgoing connections) and repeat only every 22768 job ids.
MASTER_PORT_FIRST, MASTER_PORT_END = 10000, 32768


def master_port_of(cluster: DictConfig) -> str:
    """torch.distributed's port: cluster.master_port, or one derived from the job id, the same on
    every node, so that jobs sharing a node differ."""
    span = MASTER_PORT_END - MASTER_PORT_FIRST
    return str(cluster.master_port or f"$(({MASTER_PORT_FIRST} + SLURM_JOB_ID % {span}))")


def gpu_bind_option(cluster: DictConfig, uses_gpus: bool = True) -> str:
    """srun's `--gpu-bind=none` where the job asks for GPUs: every task sees every GPU of its node
    and picks its own by local rank (some sites bind one GPU per task by default, and then every
    local rank but 0 names a device that is not there)."""
    return " --gpu-bind=none" if uses_gpus and cluster.request_gpus else ""


def render_train_job(job: JobText) -> str:
    cluster = job.cluster
    check_ranks(cluster)  # a step's own nodes or GPUs against cluster.tasks
    world = training_world_size(cluster)
    per_node = math.ceil(world / cluster.nodes)
    lines = common_sbatch_lines(cluster, job.dependency)
    if cluster.request_gpus:
        lines.insert(0, f"--gpus-per-node={cluster.gpus_per_node}")
    # Warn this shell (B:) before the time limit; it forwards the signal to the ranks.
    lines.append(f"--signal=B:USR1@{cluster.signal_seconds}")
    return job.render(
        lines,
        tasks=world,
        world_size=world,
        layout=f"{cluster.nodes} node(s) x {per_node} rank(s) per node",
        nodes=cluster.nodes,
        tasks_per_node=per_node,
        master_port=master_port_of(cluster),
        gpu_bind=gpu_bind_option(cluster),
        output_dir=shlex.quote(str(job.step.output_dir)),
        preempted_code=PREEMPTED_EXIT_CODE,
        max_requeues=cluster.max_requeues,
    )


def render_merge_job(job: JobText) -> str:
    tasks = job.cluster.merge_tasks or job.cluster.nodes
    return job.render(common_sbatch_lines(job.cluster, job.dependency), tasks=tasks,
                      nodes=min(job.cluster.nodes, tasks))


def render_eval_job(job: JobText) -> str:
    """An evaluation on one node: one process per GPU (on a CPU partition, gpus_per_node processes)."""
    cluster = job.cluster
    lines = common_sbatch_lines(cluster, job.dependency)
    if cluster.request_gpus:
        lines.insert(0, f"--gpus-per-node={cluster.gpus_per_node}")
    return job.render(lines,
                      tasks=cluster.gpus_per_node,
                      master_port=master_port_of(cluster),
                      gpu_bind=gpu_bind_option(cluster))


def render_augment_job(job: JobText) -> str:
    """A rewrite on every rank of the job (one per GPU: nodes x gpus_per_node, or cluster.tasks);
    a rule-based or repeat augmentation as one task (it runs on rank 0 only)."""
    cluster = job.cluster
    generates = augment_method(job.step.config.augment.method).uses_model
    tasks = (cluster.tasks or cluster.nodes * cluster.gpus_per_node) if generates else 1
    nodes = min(cluster.nodes, tasks)
    per_node = math.ceil(tasks / nodes)
    lines = common_sbatch_lines(cluster, job.dependency)
    if generates and cluster.request_gpus:
        lines.insert(0, f"--gpus-per-node={cluster.gpus_per_node}")
    return job.render(lines, tasks=tasks, nodes=nodes, tasks_per_node=per_node,
                      gpu_bind=gpu_bind_option(cluster, generates),
                      layout=f"{nodes} node(s) x {per_node} task(s) per node")


def render_task_job(job: JobText) -> str:
    """The study report (CPU only): one task."""
    return job.render(common_sbatch_lines(job.cluster, job.dependency))


TEMPLATE_RENDERERS = {"train.sbatch": render_train_job, "merge.sbatch": render_merge_job,
                      "eval.sbatch": render_eval_job, "augment.sbatch": render_augment_job,
                      "task.sbatch": render_task_job}
"""orchestration/sbatch/<template> -> what fills it (the job's tasks, nodes, GPUs); a step kind
names its template in STEP_KINDS."""


def render_step(plan: Plan, step: Step, cluster: DictConfig, dependency: Optional[str]) -> tuple[Path, str]:
    """(script path, script text) for one step."""
    jobs = plan.jobs_dir
    script = jobs / f"{step.index:02d}-{step.name}.sbatch"
    log = jobs / f"{step.index:02d}-{step.name}-%j.log"
    title = f"pipeline {plan.pipeline}, step {step.name} ({step.stage or step.kind}) -> {step.output_dir}"
    render = TEMPLATE_RENDERERS[STEP_KINDS[step.kind].sbatch_template]
    resources = kind_cluster(cluster, step.kind, step.resources)
    return script, render(JobText(plan, step, resources, title, script, log, dependency))


def requested(text: str) -> Dict[str, str]:
    """{option: value} of a rendered script's `#SBATCH --option=value` lines: what the job asks for."""
    return dict(line[len("#SBATCH --"):].split("=", 1) for line in text.splitlines()
                if line.startswith("#SBATCH --") and "=" in line)


def slurm_hours(limit: str) -> Optional[float]:
    """A SLURM time limit in hours (None: no limit); the forms cluster.time accepts."""
    if limit.upper() in ("INFINITE", "UNLIMITED"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # MM, MM:SS or HH:MM:SS
        hours, minutes, seconds = [0, *parts, 0][:3] if len(parts) < 3 else parts
    return int(days or 0) * 24 + hours + minutes / 60 + seconds / 3600


def resource_row(step: Step, text: str) -> List[str]:
    """step, kind, nodes, tasks, GPUs, cores per task, memory per node, time, partition."""
    asked = requested(text)
    gpus = int(asked.get("gpus-per-node", 0)) * int(asked["nodes"])
    return [step.name, step.kind, asked["nodes"], asked["ntasks"], str(gpus), asked.get("cpus-per-task", "-"),
            asked.get("mem", "-"), asked["time"], asked.get("partition", "-")]


def print_resources(rows: List[List[str]], out, time_limits: bool = True) -> None:
    """What each job of a dry run would ask for, and the GPU time the chain books at most (as
    comments: the dry run's output stays a valid script). Without time_limits (a local run) the
    time and partition columns are SLURM's only."""
    header = ["step", "kind", "nodes", "tasks", "GPUs", "cores/task", "mem/node", "time", "partition"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("\n# resources of each job (mem 0: all of each node's memory; -: the partition's default)", file=out)
    for row in [header, *rows]:
        print("# " + "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)
    if not time_limits:
        print(f"# {len(rows)} step(s) here; time and partition apply on SLURM only (launch/submit.py)", file=out)
        return
    gpu_rows = [r for r in rows if int(r[4])]
    limits = [slurm_hours(r[7]) for r in gpu_rows]
    booked = "unlimited" if None in limits else f"{sum(int(r[4]) * h for r, h in zip(gpu_rows, limits)):,.0f}"
    print(f"# {len(rows)} job(s), {sum(int(r[4]) for r in rows)} GPU(s), at most {booked} GPU-hours by their time limits",
          file=out)
