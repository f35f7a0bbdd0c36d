"""Direct Preference Optimization with TRL's DPOTrainer, against a frozen reference model.

    deepspeed launch/train.py +stage=dpo model.path=outputs/sft-tiny
    deepspeed --num_gpus 8 launch/train.py +stage=dpo model=llama3_1_8b model.path=/ckpt/sft stage.beta=0.05
    deepspeed launch/train.py +stage=dpo model.path=outputs/sft-tiny stage.precompute_ref_log_probs=true

The reference is `stage.ref_model_path`, else the starting model. It is loaded after the TRL
config exists, so under ZeRO-3 it is partitioned across ranks like the policy (TRL wraps it in
a DeepSpeed inference engine). With `stage.precompute_ref_log_probs=true` its log-probs are
computed once and cached on disk, keyed by the reference model and the tokenized data; a
rerun or a resume loads them and never builds the reference at all. With
`training.finetune=lora` (and no stage.ref_model_path) there is no reference copy either: TRL
scores the reference with the policy's adapters disabled (train/lora.py). The reference and its
cache: train/dpo_reference.py.
"""

from __future__ import annotations

import re
from typing import List

from accelerate.utils import broadcast_object_list
from trl import DPOConfig

from core.errors import UserError
from train.data.preference import prepare_preference
from train.dpo_reference import CachedReferenceDPOTrainer, build_reference, ref_logps_cache_path, reference_dir
from train.lora import peft_config, uses_adapters


def trl_loss_types() -> List[str]:
    """The DPO losses the installed TRL implements, as its DPOConfig documents them. TRL itself
    only rejects an unknown one inside the first loss computation, after the models load."""
    return re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])


def loss_types(stage_cfg) -> list:
    """stage.loss_type as TRL's list; several, comma-separated, are summed."""
    known = trl_loss_types()
    types = [t.strip() for t in str(stage_cfg.loss_type).split(",") if t.strip()]
    unknown = [t for t in types if t not in known]
    if unknown or not types:
        raise UserError(
            f"stage.loss_type='{stage_cfg.loss_type}' is not a DPO loss: use one of {', '.join(known)} "
            "(comma-separated to combine)"
        )
    return types


class DPOStage:
    name = "dpo"

    def prepare_data(self, cfg, tokenizer):
        loss_types(cfg.stage)  # bad settings fail before anything is written
        reference_dir(cfg)
        return prepare_preference(cfg, tokenizer)

    def trainer_args(self, cfg, common):
        return DPOConfig(
            **common,
            beta=cfg.stage.beta,
            loss_type=loss_types(cfg.stage),
            max_length=cfg.stage.max_length,
            precompute_ref_log_probs=cfg.stage.precompute_ref_log_probs,
        )

    def build_trainer(self, cfg, args, model, tokenizer, data, callbacks):
        reference = None
        caches = {}
        if uses_adapters(cfg) and not cfg.stage.ref_model_path:
            pass  # LoRA: the reference is the policy with its adapters disabled, no second model
        elif args.precompute_ref_log_probs:
            splits = {"train": data.train_dataset, "eval": data.eval_dataset}
            caches = {name: ref_logps_cache_path(cfg, rows, args, model.dtype) for name, rows in splits.items()
                      if rows is not None}
            hit = [all(cache.is_file() for cache in caches.values())]
            broadcast_object_list(hit, from_process=0)
            # Without a cache hit a separate reference is loaded for the precompute, then freed;
            # the starting model needs none (TRL scores the policy before its first step).
            if not hit[0] and cfg.stage.ref_model_path:
                reference = build_reference(cfg, model, tokenizer)
        else:
            reference = build_reference(cfg, model, tokenizer)
        return CachedReferenceDPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=data.train_dataset,
            eval_dataset=data.eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            ref_logps_caches=caches,
            peft_config=peft_config(cfg),  # None: full fine-tuning
        )


HOOKS = DPOStage()
