"""Odds Ratio Preference Optimization: SFT and preference in one loss, no reference model.

    deepspeed launch/train.py +stage=orpo model.path=outputs/sft-tiny
    deepspeed --num_gpus 8 launch/train.py +stage=orpo model=llama3_1_8b model.path=/ckpt/sft

    L = NLL(chosen answer) - lambda * mean(log sigmoid(log odds(chosen) - log odds(rejected)))
    log odds(p) = log p - log(1 - p), p = exp(mean answer-token log-prob); lambda = stage.beta

TRL ships ORPO only in `trl.experimental.orpo`; everything that touches it is in this file, so
an API change there breaks this file and nothing else.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.experimental.utils import DPODataCollatorWithPadding, pad_to_length  # noqa: E402

from train.lora import peft_config  # noqa: E402
from train.data.preference import prepare_preference  # noqa: E402


class PretokenizedORPOTrainer(ORPOTrainer):
    """TRL's ORPOTrainer on pairs train/data/preference.py already rendered, tokenized and truncated,
    with the NLL term on the chosen answer only, as in the paper (-log P(y_w | x)).

    TRL 1.16's ORPO takes the NLL over every non-pad token of prompt + chosen, which also trains
    the model to write the questions; the odds-ratio term already uses answer tokens only.
    """

    def tokenize_row(self, feature, model=None):
        # feature: prompt_ids, chosen_ids, rejected_ids -> ORPO's padded-batch fields
        prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            row[f"{name}_input_ids"] = prompt + answer
            row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{name}_labels"] = [-100] * len(prompt) + answer
        return row

    def concatenated_forward(self, model, batch):
        outputs = list(super().concatenated_forward(model, batch))
        chosen_logits = outputs[2]  # [B, T-1, V]: position t predicts token t+1
        labels = pad_to_length(batch["chosen_labels"], chosen_logits.shape[1] + 1, pad_value=-100)
        labels = labels[:, 1:].to(chosen_logits.device)  # [B, T-1]
        outputs[4] = F.cross_entropy(
            chosen_logits.reshape(-1, chosen_logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        return tuple(outputs)


class CountingPaddingCollator:
    """TRL's ORPO padding collator plus `input_ids` (chosen rows, then rejected rows): the HF
    Trainer counts input tokens from `input_ids`, and ORPO's batch has none, so its
    throughput logs would read 0. ORPO itself only reads the chosen_*/rejected_* fields."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.padding = DPODataCollatorWithPadding(pad_token_id=pad_token_id)

    def __call__(self, features):
        batch = self.padding(features)
        chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]  # [B, Tc], [B, Tr]
        length = max(chosen.shape[1], rejected.shape[1])
        batch["input_ids"] = torch.cat(
            [pad_to_length(chosen, length, self.pad_token_id), pad_to_length(rejected, length, self.pad_token_id)]
        )  # [2B, T]
        return batch


class ORPOStage:
    name = "orpo"

    def prepare_data(self, cfg, tokenizer):
        return prepare_preference(cfg, tokenizer)

    def trainer_args(self, cfg, common):
        return ORPOConfig(
            **common,
            beta=cfg.stage.beta,
            max_length=cfg.stage.max_length,
            remove_unused_columns=False,  # the padding collator needs the prompt/chosen/rejected fields
        )

    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks):
        return PretokenizedORPOTrainer(
            model=model,
            args=args,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            data_collator=CountingPaddingCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=callbacks,
            peft_config=peft_config(cfg),  # None: full fine-tuning
        )


HOOKS = ORPOStage()

