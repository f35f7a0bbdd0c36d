"""A pipeline's steps and their kinds (train, merge, augment, eval, study), and the plan file.

A step kind is one declaration in STEP_KINDS: the entry point its step runs, how its output is
known to be finished, how its config is composed and checked, and how the runners start it
(docs/extending.md, "Adding a pipeline step kind").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from core.config import USER_CONF_ENV
from core.errors import UserError
from core.wandb_runs import DEFAULT_WANDB_PROJECT
from core.model_card import code_version
from core.outputs import is_augmented_dataset, is_model_dir, write_atomic
from evaluation.config import compose_eval_config
from evaluation.run import check_task_names
from merge.config import compose_merge_config, recipe_from_config
from merge.recipe import check_recipe
from train.augment.config import compose_augment_config
from train.config import compose_train_config

JOBS_DIR = "jobs"
START = "start"
"""Reference to the pipeline's starting model (e.g. the Instruct model a merge goes back to)."""
PLAN_FILE = "pipeline.json"
"""The resolved plan, written into the run directory: what the study report reads."""
STUDY_FILE = "study.json"


def model_written(output_dir: Path, tasks: List[str]) -> bool:
    return is_model_dir(output_dir)


def dataset_written(output_dir: Path, tasks: List[str]) -> bool:
    return is_augmented_dataset(output_dir)


def every_task_scored(output_dir: Path, tasks: List[str]) -> bool:
    return all((output_dir / f"{task}.json").is_file() for task in tasks)


def study_written(output_dir: Path, tasks: List[str]) -> bool:
    return (output_dir / STUDY_FILE).is_file()


def compose_merge_recipe(args: List[str]) -> dict:
    return recipe_from_config(compose_merge_config(args))


def compose_eval_step(args: List[str]):
    """An evaluation step's args start with the model directory (launch/eval.py's positional argument)."""
    return compose_eval_config([f"model_dir={args[0]}", *args[1:]])


@dataclass(frozen=True)
class StepKind:
    """Everything the planner's checks and the two runners need to know of one kind of step."""

    entry_point: str
    """The script in launch/ that runs the step, with the step's args."""
    is_complete: Callable[[Path, List[str]], bool]
    """(output directory, tasks) -> whether the step's output is finished (a rerun skips it)."""
    sbatch_template: str
    """Its SLURM job: orchestration/sbatch/<template>, filled by its renderer in job_scripts.py."""
    launcher: str
    """How launch/pipeline.py starts it (local.py's LAUNCHERS): deepspeed (the training ranks),
    per_gpu (one process per GPU) or python (one process)."""
    compose: Optional[Callable[[List[str]], Any]] = None
    """args -> the step's config; composing it checks every override. None: the step has none."""
    check: Optional[Callable[[Any], None]] = None
    """What composing cannot check, on the composed config, before any job runs."""
    check_once: bool = False
    """`check` reads only what every step of the kind shares in a pipeline: run it for the first."""
    wandb_in_args: bool = False
    """Its args turn W&B on (training: logging=wandb); the other kinds log through the environment."""


STEP_KINDS: Dict[str, StepKind] = {
    "train": StepKind("train.py", model_written, "train.sbatch", "deepspeed", compose=compose_train_config,
                      wandb_in_args=True),
    # the merge's own recipe checks (method, parameters, dtypes), before the models exist
    "merge": StepKind("merge.py", model_written, "merge.sbatch", "python", compose=compose_merge_recipe,
                      check=check_recipe),
    "augment": StepKind("augment.py", dataset_written, "augment.sbatch", "python", compose=compose_augment_config),
    # every evaluation of a pipeline runs the same tasks
    "eval": StepKind("eval.py", every_task_scored, "eval.sbatch", "per_gpu", compose=compose_eval_step,
                     check=check_task_names, check_once=True),
    "study": StepKind("study.py", study_written, "task.sbatch", "python"),
}


@dataclass
class Step:
    """A step with every reference resolved to a directory."""

    name: str
    index: int
    output_dir: Path
    kind: str
    """A key of STEP_KINDS."""
    args: List[str]
    """The arguments of its entry point, launch/<STEP_KINDS[kind].entry_point>."""
    stage: Optional[str] = None
    """cpt, sft, dpo or orpo (training steps)."""
    input_dir: Optional[str] = None
    """The model a training step starts from (None: random init, or a GGUF preset)."""
    merge_models: List[str] = field(default_factory=list)
    """Directories to merge (merge steps)."""
    depends_on: List[str] = field(default_factory=list)
    """Earlier steps whose outputs this one reads."""
    evaluates: Optional[str] = None
    """The model an evaluation step scores: a step name, `start`, or `<step>/epoch-<k>`."""
    tasks: List[str] = field(default_factory=list)
    """The tasks of an evaluation step; it is complete when each has its result file."""
    parents: List[str] = field(default_factory=list)
    """A merge's models as the pipeline names them: [base_model, model] (step names, `start`, ...)."""
    method: Optional[str] = None
    """A merge's merge_method (slerp, linear, ties, ...): the study names each merge by it."""
    epochs: Optional[int] = None
    """Epochs of a CPT step whose epoch models are kept and evaluated (pipeline.eval.cpt_epochs)."""
    resources: Optional[Any] = None
    """The step's own SLURM resources (StepConfig.resources), over cluster.resources.<kind>."""

    @functools.cached_property
    def config(self) -> Any:
        """The config composed from args (a merge's: its recipe), once per plan, on first use;
        None for a kind without one. A composing error (a typo'd override) raises here."""
        compose = STEP_KINDS[self.kind].compose
        return compose(self.args) if compose else None

    def is_complete(self) -> bool:
        return STEP_KINDS[self.kind].is_complete(self.output_dir, self.tasks)

    def describe(self) -> dict:
        """What the study report needs to know of this step (written to pipeline.json)."""
        return dict(name=self.name, kind=self.kind, stage=self.stage, output_dir=str(self.output_dir),
                    depends_on=self.depends_on, evaluates=self.evaluates, tasks=self.tasks, parents=self.parents,
                    method=self.method, epochs=self.epochs)


@dataclass
class Plan:
    pipeline: str
    run_dir: Path
    steps: List[Step]
    wandb: Optional[str] = None
    """W&B mode of every step (pipeline.wandb)."""
    wandb_project: str = DEFAULT_WANDB_PROJECT
    wandb_entity: Optional[str] = None
    user_conf: Optional[Path] = None
    """$DOMAINFORGE_CONF when the plan was made: every job composes its config with those presets."""

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


def step_env(plan: Plan, step: Step) -> Dict[str, str]:
    """Environment of a step: the user's presets (jobs recompose their configs), and W&B, which
    groups every run of the pipeline and types each by its step."""
    env = {USER_CONF_ENV: str(plan.user_conf)} if plan.user_conf else {}
    if plan.wandb is None:
        return env
    env.update(WANDB_PROJECT=plan.wandb_project, WANDB_RUN_GROUP=plan.pipeline,
               WANDB_JOB_TYPE=step.stage or step.kind, WANDB_MODE=plan.wandb)
    if plan.wandb_entity:
        env["WANDB_ENTITY"] = plan.wandb_entity
    if not STEP_KINDS[step.kind].wandb_in_args:  # training runs log through transformers, the rest here
        env.update(DOMAINFORGE_WANDB="1", WANDB_DIR=str(plan.run_dir), WANDB_NAME=step.name)
    return env


def write_plan_file(plan: Plan) -> Path:
    """<run dir>/pipeline.json: the steps, what each evaluates and reads; the study's map of the run;
    the code it was run or submitted with (each output's lineage.json has the code that made it)."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / PLAN_FILE
    described = {"pipeline": plan.pipeline, "code": code_version(), "steps": [s.describe() for s in plan.steps]}
    write_atomic(path, json.dumps(described, indent=2) + "\n")
    return path


def read_plan_file(run_dir: Path) -> Dict[str, dict]:
    """{step name: its description} from <run dir>/pipeline.json; empty when there is none."""
    path = run_dir / PLAN_FILE
    if not path.is_file():
        return {}
    return {s["name"]: s for s in json.loads(path.read_text())["steps"]}
