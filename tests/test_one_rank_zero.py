"""ZeRO-3 on one rank (train/runtime.py pass_gradients_through_on_one_rank): the gradients skip
DeepSpeed's reduce-scatter, and training ends on the same weights to the bit.

    python -m pytest -q tests/test_one_rank_zero.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.env import REPO
from tests.support.zero_checkpoint import one_gloo_rank_env

# One gloo rank; a small MLP under ZeRO-3 with small buckets (several reduce-scatters a step),
# 3 optimizer steps of 2 accumulated micro-batches, in fp32 and bf16, before and after the
# shortcut. Prints the reduce-scatter calls and the final weights of each run.
TRAIN = """
import json, torch, deepspeed
import deepspeed.runtime.comm.coalesced_collectives as collectives
from train.runtime import pass_gradients_through_on_one_rank

deepspeed.init_distributed("gloo")
calls = []
collective = collectives._torch_reduce_scatter_fn
collectives._torch_reduce_scatter_fn = lambda *a, **k: calls.append(1) or collective(*a, **k)

def train(bf16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": bf16},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    inputs = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(2, 64, generator=inputs).to(torch.bfloat16 if bf16 else torch.float32)
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return [p.detach().float().flatten().tolist() for p in engine.module.parameters()]

torch.manual_seed(0)
runs = {"initial": (0, [p.detach().flatten().tolist() for p in torch.nn.Sequential(
    torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).parameters()])}
for shortcut in (False, True):
    if shortcut:
        pass_gradients_through_on_one_rank()
    for bf16 in (False, True):
        before = len(calls)
        weights = train(bf16)
        runs[f"{'shortcut' if shortcut else 'deepspeed'}-{'bf16' if bf16 else 'fp32'}"] = (len(calls) - before, weights)
print(json.dumps(runs))
"""


def test_one_rank_skips_the_reduce_scatter_and_trains_to_the_same_weights():
    proc = subprocess.run([sys.executable, "-c", TRAIN], cwd=REPO, env=one_gloo_rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    for precision in ("fp32", "bf16"):
        collectives, deepspeed_weights = runs[f"deepspeed-{precision}"]
        skipped, shortcut_weights = runs[f"shortcut-{precision}"]
        assert collectives >= 6 and skipped == 0, (precision, collectives, skipped)
        assert shortcut_weights == deepspeed_weights, precision
        assert deepspeed_weights != runs["initial"][1], precision  # it trained
