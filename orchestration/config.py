"""The schemas of launch/pipeline.py and launch/submit.py (conf/pipeline_job.yaml, conf/pipeline/,
conf/cluster/): a pipeline's steps and evaluations, and the cluster its jobs run on."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from core.cli import ConfigCommand
from core.config import compose_config
from core.errors import UserError
from core.wandb_runs import DEFAULT_WANDB_PROJECT
from core.validate import Check, at_least, between, checked, non_negative, writable_dir

SLURM_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|INFINITE|UNLIMITED)", re.I)
SLURM_MEMORY = re.compile(r"\d+[KMGT]?", re.I)
slurm_time = Check(lambda v: bool(SLURM_TIME.fullmatch(str(v))),
                   "must be a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 04:00:00)")
slurm_memory = Check(lambda v: bool(SLURM_MEMORY.fullmatch(str(v))),
                     "must be a SLURM memory size: <integer>[K|M|G|T], e.g. 64G (0: all of each node's memory)")
slurm_name = Check(lambda v: bool(re.fullmatch(r"[^\s,]+(,[^\s,]+)*", str(v))),
                   "must be SLURM names without spaces (several: comma-separated, e.g. gpu,gpu-long)")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class JobResources:
    """What one kind of job asks SLURM for (cluster.resources.<kind>); None: the cluster-wide
    cluster.<key>."""

    partition: Optional[str] = checked(None, slurm_name)
    qos: Optional[str] = checked(None, slurm_name)
    nodes: Optional[int] = checked(None, at_least(1))
    """Train, augment and merge jobs; eval and study jobs run on one node."""
    gpus_per_node: Optional[int] = checked(None, at_least(1))
    """Train, augment and eval jobs (an eval job starts one task per GPU); merges and the study ask for none."""
    cpus_per_task: Optional[int] = checked(None, at_least(1))
    mem: Optional[str] = checked(None, slurm_memory)
    time: Optional[str] = checked(None, slurm_time)


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
    """cpt, sft, mixed, dpo or orpo for a training step ..."""
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
    resources: JobResources = field(default_factory=JobResources)
    """This step's SLURM job, over cluster.resources.<kind>, e.g. {nodes: 1, time: "02:00:00"} for a LoRA step."""
    evaluate: bool = True
    """With pipeline.eval.tasks: evaluate this step's model. false for an intermediate phase of a
    schedule whose model nobody compares (its storage probe, training.value_probe, still reports it)."""


@dataclass
class PipelineEvalConfig:
    tasks: List[str] = field(default_factory=list)
    """lm-eval tasks run on every model the pipeline makes (evaluation/tasks/, or lm-eval's own);
    empty: no evaluation steps and no study."""
    start: bool = True
    """Evaluate the starting model too: the baseline every strategy is compared with."""
    cpt_epochs: bool = False
    """Keep the model that ends each CPT epoch and evaluate it (the paper's CPT-epoch curve)."""
    eval_sets: List[str] = field(default_factory=list)
    """Your own eval sets, paper-format JSONL files (docs/eval.md): each runs on every model as
    tasks `<file stem>_loglik` and `<file stem>_gen`, beside `tasks` or alone."""
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
    settings: Dict[str, Any] = field(default_factory=dict)
    """A preset's own knobs, which its steps read as ${pipeline.settings.<key>} (epochs per phase,
    the data files of a schedule), set like any key: pipeline.settings.docs_epochs=5."""
    steps: List[StepConfig] = MISSING
    """Training and merge steps. Steps form a tree: several strategies can branch from a shared
    prefix (name the branch point as `input:`), which is trained once."""
    eval: PipelineEvalConfig = field(default_factory=PipelineEvalConfig)
    """Evaluation steps, one per model, then the study report (launch/study.py) over all of them."""
    wandb: Optional[str] = None
    """offline or online: every step logs to W&B, in one group named after the pipeline (job type:
    the stage, merge, eval or study); offline runs sync later with `wandb sync`. None: no W&B."""
    wandb_project: str = DEFAULT_WANDB_PROJECT
    """The W&B project of every step's run, training, merges, evals and the study alike."""
    wandb_entity: Optional[str] = None
    """The W&B team or user of every step's run; None: the login's default entity."""


@dataclass
class KindResources:
    """Per step kind (STEP_KINDS in orchestration/steps.py): training and model rewrites take the
    cluster-wide resources; the CPU-only merge and study, and the evaluations, are sized here."""

    train: JobResources = field(default_factory=JobResources)
    augment: JobResources = field(default_factory=JobResources)
    merge: JobResources = field(default_factory=lambda: JobResources(nodes=1, cpus_per_task=4, mem="4G", time="02:00:00"))
    """The numpy merger (docs/merge.md): up to 4 worker processes, 167 MiB peak RSS with 2 workers
    on an 8B-scale pair (docs/BENCHMARKS.md), I/O-bound: an 8B pair is minutes on a shared filesystem."""
    eval: JobResources = field(default_factory=lambda: JobResources(nodes=1, time="04:00:00"))
    """lm-eval on one node; the paper's tasks on an 8B model take well under an hour there."""
    study: JobResources = field(default_factory=lambda: JobResources(nodes=1, cpus_per_task=1, mem="4G", time="00:30:00"))
    """Tables and plots from the evaluation results: seconds."""


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
    mem: Optional[str] = checked("0", slurm_memory)
    """Memory per node, e.g. 500G; "0": all of each node's memory (SLURM's convention), what
    a training job on whole GPU nodes wants; None: the partition default (often a few GB per
    CPU). On nodes shared with other jobs, set a size."""
    partition: Optional[str] = checked(None, slurm_name)
    account: Optional[str] = checked(None, slurm_name)
    qos: Optional[str] = checked(None, slurm_name)
    time: str = checked("24:00:00", slurm_time)
    """Time limit of a training job; a job that hits it checkpoints and requeues itself."""
    resources: KindResources = field(default_factory=KindResources)
    """Per kind of job (train, augment, merge, eval, study): partition, qos, nodes, gpus_per_node,
    cpus_per_task, mem and time, each defaulting to the cluster-wide key above, e.g.
    cluster.resources.merge.partition=cpu cluster.resources.eval.qos=short."""
    signal_seconds: int = checked(600, non_negative)
    """SIGUSR1 this long before the time limit: time to finish a step and write a checkpoint."""
    requeue: bool = True
    max_requeues: int = checked(3, non_negative)
    """A training job requeues itself after a checkpoint at most this many times (SLURM_RESTART_COUNT,
    which counts preemptions too); past it the job fails, so its dependents are cancelled."""
    merge_tasks: Optional[int] = checked(None, at_least(1))
    """Tasks of a merge job (the merge is split across them, one worker each); None: one per node
    of the merge job (cluster.resources.merge.nodes)."""
    master_port: Optional[int] = checked(None, between(1024, 65535))
    """torch.distributed port; None: derived from the job id so jobs sharing a node differ."""
    python: Optional[str] = None
    """Interpreter of the jobs; None: `python` as found on PATH after cluster.setup (the one the
    setup activates) when there is a setup, else the one running submit.py."""
    setup: List[str] = field(default_factory=list)
    """Shell lines each job runs first, before strict mode (conda and module scripts read unset
    variables): module load ..., source venv/bin/activate. A failing line ends the job."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables of every job, after the setup; the job's shell expands them, e.g.
    {HF_HOME: /scratch/$USER/hf, HF_HUB_OFFLINE: "1", NCCL_SOCKET_IFNAME: ib0}."""
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


TRAINING_STEP_PREFIXES = ("data=", "data.", "model.")
"""Command-line arguments of a pipeline that are launch/train.py's: your data (a data preset,
data.<kind>.path=...) and model settings (model.attn_implementation=sdpa) for every training step."""


def compose_pipeline_job(overrides: List[str]) -> DictConfig:
    """The pipeline job; `data=`, `data.*` and `model.*` arguments join pipeline.overrides, after
    the preset's own, so every training step gets them (and checks them when the plan is made)."""
    for_steps = [a for a in overrides if a.startswith(TRAINING_STEP_PREFIXES)]
    if any(a.startswith("model.path=") for a in for_steps):  # each step's input is the previous step's output
        raise UserError("model.path on a pipeline's command line would start every training step from that model: "
                        "give the starting model with pipeline.start=<model dir>")
    cfg = compose_config([a for a in overrides if a not in for_steps], "pipeline_job", PipelineJobConfig)
    cfg.pipeline.overrides = [*cfg.pipeline.overrides, *for_steps]
    check_cluster(cfg.cluster)
    return cfg


PIPELINE_COMMAND = ConfigCommand(
    "pipeline.py", "pipeline_job", PipelineJobConfig, compose_pipeline_job,
    keys=("pipeline.start", "pipeline.overrides",
          "pipeline.eval.tasks", "pipeline.eval.eval_sets", "root", "step", "cluster.gpus_per_node"),
    example="pipeline=tiny data.sft.path=my_chats.jsonl pipeline.eval.eval_sets=[my_eval.jsonl]",
    flags=(("--dry-run", "make every check (models, data, attention kernel), print the plan; run nothing"),),
)
"""launch/pipeline.py's command line: --help, --cfg, or the pipeline job to run here."""

SUBMIT_COMMAND = dataclasses.replace(
    PIPELINE_COMMAND, script="submit.py",
    keys=("pipeline.start", "pipeline.overrides",
          "pipeline.eval.eval_sets", "root", "step", "cluster.nodes", "cluster.gpus_per_node",
          "cluster.partition", "cluster.account", "cluster.time", "cluster.setup"),
    example="pipeline=tiny cluster=slurm cluster.partition=gpu cluster.time=02:00:00",
    flags=(("--dry-run", "make every check, print the batch scripts and the plan; write and submit nothing"),),
)
"""launch/submit.py's command line for a pipeline (a single stage takes launch/train.py's)."""


def check_cluster(cluster: DictConfig) -> None:
    """What the field checks cannot say: how the fields relate."""
    for name in cluster.env:
        if not ENV_NAME.fullmatch(name):
            raise UserError(f"cluster.env.{name}: not an environment variable name (letters, digits, _; not first a digit)")
    for kind in ("train", "augment"):  # the kinds whose jobs run cluster.tasks ranks
        check_ranks(kind_cluster(cluster, kind))


def kind_cluster(cluster: DictConfig, kind: str, step_resources: Optional[DictConfig] = None) -> DictConfig:
    """`cluster` as a job of `kind` sees it: cluster.resources.<kind>, then the step's own
    resources, in place of the cluster-wide keys they set."""
    out = cluster.copy()
    for resources in (cluster.resources[kind], step_resources or {}):
        for key, value in resources.items():
            if value is not None:
                out[key] = value
    return out


def check_ranks(cluster: DictConfig) -> None:
    nodes, gpus, tasks = cluster.nodes, cluster.gpus_per_node, cluster.tasks
    if tasks is not None and tasks > nodes * gpus:
        raise UserError(
            f"cluster.tasks={tasks} is more than cluster.nodes x cluster.gpus_per_node = {nodes} x {gpus} = "
            f"{nodes * gpus}: lower cluster.tasks or raise cluster.nodes / cluster.gpus_per_node"
        )
    if tasks is not None and tasks < nodes:
        raise UserError(f"cluster.tasks={tasks} is fewer than cluster.nodes={nodes}: every node needs a rank")


def training_world_size(cluster: DictConfig) -> int:
    """The ranks a training job of this cluster config runs."""
    return cluster.tasks if cluster.tasks is not None else cluster.nodes * cluster.gpus_per_node
