"""LoRA against full fine-tuning on SmolLM2-135M, side by side: tokens/s and peak RSS.

    flock /tmp/df-heavy.lock python -m bench.lora_vs_full                 # 4 steps of 4 x 256 tokens
    flock /tmp/df-heavy.lock python -m bench.lora_vs_full --steps 6 --seq 512 --batch 2

Each run is `python launch/train.py +stage=cpt model=smollm2_135m training.finetune=<mode>`
(1 process, DeepSpeed ZeRO-3, fp32), under `/usr/bin/time -f %M` for the whole process's peak
RSS. Tokens/s = num_input_tokens_seen / train_runtime from the Trainer's final log line, so
start-up (model load, dequantized GGUF cache) is excluded; the save (LoRA: adapter + merge)
is not part of it either, but it is in the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.launcher_env import bench_env

ROOT = Path(__file__).resolve().parents[1]
FINAL = re.compile(r"\{'train_runtime': '([\d.]+)'.*?'num_input_tokens_seen': (\d+)\}")


def run(mode: str, out: Path, a, env) -> tuple:
    cmd = ["/usr/bin/time", "-f", "peak_rss_kb=%M", sys.executable, "launch/train.py", "+stage=cpt",
           "model=smollm2_135m", f"training.finetune={mode}", f"output_dir={out}", f"training.max_steps={a.steps}",
           f"training.max_seq_length={a.seq}", f"training.per_device_train_batch_size={a.batch}",
           # the CPT preset's paper settings (6 x 2, checkpointing) would change what a step is
           "training.gradient_accumulation_steps=1", "training.global_batch_size=null", "training.gradient_checkpointing=false",
           "training.save_steps=1000000", "training.warmup_steps=0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{text[-3000:]}")
    m, rss = FINAL.search(text), re.search(r"peak_rss_kb=(\d+)", text)
    if not m or not rss:
        sys.exit(f"error: no final train_runtime / peak RSS in the output of {' '.join(cmd)}")
    return int(m.group(2)) / float(m.group(1)), int(rss.group(1)) / 1024, " ".join(cmd[3:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args()
    env = bench_env()
    work = Path(tempfile.mkdtemp(prefix="df-lora-bench-"))
    results = {}
    try:
        for mode in ("full", "lora"):
            results[mode] = run(mode, work / mode, a, env)
            print(f"{mode}: {results[mode][0]:.0f} tok/s, peak RSS {results[mode][1]:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}")
    print(f"settings: SmolLM2-135M, CPT, 1 process, ZeRO-3, fp32, batch {a.batch} x {a.seq} tokens, {a.steps} steps")
    print(f"command: {results['lora'][2]}")
    print(f"ratio lora/full: tokens/s {results['lora'][0] / results['full'][0]:.2f}x, "
          f"peak RSS {results['lora'][1] / results['full'][1]:.2f}x")


if __name__ == "__main__":
    main()
