"""Run a pipeline (training stages and merges, in order) on this machine.

    python launch/pipeline.py pipeline=tiny
    python launch/pipeline.py pipeline=tiny cluster.gpus_per_node=2          # 2 ranks per stage
    python launch/pipeline.py pipeline=smollm_base_cpt_sft_dpo root=/scratch/runs
    python launch/pipeline.py pipeline=tiny step=sft                         # one step only
    python launch/pipeline.py pipeline=tiny --dry-run                        # check everything, print the plan

Each training step runs `deepspeed --num_gpus <cluster.gpus_per_node> launch/train.py ...`;
outputs go to <root>/<pipeline>/<step>/. Finished steps are skipped, so rerunning the same
command continues where the last run stopped. --dry-run makes every check a run makes first
(models, data files and their columns, the attention kernel), prints the plan (resources, data
sizes, global batch, checkpoint disk) and runs nothing. Pipelines: conf/pipeline/; on SLURM use
launch/submit.py.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `train` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402
from orchestration.config import PIPELINE_COMMAND  # noqa: E402
from orchestration.local import run_local  # noqa: E402


def main(argv):
    dry_run = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    run_local(PIPELINE_COMMAND.config(argv, __doc__), dry_run)  # --help and --cfg print and exit here


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
