"""Benchmark the streaming SLERP merger against mergekit 0.1.5 and the I/O floor, side by side.

    python -m bench.merge_bench                       # ~840M params, then 2x; both contenders
    python -m bench.merge_bench --params 840M --scales 1 --workers 2 --skip-mergekit
    bash bench/setup_mergekit.sh                      # once, for the mergekit column

Builds two synthetic Llama checkpoints (bf16, several shards, the second correlated with the
first) under --work-dir, then for each size runs, one after another on warm page cache
(inputs read once before each contender):
  - ours:     python launch/merge.py paper.yml OUT --workers W --shard-size 2GB
  - mergekit: /opt/mergekit-venv/bin/mergekit-yaml paper.yml OUT (if the venv exists)
  - I/O floor: `cat` every input shard (reading both models) and write one model's worth of
    output with `cat > file`; reported without and with an fsync of the output, since our
    merger fsyncs every shard before marking it complete and mergekit does not.
Peak RSS is the largest sum of RSS over the contender's whole process tree, sampled every 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MERGEKIT = Path("/opt/mergekit-venv/bin/mergekit-yaml")


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "llama-1b": LlamaShape(2048, 5632, 32, 4, 32000),  # TinyLlama's widths: 840M parameters at 34 layers
    "tiny": LlamaShape(64, 176, 4, 2, 512),  # for smoke runs and the tests: a few seconds per merge
}
PAPER_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def parse_count(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KMBGkmbg")) * scale)


def layer_shapes(i: int, shape: LlamaShape):
    kv = shape.hidden // shape.heads * shape.kv_heads
    h, f = shape.hidden, shape.inter
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def build_models(root: Path, params: int, shards: int, names=("base", "other"), shape=SHAPES["llama-1b"]):
    """Llama-shaped bf16 checkpoints of ~params parameters each, in root/<name>: the first is
    the base, every other one is 0.8·base + 0.6·noise (its own noise). Returns
    ({name: dir}, parameters per model, layers); kept between runs while the request is the same."""
    import torch
    from safetensors.torch import save_file

    per_layer = sum(numel(s) for s in layer_shapes(0, shape).values())
    layers = max(1, round((params - 2 * shape.vocab * shape.hidden - shape.hidden) / per_layer))
    shapes = {"model.embed_tokens.weight": (shape.vocab, shape.hidden)}
    for i in range(layers):
        shapes.update(layer_shapes(i, shape))
    shapes.update({"model.norm.weight": (shape.hidden,), "lm_head.weight": (shape.vocab, shape.hidden)})
    total = sum(numel(s) for s in shapes.values())
    dirs = {name: root / name for name in names}
    marker = root / "built.json"
    request = {"params": total, "shards": shards, "names": list(names), "shape": asdict(shape)}
    if marker.is_file() and json.loads(marker.read_text()) == request:
        return dirs, total, layers
    shutil.rmtree(root, ignore_errors=True)
    for d in dirs.values():
        d.mkdir(parents=True)
    groups, size = [[]], 0
    for name, dims in shapes.items():
        if size > total / shards and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += numel(dims)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {model: {} for model in names}
        for name in group:
            dims = shapes[name]
            b = torch.randn(dims, generator=gen) * 0.02 + (1.0 if "norm" in name else 0.0)
            tensors[names[0]][name] = b.to(torch.bfloat16)
            for model in names[1:]:
                tensors[model][name] = (0.8 * b + 0.6 * (torch.randn(dims, generator=gen) * 0.02)).to(torch.bfloat16)
            weight_map[name] = fname
        for model in names:
            save_file(tensors[model], str(dirs[model] / fname), metadata={"format": "pt"})
        del tensors
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.inter, "num_hidden_layers": layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }
    for d in dirs.values():
        (d / "config.json").write_text(json.dumps(config, indent=2))
        index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in (REPO / "train" / "assets" / "tiny_tokenizer").iterdir():
            shutil.copyfile(f, d / f.name)
    marker.write_text(json.dumps(request))
    return dirs, total, layers


def warm(dirs) -> None:
    """Read every input byte once so each contender starts on the same warm page cache."""
    for d in dirs.values():
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def measure(cmd, env=None, shell=False):
    """(wall seconds, peak RSS bytes summed over the process tree, peak RSS bytes of its largest
    single process, CPU seconds (user + sys) of the whole tree, return code). CPU seconds hold
    still when other jobs load the machine; wall time does not."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = largest = 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            rss = 0
            for p in procs:
                try:
                    one = p.memory_info().rss
                except psutil.Error:
                    continue
                rss += one
                largest = max(largest, one)
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.01)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped tree: workers joined by their parent count
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        print(f"[{cmd if shell else ' '.join(map(str, cmd))}] failed:\n{err[-2000:]}", file=sys.stderr)
    return wall, peak, largest, cpu, proc.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="840M", help="parameters per model at scale 1")
    ap.add_argument("--scales", default="1,2", help="model sizes as multiples of --params")
    ap.add_argument("--shards", type=int, default=4, help="input shards per model at scale 1")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default=str(REPO / "bench" / "_work"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over the contenders; the best is reported")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    work = Path(args.work_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        root = work / f"x{scale:g}"
        dirs, total, layers = build_models(root / "models", int(parse_count(args.params) * scale),
                                           max(2, round(args.shards * scale)))
        size = sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors"))
        cfg = root / "paper.yml"
        cfg.write_text(json.dumps({
            "slices": [{"sources": [{"model": str(dirs["other"]), "layer_range": [0, layers]},
                                    {"model": str(dirs["base"]), "layer_range": [0, layers]}]}],
            "merge_method": "slerp", "base_model": str(dirs["base"]),
            "parameters": {"t": PAPER_T}, "dtype": "bfloat16"}))
        print(f"\n== scale {scale:g}: {total / 1e6:.0f}M params, {layers} layers, {size / 1e9:.2f} GB per model", flush=True)
        out_floor = root / "floor"
        copy = (f"mkdir -p {out_floor}; for f in {dirs['base']}/*.safetensors; do "
                f"cat \"$f\" > {out_floor}/$(basename \"$f\"); done; cat {dirs['other']}/*.safetensors > /dev/null")
        contenders = {
            "io-floor": (copy, out_floor, True),
            "io-floor+fsync": (copy + f"; sync -d {out_floor}/*.safetensors", out_floor, True),
            "ours": ([sys.executable, str(REPO / "launch" / "merge.py"), str(cfg), str(root / "ours"),
                      "--workers", str(args.workers), "--shard-size", "2GB", "--quiet"], root / "ours", False),
        }
        if MERGEKIT.exists() and not args.skip_mergekit:
            contenders["mergekit"] = ([str(MERGEKIT), str(cfg), str(root / "mergekit")], root / "mergekit", False)
        walls = {label: [] for label in contenders}
        peaks = {label: 0 for label in contenders}
        for _ in range(args.repeat):  # rounds interleave the contenders: same load for each
            for label, (cmd, out, shell) in contenders.items():
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
                warm(dirs)
                wall, peak, _, _, rc = measure(cmd, env=env, shell=shell)
                if rc != 0:
                    sys.exit(f"{label} failed (exit {rc})")
                walls[label].append(wall)
                peaks[label] = max(peaks[label], peak)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {label:15s} {wall:6.2f} s  peak RSS {peak / 2**20:5.0f} MiB", flush=True)
        results = {label: (min(walls[label]), peaks[label], walls[label]) for label in contenders}
        for label, (best, peak, all_walls) in results.items():
            print(f"{label:15s} best {best:6.2f} s  {3 * size / 1e6 / best:6.0f} MB/s in+out  "
                  f"peak RSS {peak / 2**20:5.0f} MiB", flush=True)
        ours = results["ours"][0]
        line = f"ours vs io-floor: {ours / results['io-floor'][0]:.2f}x the time " \
               f"({ours / results['io-floor+fsync'][0]:.2f}x with fsync)"
        if "mergekit" in results:
            line += f"; mergekit / ours: {results['mergekit'][0] / ours:.1f}x faster"
        print(line, flush=True)
        rows.append((scale, total, size, results))
    print("\n| size | params | GB/model | contender | wall s (best) | all runs s | peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scale, total, size, results in rows:
        for label, (wall, peak, walls) in results.items():
            print(f"| x{scale:g} | {total / 1e6:.0f}M | {size / 1e9:.2f} | {label} | {wall:.2f} | "
                  f"{', '.join(f'{w:.2f}' for w in walls)} | {peak / 2**20:.0f} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
