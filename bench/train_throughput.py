"""CPT throughput of domainforge against a plain TRL SFTTrainer script, side by side.

    python -m bench.train_throughput                      # 1 rank, 60 steps of 512 tokens, 3 rounds
    python -m bench.train_throughput --ranks 1 --steps 60 --seq 1024 --rounds 3

Both run the tiny model on the bundled CPT corpus under `deepspeed --num_gpus N` with ZeRO-3,
fp32, batch 1, the same seq length and steps. Tokens/s = num_input_tokens_seen / train_runtime
as the HF Trainer reports them at the end of each run, so start-up is excluded for both. The
rounds alternate (ours, plain, ours, ...) so drift on the machine hits both alike; the
reported ratio is median(ours) / median(plain).

Ranks: the plain script cannot run >1 CPU rank (accelerate 1.15 counts a 1-process world on
the CPU under DeepSpeed; see train/runtime.py), so the comparison uses 1 rank; on GPUs both
run on any number.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.launcher_env import bench_env

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"\{'train_runtime': '([\d.]+)'.*?'num_input_tokens_seen': (\d+)\}")


def run(cmd, env) -> float:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{out[-3000:]}")
    m = FINAL.search(out)
    if not m:
        sys.exit(f"error: no final train_runtime in the output of {' '.join(cmd)}")
    return int(m.group(2)) / float(m.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    env = bench_env()
    work = Path(tempfile.mkdtemp(prefix="df-throughput-"))
    launcher = ["deepspeed", "--num_gpus", str(a.ranks)]
    ours, plain = [], []
    try:
        for r in range(a.rounds):
            out = work / f"ours{r}"
            ours.append(run([*launcher, "launch/train.py", "+stage=cpt", f"output_dir={out}",
                             f"training.max_steps={a.steps}", f"training.max_seq_length={a.seq}",
                             "training.learning_rate=1e-3", "training.lr_scheduler_type=constant",
                             "training.warmup_steps=0", "training.save_steps=1000000",
                             # one sequence a step without checkpointing, as the plain script (the CPT
                             # preset carries the paper's 8B settings: 6 x 2 with checkpointing)
                             "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=1", "training.global_batch_size=null",
                             "training.gradient_checkpointing=false"], env))
            plain.append(run([*launcher, "bench/plain_trl_cpt.py", "--steps", str(a.steps),
                              "--seq", str(a.seq), "--out", str(work / f"plain{r}")], env))
            print(f"round {r + 1}: ours {ours[-1]:.0f} tok/s, plain TRL {plain[-1]:.0f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"machine: {os.cpu_count()} cores, {cpu}, {platform.python_version()}")
    print(f"settings: {a.ranks} rank(s), ZeRO-3, fp32, batch 1 x {a.seq} tokens, {a.steps} steps, {a.rounds} rounds")
    print(f"domainforge CPT: median {statistics.median(ours):.0f} tok/s  {[round(x) for x in ours]}")
    print(f"plain TRL SFT  : median {statistics.median(plain):.0f} tok/s  {[round(x) for x in plain]}")
    print(f"ratio (domainforge / plain TRL): {ratio:.3f}")


if __name__ == "__main__":
    main()
