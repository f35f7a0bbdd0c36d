"""Metrics: W&B setup from conf/logging/, and the callbacks that add throughput and data stats
to every log line (so console, trainer_state.json and W&B all carry them)."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Dict, List

from transformers import GenerationConfig, TrainerCallback
from trl import LogCompletionsCallback



def report_to(log_cfg) -> List[str]:
    """The Trainer's `report_to` (backend and mode are checked by LoggingConfig's schema)."""
    return ["wandb"] if log_cfg.backend == "wandb" else ["none"]


def configure_wandb(log_cfg, run_name: str, output_dir: str) -> None:
    """transformers' WandbCallback reads these variables when it calls wandb.init."""
    if log_cfg.backend != "wandb":
        return
    os.environ["WANDB_MODE"] = log_cfg.mode
    os.environ["WANDB_PROJECT"] = log_cfg.project
    os.environ["WANDB_DIR"] = os.path.abspath(log_cfg.dir or output_dir)
    os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
    if log_cfg.entity:
        os.environ["WANDB_ENTITY"] = log_cfg.entity
    if log_cfg.group:
        os.environ["WANDB_RUN_GROUP"] = log_cfg.group
    if log_cfg.tags:
        os.environ["WANDB_TAGS"] = ",".join(log_cfg.tags)
    # One W&B run per run directory: a resumed job appends to the same run.
    os.environ.setdefault(
        "WANDB_RUN_ID", hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:12]
    )
    os.environ.setdefault("WANDB_RESUME", "allow")


class ThroughputCallback(TrainerCallback):
    """Adds tokens_per_second (input tokens across all ranks / wall time since the last log)
    and the data stats (e.g. packing_efficiency) to the Trainer's logs."""

    def __init__(self, stats: Dict[str, float]):
        self.stats = dict(stats)
        self._last_time = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if self._last_time is not None and now > self._last_time:
            logs["tokens_per_second"] = round((tokens - self._last_tokens) / (now - self._last_time), 2)
        self._last_time, self._last_tokens = now, tokens
        logs.update(self.stats)


class PromptCompletionsCallback(LogCompletionsCallback):
    """TRL's LogCompletionsCallback: at every evaluation step, greedy completions of `prompts`
    (raw strings or chat messages) go to W&B as the `completions` table.

    TRL's callback reads raw prompts from the eval set's `prompt` column; ours are tokenized,
    so it gets the raw prompts, as a plain list: accelerate does not split a datasets 5 `Column`
    between ranks (measured: 2 prompts on 2 ranks gave 4 table rows). The tokenizer's padding
    side is restored after its left-padded generation, so the saved tokenizer does not change."""

    def __init__(self, trainer, prompts: List, max_new_tokens: int):
        super().__init__(trainer, generation_config=GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False))
        self.eval_dataset = {"prompt": list(prompts)}

    def on_step_end(self, args, state, control, **kwargs):
        tokenizer = kwargs["processing_class"]
        side = tokenizer.padding_side
        try:
            super().on_step_end(args, state, control, **kwargs)
        finally:
            tokenizer.padding_side = side
