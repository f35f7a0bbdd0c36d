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
import json
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import MISSING, DictConfig

from core.checkpoints import check_resume_topology, newest_complete_checkpoint, resume_checkpoint
from core.config import REPO_ROOT, compose_config
from core.errors import PREEMPTED_EXIT_CODE, UserError
from core.outputs import EVAL_DIR, MODEL_CACHE_DIR, epoch_model_dir, is_augmented_dataset, is_model_dir, write_atomic
from core.validate import at_least, between, checked, non_negative, writable_dir
from evaluation.config import compose_eval_config
from evaluation.parallel import gpu_count
from evaluation.run import check_task_names
from merge.config import compose_merge_config, recipe_from_config
from merge.recipe import check_recipe
from train.attention import check_attention_installed
from train.augment.config import compose_augment_config
from train.config import compose_train_config
from train.deepspeed_config import offloads_optimizer_to_nvme
from train.stages import STAGES

JOBS_DIR = "jobs"
START = "start"
"""Reference to the pipeline's starting model (e.g. the Instruct model a merge goes back to)."""
PLAN_FILE = "pipeline.json"
"""The resolved plan, written into the run directory: what the study report reads."""
STUDY_FILE = "study.json"


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
class AugmentStepConfig:
    preset: str = "rules"
    """The augmentation: a preset in conf/augment/ (launch/augment.py augment=<preset>)."""
    match: Optional[str] = None
    """For augment=repeat: an earlier augment step whose token count the repeated raw corpus matches."""
    overrides: List[str] = field(default_factory=list)
    """launch/augment.py overrides, e.g. [augment.rewrite.styles=[qa], data.cpt.max_samples=100]."""


@dataclass
class StepConfig:
    name: str = MISSING
    """Names the output directory `<root>/<pipeline>/<name>/`."""
    stage: Optional[str] = None
    """cpt, sft, dpo or orpo for a training step ..."""
    merge: Optional[MergeStepConfig] = None
    """... or a merge ..."""
    augment: Optional[AugmentStepConfig] = None
    """... or an augmentation of the CPT corpus (a dataset, not a model: a CPT step reads it with `corpus`)."""
    corpus: Optional[str] = None
    """CPT steps: an earlier augment step whose dataset this step trains on (data.cpt.path=<its output>)."""
    input: Optional[str] = None
    """Input model of a training step: an earlier step, `start`, a name in pipeline.models or a
    model directory. None: the previous step's output (`start` for the first step)."""
    overrides: List[str] = field(default_factory=list)
    """launch/train.py overrides for this step only, after the pipeline's."""


@dataclass
class PipelineEvalConfig:
    tasks: List[str] = field(default_factory=list)
    """lm-eval tasks run on every model the pipeline makes (evaluation/tasks/, or lm-eval's own);
    empty: no evaluation steps and no study."""
    start: bool = True
    """Evaluate the starting model too: the baseline every strategy is compared with."""
    cpt_epochs: bool = False
    """Keep the model that ends each CPT epoch and evaluate it (the paper's CPT-epoch curve)."""
    overrides: List[str] = field(default_factory=list)
    """launch/eval.py overrides for every evaluation, e.g. [limit=200, batch_size=16]."""


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
    """Training and merge steps. Steps form a tree: several strategies can branch from a shared
    prefix (name the branch point as `input:`), which is trained once."""
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    """Evaluation steps, one per model, then the study report (launch/study.py) over all of them."""
    wandb: Optional[str] = None
    """offline or online: every step logs to W&B, in one group named after the pipeline (job type:
    the stage, merge, eval or study); offline runs sync later with `wandb sync`. None: no W&B."""


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
    cpus_per_task: Optional[int] = checked(8, at_least(1))
    """CPU cores per task (rank): data preparation (data.num_proc), dataloader workers, the
    CPU optimizer of ZeRO-Offload. SLURM's own default is 1, which starves them; 8 per GPU fits
    common 8-GPU nodes of 64+ cores. None: the partition default. On small or CPU-only
    partitions lower it so that nodes x tasks fits (cluster.cpus_per_task=1)."""
    mem: Optional[str] = "0"
    """Memory per node, e.g. 500G; "0": all of each node's memory (SLURM's convention), what
    a training job on whole GPU nodes wants; None: the partition default (often a few GB per
    CPU). On nodes shared with other jobs, set a size."""
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
    augment_args: List[str] = field(default_factory=list)
    """launch/augment.py arguments (augment steps)."""
    merge_models: List[str] = field(default_factory=list)
    """Directories to merge (merge steps)."""
    depends_on: List[str] = field(default_factory=list)
    """Earlier steps whose outputs this one reads."""
    eval_args: List[str] = field(default_factory=list)
    """launch/eval.py arguments (evaluation steps)."""
    evaluates: Optional[str] = None
    """The model an evaluation step scores: a step name, `start`, or `<step>/epoch-<k>`."""
    tasks: List[str] = field(default_factory=list)
    """The tasks of an evaluation step; it is complete when each has its result file."""
    study_args: List[str] = field(default_factory=list)
    """launch/study.py arguments (the study step)."""
    parents: List[str] = field(default_factory=list)
    """A merge's models as the pipeline names them: [base_model, model] (step names, `start`, ...)."""
    recipe: Optional[dict] = None
    """A merge's composed recipe (merge steps), kept so that it is composed once per plan."""
    epochs: Optional[int] = None
    """Epochs of a CPT step whose epoch models are kept and evaluated (pipeline.eval.cpt_epochs)."""

    @property
    def kind(self) -> str:
        for kind in ("merge", "augment", "eval", "study"):
            if getattr(self, f"{kind}_args"):
                return kind
        return "train"

    @property
    def args(self) -> List[str]:
        """The arguments of this step's entry point, launch/<ENTRY_POINTS[kind]>."""
        return getattr(self, f"{self.kind}_args")

    def is_complete(self) -> bool:
        return output_complete(self.kind, self.output_dir, self.tasks)

    def describe(self) -> dict:
        """What the study report needs to know of this step (written to pipeline.json)."""
        return dict(name=self.name, kind=self.kind, stage=self.stage, output_dir=str(self.output_dir),
                    depends_on=self.depends_on, evaluates=self.evaluates, tasks=self.tasks, parents=self.parents,
                    method=self.method, epochs=self.epochs)

    @property
    def method(self) -> Optional[str]:
        """A merge's merge_method (slerp, linear, ties, ...): the study names each merge by it."""
        return self.recipe.get("merge_method") if self.recipe else None


ENTRY_POINTS = {"train": "train.py", "merge": "merge.py", "augment": "augment.py", "eval": "eval.py",
                "study": "study.py"}


def output_complete(kind: str, output_dir: str | Path, tasks: List[str] = ()) -> bool:
    """A step's output is finished: a model directory, an augmented dataset, every task's result, or the study."""
    out = Path(output_dir)
    if kind == "augment":
        return is_augmented_dataset(out)
    if kind == "eval":
        return all((out / f"{task}.json").is_file() for task in tasks)
    if kind == "study":
        return (out / STUDY_FILE).is_file()
    return is_model_dir(out)


def read_plan_file(run_dir: Path) -> Dict[str, dict]:
    """{step name: its description} from <run dir>/pipeline.json; empty when there is none."""
    path = run_dir / PLAN_FILE
    if not path.is_file():
        return {}
    return {s["name"]: s for s in json.loads(path.read_text())["steps"]}


@dataclass
class Plan:
    pipeline: str
    run_dir: Path
    steps: List[Step]
    wandb: Optional[str] = None
    """W&B mode of every step (pipeline.wandb)."""

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


def start_model_dir(pipeline: DictConfig, run_dir: Path) -> Optional[str]:
    """The starting model as a directory (None for random-init presets)."""
    if pipeline.start:
        return local_path(pipeline.start)
    # output_dir in the run: the composed config checks it is writable, and that one must be
    model = compose_train_config([f"model={pipeline.model}", "+stage=cpt", f"output_dir={run_dir / START}"]).model
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
          plan_augment_step(spec)       the launch/augment.py arguments (a dataset for a later CPT step)
          plan_train_step(spec)         the input model resolved, the launch/train.py arguments
            resolve(ref)                an earlier step, `start`, a name in pipeline.models or a path
          plan_evals(step)              with pipeline.eval.tasks: an evaluation after each model
          plan_study()                  and the study report over all of them, last
    """

    def __init__(self, cfg: DictConfig):
        self.pipeline = cfg.pipeline
        self.run_dir = Path(cfg.root).expanduser().resolve() / self.pipeline.name
        self.names = [s.name for s in self.pipeline.steps]
        self.steps: List[Step] = []

    def fail(self, message: str) -> UserError:
        return UserError(f"pipeline {self.pipeline.name}: {message}")

    @property
    def model_steps(self) -> List[Step]:
        """The training and merge steps planned so far."""
        return [s for s in self.steps if s.kind in ("train", "merge")]

    @property
    def evaluating(self) -> bool:
        return bool(self.pipeline.eval.tasks)

    def plan(self) -> Plan:
        self.check_step_names()
        for spec in self.pipeline.steps:
            if sum(x is not None for x in (spec.stage, spec.merge, spec.augment)) != 1:
                raise self.fail(f"step '{spec.name}' needs exactly one of stage:, merge: or augment:")
            if spec.merge is not None:
                step = self.plan_merge_step(spec)
            elif spec.augment is not None:
                step = self.plan_augment_step(spec)
            else:
                step = self.plan_train_step(spec)
            self.steps.append(step)
            if self.evaluating and step.kind != "augment":
                self.plan_evals(step)
        if self.evaluating:
            self.plan_study()
        return Plan(self.pipeline.name, self.run_dir, self.steps, self.pipeline.wandb)

    def eval_step(self, name: str, model_dir: str, evaluates: str, out: Path, depends_on: List[str]) -> Step:
        tasks = list(self.pipeline.eval.tasks)
        args = [model_dir, f"tasks=[{','.join(tasks)}]", f"output_dir={out}", *self.pipeline.eval.overrides]
        return Step(name, len(self.steps), out, eval_args=args, evaluates=evaluates, tasks=tasks,
                    depends_on=depends_on)

    def plan_evals(self, step: Step) -> None:
        """An evaluation of `step`'s model right after it; before the first model step, of the
        start model too (after the first training step when that step converts it from GGUF)."""
        first_model_step = len(self.model_steps) == 1
        if first_model_step and self.pipeline.eval.start and self.start_dir is not None:
            after = [step.name] if _is_gguf_cache(self.start_dir) else []
            start_eval = self.eval_step(f"eval-{START}", self.start_dir, START, self.run_dir / START / EVAL_DIR, after)
            if after:
                self.steps.append(start_eval)
            else:
                self.steps.insert(len(self.steps) - 1, start_eval)
                for i, s in enumerate(self.steps):
                    s.index = i
        if step.stage == "cpt" and self.pipeline.eval.cpt_epochs:
            # The last epoch's model is the step's own output, evaluated below.
            step.epochs = self.cpt_epochs(step)
            for k in range(1, step.epochs):
                model = epoch_model_dir(step.output_dir, k)
                self.steps.append(self.eval_step(f"eval-{step.name}-epoch-{k}", str(model),
                                                 f"{step.name}/epoch-{k}", model / EVAL_DIR, [step.name]))
        self.steps.append(self.eval_step(f"eval-{step.name}", str(step.output_dir), step.name,
                                         step.output_dir / EVAL_DIR, [step.name]))

    def cpt_epochs(self, step: Step) -> int:
        """Whole epochs a CPT step runs; each one's final model is kept and evaluated."""
        try:
            training = compose_train_config(step.train_args).training
        except UserError as err:
            raise UserError(f"pipeline {self.pipeline.name}, step '{step.name}': {err}") from err
        epochs = training.num_train_epochs
        if training.max_steps > 0 or epochs != int(epochs):
            raise self.fail(
                f"pipeline.eval.cpt_epochs evaluates each CPT epoch, but step '{step.name}' runs "
                f"training.max_steps={training.max_steps}, num_train_epochs={epochs}: give it whole epochs "
                "(training.max_steps=-1, an integer training.num_train_epochs)"
            )
        step.train_args.append("training.keep_epoch_models=true")
        return int(epochs)

    def plan_study(self) -> None:
        evals = [s.name for s in self.steps if s.kind == "eval"]
        self.steps.append(Step("study", len(self.steps), self.run_dir, study_args=[str(self.run_dir)],
                               depends_on=evals))

    def check_step_names(self) -> None:
        if not self.pipeline.steps:
            raise UserError(f"pipeline {self.pipeline.name} has no steps: add some under steps: in conf/pipeline/")
        for i, name in enumerate(self.names):
            if name in self.names[:i]:
                raise self.fail(f"two steps are named '{name}': step names must be unique")
            if name in (START, JOBS_DIR, "study") or name.startswith("eval-") or name in self.pipeline.models:
                raise self.fail(f"step name '{name}' is reserved: rename the step")

    @functools.cached_property
    def start_dir(self) -> Optional[str]:
        return start_model_dir(self.pipeline, self.run_dir)

    def resolve(self, ref: str, step_name: str, field_name: str) -> Tuple[Optional[str], Optional[str]]:
        """(directory, step it comes from) for a model reference in step `step_name`."""
        if ref.startswith("eval-") or ref == "study":
            raise self.fail(
                f"step '{step_name}' {field_name} names '{ref}', an evaluation step: {field_name} takes a model "
                f"(a training or merge step, `start`, a name in pipeline.models or a path)"
            )
        earlier = {s.name: s for s in self.model_steps}
        if ref in self.augment_steps:
            raise self.fail(f"step '{step_name}' {field_name} names '{ref}', an augment step (a dataset, not a "
                            f"model): a CPT step trains on it with corpus: {ref}")
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
            f"pipeline.models or a path: choose one of {', '.join([s.name for s in self.model_steps] + [START])}"
        )

    @property
    def augment_steps(self) -> Dict[str, Step]:
        return {s.name: s for s in self.steps if s.kind == "augment"}

    def resolve_dataset(self, ref: str, step_name: str, field_name: str) -> Step:
        """An earlier augment step named by `corpus:` or `augment.match:`."""
        if ref not in self.augment_steps:
            later = " (it must come before this step)" if ref in self.names else ""
            raise self.fail(
                f"step '{step_name}' {field_name} names '{ref}', which is not an earlier augment step{later}: choose "
                f"one of {', '.join(self.augment_steps) or '(none: add a step with augment:)'}"
            )
        return self.augment_steps[ref]

    def plan_augment_step(self, spec) -> Step:
        if spec.input is not None or spec.corpus is not None:
            raise self.fail(f"augment step '{spec.name}' reads data.cpt (set it in augment.overrides), not input or "
                            "corpus")
        out = self.run_dir / spec.name
        args = [f"augment={spec.augment.preset}", f"model={self.pipeline.model}", f"output_dir={out}"]
        if self.pipeline.start:
            args.append(f"model.path={self.start_dir}")  # the start model rewrites, and its tokenizer counts
        deps = []
        if spec.augment.match is not None:
            matched = self.resolve_dataset(spec.augment.match, spec.name, "augment.match")
            args.append(f"augment.repeat.match={matched.output_dir}")
            deps.append(matched.name)
        args += list(spec.augment.overrides)
        return Step(spec.name, len(self.steps), out, augment_args=args, depends_on=deps)

    def plan_merge_step(self, spec) -> Step:
        if spec.input is not None or spec.corpus is not None:
            raise self.fail(f"merge step '{spec.name}' reads merge.base_model and merge.model, not input or corpus")
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
        try:
            recipe = recipe_from_config(compose_merge_config(args))
        except UserError as err:
            raise UserError(f"pipeline {self.pipeline.name}, step '{spec.name}': {err}") from err
        return Step(spec.name, len(self.steps), out, merge_args=args, merge_models=list(dirs.values()),
                    depends_on=deps, parents=[spec.merge.base_model, spec.merge.model], recipe=recipe)

    def plan_train_step(self, spec) -> Step:
        if spec.stage not in STAGES:
            raise self.fail(f"step '{spec.name}' has unknown stage '{spec.stage}': choose one of {', '.join(STAGES)}")
        out = self.run_dir / spec.name
        if spec.input is not None:
            input_dir, dep = self.resolve(spec.input, spec.name, "input")
        elif self.model_steps:
            input_dir, dep = str(self.model_steps[-1].output_dir), self.model_steps[-1].name
        else:
            input_dir, dep = self.resolve(START, spec.name, "input")
        args = [f"+stage={spec.stage}", f"model={self.pipeline.model}", f"output_dir={out}"]
        if self.pipeline.wandb is not None:
            args += ["logging=wandb", f"logging.mode={self.pipeline.wandb}", f"logging.run_name={spec.name}"]
        if input_dir is not None and (dep is not None or self.pipeline.start or spec.input):
            # A saved model directory: it takes precedence over a preset's GGUF file (train/model.py).
            args.append(f"model.path={input_dir}")
        elif input_dir is not None and _is_gguf_cache(input_dir):
            input_dir = None  # the step converts the preset's GGUF file itself
        deps = [dep] if dep else []
        args += list(self.pipeline.overrides)
        if spec.corpus is not None:  # after the pipeline's overrides: a pipeline-wide data.cpt.path is the default
            if spec.stage != "cpt":
                raise self.fail(f"step '{spec.name}' sets corpus: {spec.corpus}, but only a cpt step trains on an "
                                "augmented corpus")
            dataset = self.resolve_dataset(spec.corpus, spec.name, "corpus")
            args.append(f"data.cpt.path={dataset.output_dir}")
            deps.append(dataset.name)
        args += list(spec.overrides)
        return Step(spec.name, len(self.steps), out, stage=spec.stage, train_args=args, input_dir=input_dir,
                    depends_on=deps)


def plan_pipeline(cfg: DictConfig) -> Plan:
    """Resolve every step's input, output and arguments; UserError on a bad reference."""
    return PipelinePlanner(cfg).plan()


def validate_step_configs(plan: Plan) -> None:
    """Compose each step's config now, so a typo'd override or task name fails before any job runs."""
    checked_tasks: List[List[str]] = []
    for step in plan.steps:
        try:
            if step.kind == "train":
                compose_train_config(step.train_args)
            elif step.kind == "merge":
                # the merge's own recipe checks (method, parameters, dtypes), before the models exist
                check_recipe(step.recipe)
            elif step.kind == "augment":
                compose_augment_config(step.augment_args)
            elif step.kind == "eval":
                cfg = compose_eval_config([f"model_dir={step.eval_args[0]}", *step.eval_args[1:]])
                if step.tasks not in checked_tasks:  # every evaluation of a pipeline runs the same tasks
                    check_task_names(cfg)
                    checked_tasks.append(step.tasks)
        except UserError as err:
            raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err


def check_step_environment(plan: Plan, steps: List[Step], python: Optional[str] = None) -> None:
    """What the jobs' interpreter (`python`; None: this one) must have installed, checked before any
    job runs: the attention kernel each training step's model asks for (train/attention.py)."""
    checked: List[str] = []
    for step in steps:
        if step.kind != "train":
            continue
        implementation = compose_train_config(step.train_args).model.attn_implementation
        if implementation in checked:
            continue
        try:
            check_attention_installed(implementation, python)
        except UserError as err:
            raise UserError(f"pipeline {plan.pipeline}, step '{step.name}': {err}") from err
        checked.append(implementation)


def training_world_size(cluster: DictConfig) -> int:
    """The ranks a training job of this cluster config runs."""
    return cluster.tasks if cluster.tasks is not None else cluster.nodes * cluster.gpus_per_node


def check_resumes(steps: List[Step], cluster: DictConfig) -> None:
    """A training step that will resume from a checkpoint (resume=auto finds one, or a path)
    must be able to load it on this cluster's world size and ZeRO stage: refused now, not once
    the job has queued. A changed world size alone is converted when the job starts."""
    for step in steps:
        if step.kind != "train" or step.is_complete():
            continue
        if newest_complete_checkpoint(step.output_dir) is None and not any(a.startswith("resume=") for a in step.args):
            continue  # nothing to resume from: no need to compose the step's config again
        cfg = compose_train_config(step.train_args)
        try:
            ckpt = resume_checkpoint(cfg.output_dir, cfg.resume)
            if ckpt is not None:
                check_resume_topology(
                    ckpt, cfg.deepspeed.zero_stage, training_world_size(cluster),
                    offloads_optimizer_to_nvme(cfg.deepspeed),
                )
        except UserError as err:
            raise UserError(f"step '{step.name}': {err}") from err


def _is_gguf_cache(path: str) -> bool:
    return Path(path).parent == MODEL_CACHE_DIR


def check_outside_models(plan: Plan, steps: List[Step]) -> None:
    """Models that no step of this pipeline produces must already exist, before jobs queue."""
    produced = {str(s.output_dir) for s in plan.steps}
    for step in steps:
        for path in step.merge_models or [step.input_dir]:
            if path is None or path in produced or (Path(path) / "config.json").is_file():
                continue
            if _is_gguf_cache(path):
                continue  # the first step that loads the GGUF preset (a stage, or an augment's tokenizer) converts it
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


def local_command(plan: Plan, step: Step, cluster: DictConfig) -> List[str]:
    script = str(REPO_ROOT / "launch" / ENTRY_POINTS[step.kind])
    if step.kind == "eval":
        return eval_command(script, step.args, local_eval_processes(cluster))
    if step.kind != "train":
        return [sys.executable, script, *step.args]
    # A free port: other deepspeed runs on this machine may hold the default 29500.
    return ["deepspeed", "--num_gpus", str(cluster.gpus_per_node), "--master_port", str(free_port()), script,
            *step.args]


def step_env(plan: Plan, step: Step) -> Dict[str, str]:
    """Environment of a step: W&B groups every run of the pipeline and types each by its step."""
    if plan.wandb is None:
        return {}
    env = {"WANDB_RUN_GROUP": plan.pipeline, "WANDB_JOB_TYPE": step.stage or step.kind, "WANDB_MODE": plan.wandb}
    if step.kind != "train":  # training runs log through transformers (logging=wandb), the rest here
        env.update(DOMAINFORGE_WANDB="1", WANDB_DIR=str(plan.run_dir), WANDB_NAME=step.name)
    return env


def write_plan_file(plan: Plan) -> Path:
    """<run dir>/pipeline.json: the steps, what each evaluates and reads; the study's map of the run."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / PLAN_FILE
    write_atomic(path, json.dumps({"pipeline": plan.pipeline, "steps": [s.describe() for s in plan.steps]},
                                  indent=2) + "\n")
    return path


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
    check_step_environment(plan, [s for s in selected if not s.is_complete()])
    check_resumes(selected, cfg.cluster)
    check_outside_models(plan, selected)
    write_plan_file(plan)
    for step in selected:
        if step.is_complete():
            print(f"pipeline {plan.pipeline}: step {step.name} is complete ({step.output_dir}), skipping "
                  f"[{step.index + 1}/{len(plan.steps)}]", flush=True)
            continue
        for dep in step.depends_on:
            dep_step = plan.select(dep)[0]
            if not dep_step.is_complete():
                raise UserError(
                    f"pipeline {plan.pipeline}: step '{step.name}' needs step '{dep}' first ({dep_step.output_dir} "
                    f"is not finished): run python launch/pipeline.py pipeline={plan.pipeline} step={dep}"
                )
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
