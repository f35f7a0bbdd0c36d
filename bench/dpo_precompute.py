"""DPO step time with a live reference model vs precomputed (cached) reference log-probs, on
the tiny model under the real launcher (ZeRO-3, 2 CPU ranks), both in one invocation.

    python bench/dpo_precompute.py --steps 30 --repeats 2

Runs alternate (live, precompute, live, precompute, ...) so a noisy neighbour hits both
alike. Step time is the median gap between consecutive `train_runtime` values the Trainer
logs, after 2 warm-up steps. The first precompute run computes and caches the reference
log-probs (its wall time includes that); later ones load them from the cache.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, steps: int, work: Path, cache: Path, index: int) -> dict:
    out = work / f"{mode}-{index}"
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(29700 + index),
        str(ROOT / "launch" / "train.py"), "+stage=dpo", f"output_dir={out}",
        f"training.max_steps={steps}", f"training.save_steps={steps}",
        "training.per_device_train_batch_size=2", "training.learning_rate=1e-4",
        "training.warmup_steps=0", "training.lr_scheduler_type=constant",
        "stage.max_length=256", "stage.max_prompt_length=192",
        f"stage.precompute_ref_log_probs={'true' if mode == 'precompute' else 'false'}",
    ]
    env = dict(os.environ, DOMAINFORGE_CACHE=str(cache), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {mode} run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    (state,) = (out / "checkpoints").glob("checkpoint-*/trainer_state.json")
    rows = [r for r in json.loads(state.read_text())["log_history"] if "loss" in r]
    times = [r["train_runtime"] for r in rows]
    gaps = [b - a for a, b in zip(times[2:], times[3:])]
    return {"mode": mode, "step_s": statistics.median(gaps), "wall_s": wall,
            "cached": "loaded from" in proc.stdout}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work, cache = Path(tmp) / "runs", Path(tmp) / "cache"
        results = []
        for i in range(a.repeats):
            for mode in ("live", "precompute"):
                r = run(mode, a.steps, work, cache, 2 * i + (mode == "precompute"))
                print(f"{mode:10s} step {r['step_s'] * 1000:7.1f} ms  wall {r['wall_s']:5.1f} s"
                      f"{'  (reference log-probs from cache)' if r['cached'] else ''}", flush=True)
                results.append(r)
    live = statistics.median(r["step_s"] for r in results if r["mode"] == "live")
    pre = statistics.median(r["step_s"] for r in results if r["mode"] == "precompute")
    print(f"\nmedian DPO step: live reference {live * 1000:.1f} ms, precomputed {pre * 1000:.1f} ms, "
          f"ratio live/precomputed {live / pre:.2f}x  ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})")


if __name__ == "__main__":
    main()
