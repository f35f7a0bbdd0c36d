"""Training throughput of a Llama-shaped model: the project's CPT stage against a plain TRL
script with the same settings, one row per set of throughput options, side by side.

    python -m bench.gpu_throughput                                        # 1.04 B, seq 2048, batch 8, every row
    python -m bench.gpu_throughput --rows plain,project,project+zero2 --json /tmp/tp.json
    python -m bench.gpu_throughput --hidden 128 --layers 2 --heads 4 --kv-heads 2 --ffn 256 --vocab 2048 \
        --seq 128 --batch 2 --steps 6 --warmup 2 --rows plain,project     # tiny: any machine, CPU included

Rows: `project` is `deepspeed --num_gpus G launch/train.py +stage=cpt` with the model shape as
`model.arch.*`; `plain` is bench/plain_trl_cpt.py (TRL's SFTTrainer, wrapped packing, no
project code). Both: bundled CPT corpus, repo tokenizer, random init, sdpa, bf16 on GPUs (fp32
on CPU), lr 1e-3 constant, no checkpoints, ZeRO-3, gradient checkpointing off. Options, joined
to a row name with '+', change both the same way:
    zero2    ZeRO-2 instead of ZeRO-3 (deepspeed=zero2)
    gc       gradient checkpointing (training.gradient_checkpointing=true)
    liger    Liger's fused kernels (training.extra_args.use_liger_kernel; needs liger-kernel)
    compile  torch.compile (training.extra_args.torch_compile)
A row that fails or cannot run here (liger-kernel absent) says so in the table; the others go on.

Measured, per row, one run each (GPU time is short; rerun for spread):
- tokens/s, steady: both scripts log every step (logging_steps=1; reading the logged loss waits
  for the GPU), and the log lines are timed as they arrive. Tokens of the steps after the first
  --warmup (start-up, allocator growth, compilation) over the time between those lines; tokens
  a step = num_input_tokens_seen / steps, from the trainer's final report (every row packs
  full blocks, so that is batch x seq x GPUs). "run tok/s" is the trainer's own
  num_input_tokens_seen / train_runtime, warm-up included, as bench/train_throughput.py reports.
- MFU = tokens/s x F / (GPUs x peak), F = 6N + 12 L h s FLOP a token (forward and backward):
  N the matmul parameters, L (2 h^2 + 2 h kv d + 3 h ffn) + h V (q, o; k, v; the gated MLP; the
  output head; embeddings are lookups), 12 L h s the attention scores and their weighted sum
  over s positions, causal masking not discounted. peak: the GPU's dense bf16 peak
  (--peak-tflops, 989 for H100/H200 SXM). Gradient checkpointing recomputes the forward, which
  this F does not count: its MFU is the useful share, as usual.
- peak memory: on GPUs the most memory nvidia-smi shows in use on any GPU of the run, less what
  was in use before it (CUDA context and allocator cache included, so above
  torch.cuda.max_memory_allocated); on CPU the largest resident memory of the launcher's process
  tree.
ratio: the row's tokens/s over the plain row with the same options when there is one, else over `plain`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import psutil
from bench.launcher_env import bench_env
from bench.train_throughput import FINAL

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("zero2", "gc", "liger", "compile")
ROWS = "plain,plain+gc,project,project+zero2,project+gc,project+liger,project+compile"
STEP_LOG = re.compile(r"\{'loss': ")
TOKENS_SEEN = re.compile(r"'num_input_tokens_seen': (\d+)")


def parse_row(name: str) -> tuple:
    runner, *options = name.split("+")
    if runner not in ("plain", "project") or any(o not in OPTIONS for o in options):
        sys.exit(f"error: --rows: '{name}' is not plain|project followed by +options from {', '.join(OPTIONS)}")
    return runner, frozenset(options)


def flop_per_token(a) -> float:
    """6N + 12 L h s, N the matmul parameters (see the module docstring)."""
    head_dim = a.hidden // a.heads
    per_layer = 2 * a.hidden * a.hidden + 2 * a.hidden * a.kv_heads * head_dim + 3 * a.hidden * a.ffn
    matmul_params = a.layers * per_layer + a.hidden * a.vocab
    return 6 * matmul_params + 12 * a.layers * a.hidden * a.seq, matmul_params


def project_command(a, options, out: Path, gpus: int, port: int) -> List[str]:
    arch = dict(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                num_key_value_heads=a.kv_heads, intermediate_size=a.ffn, vocab_size=a.vocab,
                max_position_embeddings=max(4096, a.seq), tie_word_embeddings=False)
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(port), "launch/train.py", "+stage=cpt",
           f"output_dir={out}", *[f"model.arch.{k}={v}" for k, v in arch.items()],
           f"training.max_steps={a.steps}", f"training.max_seq_length={a.seq}",
           # the CPT preset carries the paper's 6 x 2 accumulation: one micro-batch a step, as the plain script
           f"training.per_device_train_batch_size={a.batch}", "training.gradient_accumulation_steps=1", "training.global_batch_size=null",
           "training.learning_rate=1e-3",
           "training.lr_scheduler_type=constant", "training.warmup_steps=0",
           "+training.extra_args.save_strategy=no",  # as the plain script: no checkpoint to write
           f"training.gradient_checkpointing={'true' if 'gc' in options else 'false'}"]
    cmd += ["deepspeed=zero2"] if "zero2" in options else []
    cmd += ["+training.extra_args.use_liger_kernel=true"] if "liger" in options else []
    cmd += ["+training.extra_args.torch_compile=true"] if "compile" in options else []
    return cmd


def plain_command(a, options, out: Path, gpus: int, port: int, precision: str) -> List[str]:
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(port), "bench/plain_trl_cpt.py",
           "--out", str(out), "--steps", str(a.steps), "--seq", str(a.seq), "--batch", str(a.batch),
           "--hidden", str(a.hidden), "--layers", str(a.layers), "--heads", str(a.heads),
           "--kv-heads", str(a.kv_heads), "--ffn", str(a.ffn), "--vocab", str(a.vocab), "--untied",
           "--precision", precision, "--zero", "2" if "zero2" in options else "3"]
    flags = {"gc": "--gradient-checkpointing", "liger": "--liger", "compile": "--compile"}
    return cmd + [flag for option, flag in flags.items() if option in options]


class PeakMemory:
    """The most memory in use while a command runs, sampled every half second: on GPUs
    nvidia-smi's memory.used of any of the first `gpus` GPUs less its value before; on CPU the
    resident memory of the process tree."""

    def __init__(self, gpus: int, pid: int):
        self.gpus, self.pid, self.peak = gpus, pid, 0.0
        self.before = self.gpu_used() if gpus else []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def gpu_used(self) -> List[float]:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.split()
        return [float(x) / 1024 for x in out[:self.gpus]]  # MiB -> GiB

    def tree_rss(self) -> float:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**30

    def sample(self) -> None:
        while not self.done.wait(0.5):
            if self.gpus:
                now = max(u - b for u, b in zip(self.gpu_used(), self.before))
            else:
                now = self.tree_rss()
            self.peak = max(self.peak, now)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def run_row(cmd: List[str], gpus: int, warmup: int, log: Path) -> Dict[str, float]:
    """Run one command; its steady tokens/s, whole-run tokens/s and peak memory (GiB)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    memory = PeakMemory(gpus, proc.pid)
    step_times, step_tokens, lines = [], [], []
    with open(log, "w") as out:
        for line in proc.stdout:
            if STEP_LOG.search(line):
                step_times.append(time.monotonic())
                match = TOKENS_SEEN.search(line)
                step_tokens.append(int(match.group(1)) if match else None)
            lines.append(line)
            out.write(line)
    code = proc.wait()
    peak = memory.stop()
    text = "".join(lines)
    if code != 0:
        last = [l for l in lines if l.strip() and not l.startswith(" ")][-1:] or ["?"]
        raise RuntimeError(f"exit {code}: {last[0].strip()[:160]} (log: {log})")
    final = FINAL.search(text)
    if not final or len(step_times) <= warmup + 1:
        raise RuntimeError(f"{len(step_times)} step lines and {'a' if final else 'no'} final report (log: {log})")
    runtime, seen = float(final.group(1)), int(final.group(2))
    steps = len(step_times)
    per_step = seen / steps
    if None not in (step_tokens[warmup], step_tokens[-1]):  # the tokens each logged step had seen
        tokens = step_tokens[-1] - step_tokens[warmup]
    else:
        tokens = per_step * (steps - 1 - warmup)
    steady = tokens / (step_times[-1] - step_times[warmup])
    return {"tokens_per_s": steady, "run_tokens_per_s": seen / runtime, "peak_mem_gib": peak,
            "tokens_per_step": per_step, "steps": steps}


def machine(gpus: int) -> str:
    import torch  # no CUDA call here: a context in this process would take GPU memory from the runs

    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    if gpus:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        return f"{gpus} x {names[0] if names else '?'}, {os.cpu_count()} cores, {versions}"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return f"CPU only: {os.cpu_count()} cores, {cpu}, {versions}"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unavailable(options) -> Optional[str]:
    if "liger" in options and importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger-kernel is not installed (pip install liger-kernel)"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="per-device batch")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the steady tokens/s")
    p.add_argument("--gpus", type=int, default=None, help="ranks per run (default: every GPU, or 1 CPU rank)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU (H100/H200 SXM: 989)")
    p.add_argument("--rows", default=ROWS, help=f"comma-separated (default: {ROWS})")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--logs", help="keep each run's output in this folder (default: a temporary one)")
    a = p.parse_args()
    rows = [(name, *parse_row(name)) for name in a.rows.split(",")]
    if a.steps <= a.warmup + 1:
        sys.exit(f"error: --steps {a.steps} must exceed --warmup {a.warmup} + 1")

    gpus_here = gpu_count()
    gpus = a.gpus or max(gpus_here, 1)
    precision = "bf16" if gpus_here else "fp32"
    flop, matmul_params = flop_per_token(a)
    work = Path(tempfile.mkdtemp(prefix="df-gpu-throughput-"))
    logs = Path(a.logs) if a.logs else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine(gpus_here)}", flush=True)
    print(f"model: hidden {a.hidden}, {a.layers} layers, heads {a.heads}/{a.kv_heads} kv, ffn {a.ffn}, vocab "
          f"{a.vocab}: N = {matmul_params / 1e9:.3g} B matmul parameters; F = 6N + 12 L h s = {flop / 1e9:.3g} "
          f"GFLOP a token", flush=True)
    print(f"settings: {gpus} rank(s), {precision}, batch {a.batch} x {a.seq} tokens a rank, {a.steps} steps "
          f"(first {a.warmup} left out), peak {a.peak_tflops:g} TFLOP/s a GPU", flush=True)

    results: Dict[str, dict] = {}

    def save(results: Dict[str, dict]) -> None:  # after every row: a part cut short keeps its rows
        if a.json:
            Path(a.json).write_text(json.dumps({"machine": machine(gpus_here), "settings": vars(a), "gpus": gpus,
                                                "precision": precision, "flop_per_token": flop,
                                                "matmul_params": matmul_params, "rows": list(results.values())},
                                               indent=2) + "\n")
    try:
        for name, runner, options in rows:
            save(results)
            reason = unavailable(options)
            if reason:
                results[name] = {"row": name, "status": reason}
                print(f"{name}: {reason}", flush=True)
                continue
            out, port = work / name, free_port()
            cmd = (project_command(a, options, out, gpus, port) if runner == "project"
                   else plain_command(a, options, out, gpus, port, precision))
            started = time.time()
            try:
                row = run_row(cmd, gpus_here and gpus, a.warmup, logs / f"{name}.log")
            except RuntimeError as err:
                results[name] = {"row": name, "status": f"failed: {err}"}
                print(f"{name}: failed: {err}", flush=True)
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)
            row["mfu"] = row["tokens_per_s"] * flop / (gpus * a.peak_tflops * 1e12)
            row.update(row=name, status="ok", wall_s=time.time() - started)
            results[name] = row
            print(f"{name}: {row['tokens_per_s']:.0f} tok/s steady, {row['run_tokens_per_s']:.0f} tok/s run, "
                  f"MFU {100 * row['mfu']:.3g}%, peak {row['peak_mem_gib']:.2f} GiB, {row['wall_s']:.0f} s wall",
                  flush=True)
    finally:
        if not a.logs:
            shutil.rmtree(work, ignore_errors=True)

    ok = {name: options for name, runner, options in rows if runner == "plain" and results[name]["status"] == "ok"}
    for name, runner, options in rows:
        row = results[name]
        if row["status"] == "ok":
            # the plain row with the same options, else plain TRL with none
            row["vs"] = next((n for n, o in ok.items() if o == options), None) or next(
                (n for n, o in ok.items() if not o), None)
            row["ratio"] = row["tokens_per_s"] / results[row["vs"]]["tokens_per_s"] if row["vs"] else None

    print("\n| row | tokens/s (steady) | run tokens/s | MFU | peak memory GiB | ratio | vs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, _, _ in rows:
        r = results[name]
        if r["status"] != "ok":
            print(f"| {name} | {r['status']} | | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['run_tokens_per_s']:.0f} | {100 * r['mfu']:.3g}% | "
              f"{r['peak_mem_gib']:.2f} | {ratio} | {r['vs'] or '-'} |")
    save(results)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
