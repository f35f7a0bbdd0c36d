"""A real DeepSpeed ZeRO-3 checkpoint in a few seconds, without the training stack: one gloo
rank, a two-layer model, one AdamW step, `engine.save_checkpoint` (tests/test_reshard.py
converts it into a universal checkpoint); and the environment of such a one-rank script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.env import free_port, offline_env

WRITE = """
import os, sys
import torch, deepspeed
deepspeed.init_distributed("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
engine.backward(engine(torch.randn(1, 64)).sum())
engine.step()
engine.save_checkpoint(sys.argv[1], tag="global_step1")
"""


def one_gloo_rank_env() -> dict:
    """What `deepspeed.init_distributed("gloo")` needs to start a world of one rank, without a launcher."""
    return offline_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def write_zero3_checkpoint(ckpt: Path) -> Path:
    """`ckpt` with `latest` = global_step1 and one rank's ZeRO-3 model and optimizer files."""
    proc = subprocess.run([sys.executable, "-c", WRITE, str(ckpt)], env=one_gloo_rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return ckpt
