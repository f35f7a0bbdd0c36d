"""Run a pipeline (training stages and merges, in order) on this machine.

    python launch/pipeline.py pipeline=tiny
    python launch/pipeline.py pipeline=tiny cluster.gpus_per_node=2          # 2 ranks per stage
    python launch/pipeline.py pipeline=smollm_base_cpt_sft_dpo root=/scratch/runs
    python launch/pipeline.py pipeline=tiny step=sft                         # one step only

Each training step runs `deepspeed --num_gpus <cluster.gpus_per_node> launch/train.py ...`;
outputs go to <root>/<pipeline>/<step>/. Finished steps are skipped, so rerunning the same
command continues where the last run stopped. Pipelines: conf/pipeline/; on SLURM use
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
    run_local(PIPELINE_COMMAND.config(argv, __doc__))  # --help and --cfg print and exit here


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
