r"""Submit a pipeline to SLURM as a chain of batch jobs (one per step, --dependency=afterok),
or a single stage; show the status of submitted jobs.

    python launch/submit.py pipeline=tiny cluster=slurm cluster.nodes=2 cluster.gpus_per_node=8 \
        cluster.partition=gpu cluster.time=12:00:00
    python launch/submit.py pipeline=tiny cluster=slurm --dry-run            # print the scripts only
    python launch/submit.py pipeline=tiny cluster=slurm step=orpo            # one step of a pipeline
    python launch/submit.py +stage=sft model.path=/ckpt/cpt cluster=slurm cluster.nodes=4
    python launch/submit.py status pipeline=tiny                             # jobs, states, outputs
    python launch/submit.py status /scratch/runs/sft-tiny                    # any run directory

The scripts, merge configs, logs and job ids are kept in <root>/<pipeline>/jobs/ (for a
single stage: <output_dir>/jobs/). Design and preemption: docs/slurm.md.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `train` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402
from orchestration.config import SUBMIT_COMMAND, compose_pipeline_job  # noqa: E402
from orchestration.planner import plan_pipeline  # noqa: E402
from orchestration.slurm import print_status, stage_plan, submit_pipeline, submit_plan  # noqa: E402
from train.config import TRAIN_COMMAND  # noqa: E402

# Options of the submission itself; in `+stage=` mode everything else goes to launch/train.py.
SUBMIT_KEYS = ("cluster", "cluster.", "root=")


def main(argv):
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    if argv[:1] == ["status"]:
        rest = argv[1:]
        if len(rest) == 1 and "=" not in rest[0] and not rest[0].startswith("-"):
            return print_status(Path(rest[0]).expanduser().resolve())
        return print_status(plan_pipeline(SUBMIT_COMMAND.config(rest, __doc__)).run_dir)
    if not any(a.startswith("cluster=") for a in argv):
        argv = ["cluster=slurm", *argv]
    if any(a.startswith("+stage=") for a in argv):
        submit_args = [a for a in argv if a.startswith(SUBMIT_KEYS)]
        cluster = compose_pipeline_job(submit_args).cluster
        train_args = [a for a in argv if not a.startswith(SUBMIT_KEYS)]
        TRAIN_COMMAND.config(train_args, __doc__)  # --help, --cfg: the stage's, printed; exits
        plan = stage_plan(train_args)
        return submit_plan(plan, plan.steps, cluster, dry_run)
    return submit_pipeline(SUBMIT_COMMAND.config(argv, __doc__), dry_run)  # --help, --cfg exit here


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
