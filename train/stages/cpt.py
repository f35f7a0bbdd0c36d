"""Continued pretraining: raw domain text joined with EOS and packed into full
max_seq_length blocks, loss on every token, through TRL's SFTTrainer.

    deepspeed launch/train.py +stage=cpt
"""

from train.data.cpt import prepare_cpt
from train.stages.sft import PretokenizedSFTStage

HOOKS = PretokenizedSFTStage("cpt", prepare_cpt)
