"""CPT speed of the project at each precision against a bare PyTorch loop, same model, data,
sequence length, batch and steps.

    python -m bench.train_precision                                   # SmolLM2-135M, 1024 x 2, 8 steps, fp32 and bf16
    python -m bench.train_precision --model tiny --steps 20 --precisions bf16

ours: `python launch/train.py +stage=cpt model=<model> training.precision=<p>` (one rank, the
real path: TRL's SFTTrainer under DeepSpeed ZeRO-3), tokens/s from the per-step log lines
(tokens_per_second, logging_steps=1). bare: the same model loaded with transformers, torch's
AdamW, `loss.backward()`, clipping at 1.0, no Trainer, no DeepSpeed; fp32, or bf16 autocast
over fp32 weights (the same numerics as DeepSpeed's bf16: bf16 compute, fp32 master weights).
Both skip the first --warmup steps and report tokens / wall time over the rest; each runs in a
fresh process with the same environment and torch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.launcher_env import bench_env

ROOT = Path(__file__).resolve().parents[1]
STEP_LOG = re.compile(r"\{'loss':.*?'tokens_per_second': '([\d.]+)'")


def steady(tokens_per_second: list, warmup: int) -> float:
    """Tokens/s over the steps after the warmup: total tokens / total time (every step has the
    same tokens, so the harmonic mean of the per-step rates)."""
    rates = tokens_per_second[warmup:]
    if not rates:
        sys.exit(f"error: no steps after the {warmup} warmup steps: raise --steps")
    return len(rates) / sum(1 / r for r in rates)


def ours(a, precision: str, work: Path, env: dict) -> float:
    out = work / f"ours-{precision}"
    cmd = [sys.executable, "launch/train.py", "+stage=cpt", f"model={a.model}", f"output_dir={out}",
           f"training.precision={precision}", f"training.max_steps={a.steps}",
           f"training.max_seq_length={a.seq}", f"training.per_device_train_batch_size={a.batch}",
           "training.gradient_accumulation_steps=1", "training.global_batch_size=null",
           "training.gradient_checkpointing=false", "training.learning_rate=1e-4",
           "training.lr_scheduler_type=constant", "training.warmup_steps=0",
           "training.save_steps=1000000", "logging.logging_steps=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{log[-3000:]}")
    return steady([float(r) for r in STEP_LOG.findall(log)], a.warmup)


def bare(a, precision: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "bench.train_precision", "--bare-loop", precision, "--model", a.model,
           "--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return steady(json.loads(proc.stdout.strip().splitlines()[-1]), a.warmup)


def bare_loop(a, precision: str) -> None:
    """Runs in its own process: prints the per-step tokens/s as one JSON list."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.config import compose_train_config
    from train.model import load_tokenizer, model_config, resolve_model_dir

    cfg = compose_train_config(["+stage=cpt", f"model={a.model}"])
    tokenizer = load_tokenizer(cfg.model)
    model_dir = resolve_model_dir(cfg.model)
    if model_dir is None:  # random-init preset (tiny)
        model = AutoModelForCausalLM.from_config(model_config(cfg.model), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    texts = [json.loads(line)["text"] for line in (ROOT / "data/materials/cpt.jsonl").open()]
    ids = tokenizer(tokenizer.eos_token.join(texts), return_tensors="pt")["input_ids"][0]
    need = a.batch * a.seq
    ids = ids.repeat(need * a.steps // ids.numel() + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    rates = []
    for step in range(a.steps):
        batch = ids[step * need:(step + 1) * need].view(a.batch, a.seq)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rates.append(need / (time.perf_counter() - start))
        print(f"step {step}: loss {loss.item():.4f}, {rates[-1]:.1f} tok/s, {torch.get_num_threads()} threads",
              file=sys.stderr, flush=True)
    print(json.dumps(rates))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", help="a conf/model preset")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the rate")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--bare-loop", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.bare_loop:
        return bare_loop(a, a.bare_loop)

    env = bench_env()
    work = Path(tempfile.mkdtemp(prefix="df-precision-"))
    results = {}
    try:
        for precision in a.precisions:
            results[precision] = (ours(a, precision, work, env), bare(a, precision, env))
            print(f"{precision}: ours {results[precision][0]:.1f} tok/s, bare loop {results[precision][1]:.1f} tok/s",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}")
    print(f"settings: {a.model}, batch {a.batch} x {a.seq} tokens, {a.steps} steps ({a.warmup} warmup left out), 1 rank")
    print("| precision | ours tok/s | bare loop tok/s | ours / bare |")
    print("| --- | --- | --- | --- |")
    for precision, (o, b) in results.items():
        print(f"| {precision} | {o:.1f} | {b:.1f} | {o / b:.3f} |")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32: ours {results['bf16'][0] / results['fp32'][0]:.2f}x, "
              f"bare loop {results['bf16'][1] / results['fp32'][1]:.2f}x")


if __name__ == "__main__":
    main()
