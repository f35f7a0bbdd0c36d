"""The schemas of launch/pipeline.py and launch/submit.py (conf/pipeline_job.yaml, conf/pipeline/,
conf/cluster/): a pipeline's steps and evaluations, and the cluster its jobs run on."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING, DictConfig

from core.cli import ConfigCommand
from core.config import compose_config
from core.errors import UserError
from core.validate import at_least, between, checked, non_negative, writable_dir


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


PIPELINE_COMMAND = ConfigCommand(
    "pipeline.py", "pipeline_job", PipelineJobConfig, compose_pipeline_job,
    keys=("pipeline.start", "pipeline.overrides", "pipeline.eval.tasks", "root", "step", "cluster.gpus_per_node"),
    example="pipeline=tiny \"pipeline.overrides=['data.sft.path=my_chats.jsonl']\"",
)
"""launch/pipeline.py's command line: --help, --cfg, or the pipeline job to run here."""

SUBMIT_COMMAND = dataclasses.replace(
    PIPELINE_COMMAND, script="submit.py",
    keys=("pipeline.start", "pipeline.overrides", "root", "step", "cluster.nodes", "cluster.gpus_per_node",
          "cluster.partition", "cluster.account", "cluster.time", "cluster.setup"),
    example="pipeline=tiny cluster=slurm cluster.partition=gpu cluster.time=02:00:00",
    flags=(("--dry-run", "write and print the batch scripts; submit nothing"),),
)
"""launch/submit.py's command line for a pipeline (a single stage takes launch/train.py's)."""


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


def training_world_size(cluster: DictConfig) -> int:
    """The ranks a training job of this cluster config runs."""
    return cluster.tasks if cluster.tasks is not None else cluster.nodes * cluster.gpus_per_node
