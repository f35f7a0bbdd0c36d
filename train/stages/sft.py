"""Supervised fine-tuning on chat Q&A: loss on assistant tokens only; optional packing with a
block-diagonal mask so packed examples never attend to each other.

    deepspeed launch/train.py +stage=sft model.path=outputs/cpt-tiny

CPT (train/stages/cpt.py) runs through the same TRL SFTTrainer on pre-packed text blocks.
"""

from trl import SFTConfig

from train.cpu_lm_head import SFTTrainerWithCpuLogits
from train.data.sft import prepare_sft
from train.lora import peft_config


class PretokenizedSFTStage:
    """TRL's SFTTrainer on data that train/data/ already tokenized, masked and packed."""

    def __init__(self, name, prepare, trainer_class=SFTTrainerWithCpuLogits):
        self.name = name
        self._prepare = prepare
        self.trainer_class = trainer_class  # SFTTrainerWithCpuLogits or a subclass (train/stages/mixed.py)

    def prepare_data(self, cfg, tokenizer):
        return self._prepare(cfg, tokenizer)

    def trainer_args(self, cfg, common):
        return SFTConfig(
            **common,
            max_length=cfg.training.max_seq_length,
            dataset_kwargs={"skip_prepare_dataset": True},  # TRL must not re-tokenize
            remove_unused_columns=False,
        )

    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks):
        return self.trainer_class(
            model=model,
            args=args,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            data_collator=data.data_collator,
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config(cfg),  # None: full fine-tuning
        )


HOOKS = PretokenizedSFTStage("sft", prepare_sft)
