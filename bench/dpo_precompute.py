"""DPO step time with a live reference model vs precomputed (cached) reference log-probs, on
the tiny model, both in one process, through the real stage code (train/stages/dpo.py,
train/dpo_reference.py).

    python -m bench.dpo_precompute --steps 40

One training step here is forward + backward of the DPO loss on a batch of 4 pairs at
max_length 256 (the optimizer step is the same in both modes and left out). The two trainers
step in turns on the same batches, and time is this process's CPU time (1 thread), so a
busy neighbour on a shared machine slows neither side. The one-off precompute (a reference
forward over the data set, then cached on disk) is timed separately.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import train.dpo_reference as dpo_reference
from bench.preference_harness import compose, trainer_for


def step_cpu_seconds(trainer, batch) -> float:
    model = trainer.model
    model.train()
    start = time.process_time()
    trainer.compute_loss(model, batch).backward()
    elapsed = time.process_time() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    common = ["stage.max_length=256", "stage.max_prompt_length=192"]
    with tempfile.TemporaryDirectory() as tmp:
        dpo_reference.REF_LOGPS_DIR = Path(tmp) / "ref_logps"
        _, live = trainer_for(compose("dpo", *common), Path(tmp) / "live", batch_size=a.batch)
        start = time.process_time()
        _, pre = trainer_for(compose("dpo", *common, "stage.precompute_ref_log_probs=true"), Path(tmp) / "pre",
                             batch_size=a.batch)
        setup_pre = time.process_time() - start
        assert live.ref_model is not None and pre.ref_model is None and pre.ref_logps_source == "computed"

        n = len(live.train_dataset)
        times = {"live": [], "precomputed": []}
        for step in range(a.steps):
            rows = [(step * a.batch + i) % n for i in range(a.batch)]
            for name, trainer in (("live", live), ("precomputed", pre)):
                batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
                times[name].append(step_cpu_seconds(trainer, batch))
    live_s = statistics.median(times["live"][2:])
    pre_s = statistics.median(times["precomputed"][2:])
    print(f"DPO step (fwd+bwd, {a.batch} pairs, CPU time, median of {a.steps - 2}): "
          f"live reference {live_s * 1000:.1f} ms, precomputed {pre_s * 1000:.1f} ms, "
          f"ratio live/precomputed {live_s / pre_s:.2f}x")
    print(f"precomputed trainer setup incl. the reference pass over {n} pairs: {setup_pre:.1f} s CPU")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, 1 thread")


if __name__ == "__main__":
    main()
