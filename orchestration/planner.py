"""Pipelines: a named, ordered list of steps (training stages, merges, augmentations, and the
evaluations and study they imply) that run one after another, each reading earlier outputs.
The planner resolves a pipeline config into those steps: every reference to a model or a
dataset becomes a directory, and each step gets its entry point's arguments.

    python launch/pipeline.py pipeline=tiny                       # here (local.py)
    python launch/submit.py pipeline=tiny cluster=slurm ...       # one SLURM job per step (slurm.py)

Outputs go to `<root>/<pipeline>/<step>/`; generated files (sbatch scripts, job logs, job
ids) to `<root>/<pipeline>/jobs/`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import DictConfig

from core.config import user_conf_dir
from core.errors import UserError
from core.outputs import EVAL_DIR, MODEL_CACHE_DIR, epoch_model_dir, is_model_dir
from evaluation.run import eval_set_tasks
from orchestration.steps import JOBS_DIR, START, Plan, Step
from train.config import compose_train_config
from train.stages import STAGES


def local_path(path: str) -> str:
    """Absolute when it exists here (jobs run from the repo root, not the caller's cwd)."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(p)


def start_model_dir(pipeline: DictConfig, run_dir: Path) -> Optional[str]:
    """The starting model as a directory (None for random-init presets)."""
    if pipeline.start:
        return local_path(pipeline.start)
    # output_dir in the run: the composed config checks it is writable, and that one must be
    # only the model node is read: the steps' data is checked when their configs compose
    args = [f"model={pipeline.model}", "+stage=cpt", f"output_dir={run_dir / START}", "data.allow_demo=true"]
    model = compose_train_config(args).model
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
        self.gguf_converter: Optional[str] = None  # the first step that loads a GGUF preset's file

    def fail(self, message: str) -> UserError:
        return UserError(f"pipeline {self.pipeline.name}: {message}")

    @property
    def model_steps(self) -> List[Step]:
        """The training and merge steps planned so far."""
        return [s for s in self.steps if s.kind in ("train", "merge")]

    @property
    def evaluating(self) -> bool:
        return bool(self.pipeline.eval.tasks or self.pipeline.eval.eval_sets)

    @functools.cached_property
    def eval_sets(self) -> Dict[str, str]:
        """{file: absolute path} of pipeline.eval.eval_sets: jobs run from the repo root."""
        return {path: local_path(path) for path in self.pipeline.eval.eval_sets}

    @functools.cached_property
    def eval_tasks(self) -> List[str]:
        """Every task an evaluation step scores: pipeline.eval.tasks, then each eval set's two
        (`<file stem>_loglik`, `<file stem>_gen`); each file is checked now, before any step runs."""
        try:
            from_files = list(eval_set_tasks(list(self.eval_sets.values())))
        except UserError as err:
            raise self.fail(f"pipeline.eval.eval_sets: {err}") from err
        return list(dict.fromkeys([*self.pipeline.eval.tasks, *from_files]))

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
            step.resources = spec.resources
            self.steps.append(step)
            if self.evaluating and step.kind != "augment":
                self.plan_evals(step, spec.evaluate)
        if self.evaluating:
            self.plan_study()
        return Plan(self.pipeline.name, self.run_dir, self.steps, self.pipeline.wandb,
                    self.pipeline.wandb_project, self.pipeline.wandb_entity, user_conf_dir())

    def eval_step(self, name: str, model_dir: str, evaluates: str, out: Path, depends_on: List[str]) -> Step:
        # skip_scored: a rerun (or a requeued job) scores only the tasks a killed evaluation left without results
        args = [model_dir, f"tasks=[{','.join(self.pipeline.eval.tasks)}]", f"output_dir={out}", "skip_scored=true"]
        if self.eval_sets:
            args.append(f"eval_sets=[{','.join(self.eval_sets.values())}]")
        args += list(self.pipeline.eval.overrides)
        return Step(name, len(self.steps), out, "eval", args, evaluates=evaluates, tasks=self.eval_tasks,
                    depends_on=depends_on)

    def plan_evals(self, step: Step, evaluate: bool) -> None:
        """An evaluation of `step`'s model right after it (unless the step says `evaluate: false`);
        before the first model step, of the start model too (after the step that converts it, for
        a GGUF preset)."""
        first_model_step = len(self.model_steps) == 1
        if first_model_step and self.pipeline.eval.start and self.start_dir is not None:
            after = self.start_copy_written_by(f"eval-{START}") if is_gguf_cache(self.start_dir) else []
            start_eval = self.eval_step(f"eval-{START}", self.start_dir, START, self.run_dir / START / EVAL_DIR, after)
            if after:
                self.steps.append(start_eval)
            else:
                self.steps.insert(len(self.steps) - 1, start_eval)
                for i, s in enumerate(self.steps):
                    s.index = i
        if not evaluate:
            return
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
        step.args.append("training.keep_epoch_models=true")  # before the config is composed: it has it
        try:
            training = step.config.training
        except UserError as err:
            raise UserError(f"pipeline {self.pipeline.name}, step '{step.name}': {err}") from err
        epochs = training.num_train_epochs
        if training.max_steps > 0 or epochs != int(epochs):
            raise self.fail(
                f"pipeline.eval.cpt_epochs evaluates each CPT epoch, but step '{step.name}' runs "
                f"training.max_steps={training.max_steps}, num_train_epochs={epochs}: give it whole epochs "
                "(training.max_steps=-1, an integer training.num_train_epochs)"
            )
        return int(epochs)

    def plan_study(self) -> None:
        evals = [s.name for s in self.steps if s.kind == "eval"]
        self.steps.append(Step("study", len(self.steps), self.run_dir, "study", [str(self.run_dir)], depends_on=evals))

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

    def is_gguf_start_copy(self, path: Optional[str], dep: Optional[str]) -> bool:
        """`path`, which no step of this pipeline makes (`dep` None), is the copy a GGUF preset's start
        model is converted into (train/model.py), not a model directory the user gave."""
        return dep is None and not self.pipeline.start and path is not None and is_gguf_cache(path)

    def start_copy_written_by(self, reader: str) -> List[str]:
        """For a step that reads the GGUF preset's converted start model without loading the GGUF
        file itself: [] where the copy already exists here, else the earlier step that converts it."""
        if is_model_dir(self.start_dir):
            return []
        if self.gguf_converter is not None:
            return [self.gguf_converter]
        raise self.fail(
            f"step '{reader}' reads `start`, the copy of model {self.pipeline.model}'s GGUF file at "
            f"{self.start_dir}, which no earlier step writes and no run has written yet: run a step that trains "
            "from `start` first (in this pipeline or another, e.g. smollm2_knowledge before its follow-up), or set "
            "pipeline.start=<a model directory>"
        )

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
        elif self.gguf_converter is None and self.is_gguf_start_copy(self.start_dir, None):
            self.gguf_converter = spec.name  # its tokenizer loads the GGUF preset (train/model.py)
        deps = []
        if spec.augment.match is not None:
            matched = self.resolve_dataset(spec.augment.match, spec.name, "augment.match")
            args.append(f"augment.repeat.match={matched.output_dir}")
            deps.append(matched.name)
        args += list(spec.augment.overrides)
        return Step(spec.name, len(self.steps), out, "augment", args, depends_on=deps)

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
            if self.is_gguf_start_copy(path, dep):
                deps += self.start_copy_written_by(spec.name)
            deps += [dep] if dep else []
        args = [
            f"merge={spec.merge.preset}", f"merge.base_model={dirs['base_model']}",
            f"merge.model={dirs['model']}", f"output_dir={out}", *spec.merge.overrides,
        ]
        step = Step(spec.name, len(self.steps), out, "merge", args, merge_models=list(dirs.values()),
                    depends_on=deps, parents=[spec.merge.base_model, spec.merge.model])
        try:
            step.method = step.config.get("merge_method")  # the recipe, composed now: a bad one fails the plan
        except UserError as err:
            raise UserError(f"pipeline {self.pipeline.name}, step '{spec.name}': {err}") from err
        return step

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
        model = self.pipeline.model  # a preset name or a .yaml file (core/config.py:preset_files_as_choices)
        model = local_path(model) if model.endswith((".yaml", ".yml")) else model
        args = [f"+stage={spec.stage}", f"model={model}", f"output_dir={out}"]
        if self.pipeline.wandb is not None:
            args += ["logging=wandb", f"logging.mode={self.pipeline.wandb}", f"logging.run_name={spec.name}",
                     f"logging.project={self.pipeline.wandb_project}"]
            if self.pipeline.wandb_entity:
                args.append(f"logging.entity={self.pipeline.wandb_entity}")
        # A GGUF preset's start model is the copy the first step that loads the GGUF file converts it
        # into (train/model.py): every step reading `start` loads the preset itself, since a
        # model.path to that copy fails on a machine where no step has converted it yet.
        gguf_start = self.is_gguf_start_copy(input_dir, dep)
        if input_dir is not None and not gguf_start and (dep is not None or self.pipeline.start or spec.input):
            # A saved model directory: it takes precedence over a preset's GGUF file (train/model.py).
            args.append(f"model.path={input_dir}")
        elif gguf_start and self.gguf_converter is None:
            self.gguf_converter = spec.name
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
        return Step(spec.name, len(self.steps), out, "train", args, stage=spec.stage, input_dir=input_dir,
                    depends_on=deps)


def plan_pipeline(cfg: DictConfig) -> Plan:
    """Resolve every step's input, output and arguments; UserError on a bad reference."""
    return PipelinePlanner(cfg).plan()



def is_gguf_cache(path: str) -> bool:
    """A model directory the first step that loads a GGUF preset converts it into."""
    return Path(path).parent == MODEL_CACHE_DIR
