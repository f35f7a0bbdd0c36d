"""Augment a CPT corpus so that CPT can learn its facts: rule-based reading comprehension and
permutations, model-based rewriting (WRAP) with a fact filter, or the repeated-corpus control.
See docs/augment.md.

    python launch/augment.py augment=rules output_dir=outputs/augment/rules
    python launch/augment.py augment=wrap model=smollm2_135m output_dir=outputs/augment/wrap
    python launch/augment.py augment=wrap model.path=/models/instruct augment.rewrite.styles=[qa] output_dir=out/qa
    torchrun --nproc_per_node 4 launch/augment.py augment=wrap model.path=/models/instruct output_dir=/data/wrap
    srun -n 16 python launch/augment.py augment=wrap augment.rewrite.backend=vllm model.path=/m output_dir=/d
    python launch/augment.py augment=repeat augment.repeat.match=outputs/augment/rules output_dir=outputs/augment/rep

Then: deepspeed launch/train.py +stage=cpt data.cpt.path=outputs/augment/rules
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `train` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from train.augment.config import AUGMENT_COMMAND

    cfg = AUGMENT_COMMAND.config(argv, __doc__)  # --help, --cfg and mistakes end here, before torch loads
    from train.augment.run import run_augment

    run_augment(cfg)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
