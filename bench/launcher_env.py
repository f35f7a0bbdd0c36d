"""The environment every benchmark gives the training commands it times: offline, no W&B, no
tokenizer threads competing with the ranks, TRL's experimental notice off."""

import os


def bench_env() -> dict:
    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                TRL_EXPERIMENTAL_SILENCE="1")
