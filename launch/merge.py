r"""Merge models with mergekit's methods (slerp, linear, ties, dare_ties, model_stock, nuslerp, ...), streaming, with bounded memory: see docs/merge.md.

Drop-in for `mergekit-yaml CONFIG.yml OUT_DIR`:

    python launch/merge.py merge.yml outputs/merged
    python launch/merge.py merge.yml outputs/merged --workers 2 --shard-size 2GB --verify
    srun -N 4 --ntasks-per-node 1 python launch/merge.py merge.yml /shared/merged   # 4 nodes
    python launch/merge.py merge.yml out --num-workers 4 --worker-rank 1   # one of 4, by hand
    python launch/merge.py dare.yml outputs/merged --random-seed 1          # dare_*, della*: the draws

Hydra form (conf/merge_job.yaml + conf/merge/<preset>.yaml):

    python launch/merge.py merge=paper_slerp merge.model=outputs/orpo-tiny \
        merge.base_model=/models/Instruct output_dir=outputs/merged workers=2
"""

import os
import sys
from pathlib import Path

# Parallelism comes from the workers. A threaded BLAS under each of them (or beside other jobs)
# spins on busy cores: 64k-element dots went from 13 ms to 170 ms per 16M elements here.
os.environ["OPENBLAS_NUM_THREADS"] = "1"

# Put the repo root first: this file's own folder would otherwise shadow the `merge` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from merge.cli import merge_arguments
    from merge.run import run_merge

    return run_merge(*merge_arguments(argv, __doc__))  # --help and --cfg print and exit there


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
