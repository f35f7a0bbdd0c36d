"""Train one stage (CPT, SFT, mixed text + Q&A, DPO or ORPO) with DeepSpeed ZeRO-3.

    deepspeed launch/train.py +stage=cpt
    deepspeed --num_gpus 2 launch/train.py +stage=sft model.path=outputs/cpt-tiny
    deepspeed --num_gpus 2 launch/train.py +stage=mixed data.cpt.path=docs.jsonl data.sft.path=qa.jsonl
    deepspeed --num_gpus 8 launch/train.py +stage=orpo model=llama3_1_8b model.path=/ckpt/sft
    torchrun --nproc_per_node 2 launch/train.py +stage=cpt
    python launch/train.py +stage=cpt training.max_steps=20      # one process

Any config key can be overridden (key=value); see conf/ and train/config.py. --help lists the
groups, presets and keys; --cfg prints the resolved config and exits without training.
"""

import sys
from pathlib import Path

# Put the repo root first: this file's own folder would otherwise shadow the `train` package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import exit_on_user_error  # noqa: E402


def main(argv):
    from train.config import TRAIN_COMMAND

    cfg = TRAIN_COMMAND.config(argv, __doc__)  # --help, --cfg and mistakes end here, before torch loads
    from train.run import train

    train(cfg)


if __name__ == "__main__":
    exit_on_user_error(main, sys.argv[1:])
