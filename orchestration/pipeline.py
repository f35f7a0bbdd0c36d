"""Pipelines: a named, ordered list of steps (training stages and merges) that run one after
another, each step reading the previous step's output.

    python launch/pipeline.py pipeline=tiny                       # here, through deepspeed
    python launch/submit.py pipeline=tiny cluster=slurm ...       # one SLURM job per step

Outputs go to `<root>/<pipeline>/<step>/`; generated files (sbatch scripts, job logs, job
ids) to `<root>/<pipeline>/jobs/`. A step whose output holds a finished model
(config.json, written last) is skipped, so a rerun continues where the last one stopped; a
step that failed reruns and resumes from its newest checkpoint (`resume=auto`).
"""

from __future__ import annotations

import functools
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig

from core.config import REPO_ROOT, compose_config
from core.errors import PREEMPTED_EXIT_CODE, UserError
from core.outputs import MODEL_CACHE_DIR, is_model_dir
from core.validate import at_least, between, checked, non_negative, writable_dir
from merge.config import compose_merge_config
from train.config import STAGES, compose_train_config

JOBS_DIR = "jobs"
START = "start"
"""Reference to the pipeline's starting model (e.g. the Instruct model a merge goes back to)."""


# ---------------------------------------------------------------------------------------------
# schemas
# ---------------------------------------------------------------------------------------------
@dataclass
class MergeStepConfig:
    preset: str = "paper_slerp"
    """The merge recipe: a preset in conf/merge/ (launch/merge.py merge=<preset>)."""
    base_model: str = MISSING
    """t=0 returns it (the paper: the Instruct model): an earlier step, `start`, a name in
    pipeline.models or a model directory."""
    model: str = MISSING
    """The other model (the paper: the fine-tuned one), named the same ways."""
    overrides: List[str] = field(default_factory=list)
    """launch/merge.py overrides, e.g. [merge.dtype=float32]."""


@dataclass
class StepConfig:
    name: str = MISSING
    """Names the output directory `<root>/<pipeline>/<name>/`."""
    stage: Optional[str] = None
    """cpt, sft, dpo or orpo for a training step ..."""
    merge: Optional[MergeStepConfig] = None
    """... or a merge."""
    input: Optional[str] = None
    """Input model of a training step: an earlier step, `start`, a name in pipeline.models or a
    model directory. None: the previous step's output (`start` for the first step)."""
    overrides: List[str] = field(default_factory=list)
    """launch/train.py overrides for this step only, after the pipeline's."""


@dataclass
class PipelineConfig:
    name: str = MISSING
    model: str = MISSING
    """The model preset (conf/model/) every training step uses."""
    start: Optional[str] = None
    """Directory of the starting model; None: the preset's model.path."""
    models: Dict[str, str] = field(default_factory=dict)
    """Outside models a merge can name, e.g. {instruct: /models/Mistral-7B-Instruct-v0.3}."""
    overrides: List[str] = field(default_factory=list)
    """launch/train.py overrides for every training step."""
    steps: List[StepConfig] = MISSING


@dataclass
class ClusterConfig:
    name: str = MISSING
    """local (this machine, the deepspeed launcher) or slurm (launch/submit.py)."""
    nodes: int = checked(1, at_least(1))
    gpus_per_node: int = checked(1, at_least(1))
    """Ranks per node: one per GPU (on a CPU-only partition: CPU ranks per node)."""
    tasks: Optional[int] = checked(None, at_least(1))
    """Training ranks in all; None: nodes x gpus_per_node."""
    request_gpus: bool = True
    """Ask SLURM for the GPUs (--gpus-per-node); false on CPU-only partitions."""
    cpus_per_task: Optional[int] = checked(None, at_least(1))
    mem: Optional[str] = None
    """Memory per node, e.g. 500G; None: the partition default."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "24:00:00"
    """Time limit of each job; a job that hits it checkpoints and requeues itself."""
    signal_seconds: int = checked(600, non_negative)
    """SIGUSR1 this long before the time limit: time to finish a step and write a checkpoint."""
    requeue: bool = True
    merge_tasks: Optional[int] = checked(None, at_least(1))
    """Tasks of a merge job (the merge is split across them); None: one per node."""
    master_port: Optional[int] = checked(None, between(1024, 65535))
    """torch.distributed port; None: derived from the job id so jobs sharing a node differ."""
    python: Optional[str] = None
    """Interpreter on the compute nodes; None: the one running submit.py."""
    setup: List[str] = field(default_factory=list)
    """Shell lines each job runs first (module load ..., source venv/bin/activate)."""
    sbatch_args: List[str] = field(default_factory=list)
    """Extra `#SBATCH` options, e.g. [--constraint=a100, --exclusive]."""


@dataclass
class PipelineJobConfig:
    """Root of launch/pipeline.py and launch/submit.py (conf/pipeline_job.yaml)."""

    pipeline: PipelineConfig = MISSING
    cluster: ClusterConfig = MISSING
    root: str = checked("outputs/pipelines", writable_dir)
    """Outputs go to <root>/<pipeline>/<step>/."""
    step: Optional[str] = None
    """Run or submit only this step (its inputs must exist or be earlier in the same run)."""


def compose_pipeline_job(overrides: List[str]) -> DictConfig:
    cfg = compose_config(overrides, "pipeline_job", PipelineJobConfig)
    check_cluster(cfg.cluster)
    return cfg


def check_cluster(cluster: DictConfig) -> None:
    """What the field checks cannot say: how the fields relate."""
    nodes, gpus, tasks = cluster.nodes, cluster.gpus_per_node, cluster.tasks
    if tasks is not None and tasks > nodes * gpus:
        raise UserError(
            f"cluster.tasks={tasks} is more than cluster.nodes x cluster.gpus_per_node = {nodes} x {gpus} = "
            f"{nodes * gpus}: lower cluster.tasks or raise cluster.nodes / cluster.gpus_per_node"
        )
    if tasks is not None and tasks < nodes:
        raise UserError(f"cluster.tasks={tasks} is fewer than cluster.nodes={nodes}: every node needs a rank")


# ---------------------------------------------------------------------------------------------
# step resolution
# ---------------------------------------------------------------------------------------------
@dataclass
class Step:
    """A step with every reference resolved to a directory."""

    name: str
    index: int
    output_dir: Path
    stage: Optional[str] = None
    train_args: List[str] = field(default_factory=list)
    """launch/train.py arguments (training steps)."""
    input_dir: Optional[str] = None
    """The model a training step starts from (None: random init, or a GGUF preset)."""
    merge_args: List[str] = field(default_factory=list)
    """launch/merge.py arguments (merge steps)."""
    merge_models: List[str] = field(default_factory=list)
    """Directories to merge (merge steps)."""
    depends_on: List[str] = field(default_factory=list)
    """Earlier steps whose outputs this one reads."""

    @property
    def kind(self) -> str:
        return "merge" if self.merge_args else "train"

    def is_complete(self) -> bool:
        return is_model_dir(self.output_dir)


@dataclass
class Plan:
    pipeline: str
    run_dir: Path
    steps: List[Step]

    @property
    def jobs_dir(self) -> Path:
        return self.run_dir / JOBS_DIR

    def select(self, name: Optional[str]) -> List[Step]:
        if name is None:
            return self.steps
        for step in self.steps:
            if step.name == name:
                return [step]
        raise UserError(
            f"unknown step '{name}' in pipeline {self.pipeline}: choose one of "
            + ", ".join(s.name for s in self.steps)
        )


def local_path(path: str) -> str:
    """Absolute when it exists here (jobs run from the repo root, not the caller's cwd)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(p)


def start_model_dir(pipeline: DictConfig) -> Optional[str]:
    """The starting model as a directory (None for random-init presets)."""
    if pipeline.start:
        return local_path(pipeline.start)
    model = compose_train_config([f"model={pipeline.model}", "+stage=cpt"]).model
    if model.path is None:
        return None
    if model.gguf_file:
        # The first training step dequantizes it to this directory (train/model.py).
        return str(MODEL_CACHE_DIR / Path(model.gguf_file).stem)
    return str(model.path)


class PipelinePlanner:
    """Resolves a pipeline config into steps, in named steps:

        plan()                          check the step names, then each step in order
          plan_merge_step(spec)         both models resolved, the launch/merge.py arguments
          plan_train_step(spec)         the input model resolved, the launch/train.py arguments
            resolve(ref)                an earlier step, `start`, a name in pipeline.models or a path
    """

    def __init__(self, cfg: DictConfig):
        self.pipeline = cfg.pipeline
        self.run_dir = Path(cfg.root).expanduser().resolve() / self.pipeline.name
        self.names = [s.name for s in self.pipeline.steps]
        self.steps: List[Step] = []

    def fail(self, message: str) -> UserError:
        return UserError(f"pipeline {self.pipeline.name}: {message}")

    def plan(self) -> Plan:
        self.check_step_names()
        for spec in self.pipeline.steps:
            if (spec.stage is None) == (spec.merge is None):
                raise self.fail(f"step '{spec.name}' needs exactly one of stage: or merge:")
            self.steps.append(self.plan_merge_step(spec) if spec.merge is not None else self.plan_train_step(spec))
        return Plan(self.pipeline.name, self.run_dir, self.steps)

    def check_step_names(self) -> None:
        if not self.pipeline.steps:
            raise UserError(f"pipeline {self.pipeline.name} has no steps: add some under steps: in conf/pipeline/")
        for i, name in enumerate(self.names):
            if name in self.names[:i]:
                raise self.fail(f"two steps are named '{name}': step names must be unique")
            if name in (START, JOBS_DIR) or name in self.pipeline.models:
                raise self.fail(f"step name '{name}' is reserved: rename the step")

    @functools.cached_property
    def start_dir(self) -> Optional[str]:
        return start_model_dir(self.pipeline)

    def resolve(self, ref: str, step_name: str, field_name: str) -> Tuple[Optional[str], Optional[str]]:
        """(directory, step it comes from) for a model reference in step `step_name`."""
        earlier = {s.name: s for s in self.steps}
        if ref in earlier:
            return str(earlier[ref].output_dir), ref
        if ref in self.names:
            raise self.fail(
                f"step '{step_name}' {field_name} names step '{ref}', which does not come before it: a step can "
                "only read the outputs of earlier steps"
            )
        if ref == START:
            return self.start_dir, None
        if ref in self.pipeline.models:
            return local_path(self.pipeline.models[ref]), None
        if "/" in ref or ref.startswith((".", "~")):
            return local_path(ref), None
        raise self.fail(
            f"step '{step_name}' {field_name} names '{ref}', which is not a step, `start`, a name in "
            f"pipeline.models or a path: choose one of {', '.join(self.names[: len(self.steps)] + [START])}"
        )

    def plan_merge_step(self, spec) -> Step:
        if spec.input is not None:
            raise self.fail(f"merge step '{spec.name}' reads merge.base_model and merge.model, not input")
        out = self.run_dir / spec.name
        dirs, deps = {}, []
        for key in ("base_model", "model"):
            path, dep = self.resolve(spec.merge[key], spec.name, f"merge.{key}")
            if path is None:
                raise self.fail(
                    f"merge step '{spec.name}' names `start`, but model {self.pipeline.model} is random-init "
                    "(no directory): name a step instead"
                )
            dirs[key] = path
            deps += [dep] if dep else []
        args = [
            f"merge={spec.merge.preset}", f"merge.base_model={dirs['base_model']}",
            f"merge.model={dirs['model']}", f"output_dir={out}", *spec.merge.overrides,
        ]
        return Step(spec.name, len(self.steps), out, merge_args=args, merge_models=list(dirs.values()),
                    depends_on=deps)

    def plan_train_step(self, spec) -> Step:
        if spec.stage not in STAGES:
            raise self.fail(f"step '{spec.name}' has unknown stage '{spec.stage}': choose one of {', '.join(STAGES)}")
        out = self.run_dir / spec.name
        if spec.input is not None:
            input_dir, dep = self.resolve(spec.input, spec.name, "input")
        elif self.steps:
            input_dir, dep = str(self.steps[-1].output_dir), self.steps[-1].name
        else:
            input_dir, dep = self.resolve(START, spec.name, "input")
        args = [f"+stage={spec.stage}", f"model={self.pipeline.model}", f"output_dir={out}"]
        if input_dir is not None and (dep is not None or self.pipeline.start or spec.input):
            # A step's input is a saved HF directory: drop the preset's GGUF file name.
            args += [f"model.path={input_dir}", "model.gguf_file=null"]
        elif input_dir is not None and _is_gguf_cache(input_dir):
            input_dir = None  # the step converts the preset's GGUF file itself
        args += list(self.pipeline.overrides) + list(spec.overrides)
        return Step(spec.name, len(self.steps), out, stage=spec.stage, train_args=args, input_dir=input_dir,
                    depends_on=[dep] if dep else [])


def plan_pipeline(cfg: DictConfig) -> Plan:
    """Resolve every step's input, output and arguments; UserError on a bad reference."""
    return PipelinePlanner(cfg).plan()


def validate_step_configs(plan: Plan) -> None:
    """Compose each step's config now, so a typo'd override fails before any job runs."""
    for step in plan.steps:
        try:
            if step.kind == "train":
                compose_train_config(step.train_args)
            else:
                compose_merge_config(step.merge_args)
        except UserError as err:
            raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err


def _is_gguf_cache(path: str) -> bool:
    return Path(path).parent == MODEL_CACHE_DIR


def check_outside_models(plan: Plan, steps: List[Step]) -> None:
    """Models that no step of this pipeline produces must already exist, before jobs queue."""
    produced = {str(s.output_dir) for s in plan.steps}
    for step in steps:
        for path in step.merge_models or [step.input_dir]:
            if path is None or path in produced or (Path(path) / "config.json").is_file():
                continue
            fix = "pipeline.models.<name>=<local dir>" if step.kind == "merge" else "pipeline.start=<local dir>"
            raise UserError(
                f"pipeline {plan.pipeline}: step '{step.name}' reads {path}, which is not a local model directory "
                f"(no config.json): download the model and set {fix}"
            )


# ---------------------------------------------------------------------------------------------
# local runner
# ---------------------------------------------------------------------------------------------
class StepFailed(UserError):
    exit_code = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_command(plan: Plan, step: Step, cluster: DictConfig) -> List[str]:
    if step.kind == "merge":
        return [sys.executable, str(REPO_ROOT / "launch" / "merge.py"), *step.merge_args]
    # A free port: other deepspeed runs on this machine may hold the default 29500.
    return [
        "deepspeed", "--num_gpus", str(cluster.gpus_per_node), "--master_port", str(free_port()),
        str(REPO_ROOT / "launch" / "train.py"), *step.train_args,
    ]


def run_local(cfg: DictConfig) -> Plan:
    """Run the pipeline's steps in order on this machine, skipping finished ones."""
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
    check_outside_models(plan, selected)
    for step in selected:
        if step.is_complete():
            print(f"pipeline {plan.pipeline}: step {step.name} is complete ({step.output_dir}), skipping", flush=True)
            continue
        for dep in step.depends_on:
            dep_step = plan.select(dep)[0]
            if not dep_step.is_complete():
                raise UserError(
                    f"pipeline {plan.pipeline}: step '{step.name}' needs step '{dep}' first ({dep_step.output_dir} "
                    f"is not finished): run python launch/pipeline.py pipeline={plan.pipeline} step={dep}"
                )
        cmd = local_command(plan, step, cfg.cluster)
        print(f"pipeline {plan.pipeline}: step {step.name}: {shlex.join(cmd)}", flush=True)
        code = subprocess.call(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
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
        if code != 0 or not step.is_complete():
            raise StepFailed(
                f"pipeline {plan.pipeline}: step '{step.name}' failed (exit {code}, see the output above): "
                f"fix the cause and rerun the same command; finished steps are skipped and '{step.name}' "
                "resumes from its newest checkpoint"
            )
    print(f"pipeline {plan.pipeline}: done, outputs in {plan.run_dir}", flush=True)
    return plan
