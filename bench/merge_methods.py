"""Benchmark every merge method of launch/merge.py against mergekit 0.1.5, side by side.

    python -m bench.merge_methods                       # 840M params, every new method; ours also at 2x
    python -m bench.merge_methods --methods ties,model_stock --repeat 1
    python -m bench.merge_methods --skip-ours --scales 1         # mergekit's column alone
    python -m bench.merge_methods --shape tiny --params 200K --repeat 1 --json out.json   # smoke run
    bash bench/setup_mergekit.sh                        # once, for the mergekit column

Builds three synthetic Llama checkpoints (bf16, several shards, bench/merge_bench.py's builder:
base, and two models each 0.8·base + noise) under --work-dir. For each method, one recipe
(mergekit 0.1.5's YAML: `base_model` plus the two other models; see METHODS) is run by both
contenders, one after the other on warm page cache (every input byte read right before each run):
  - ours:     python launch/merge.py METHOD.yml OUT --workers W --shard-size 2GB --quiet
  - mergekit: /opt/mergekit-venv/bin/mergekit-yaml METHOD.yml OUT
mergekit runs at the first scale only (--mergekit-scales); ours runs at every scale in --scales,
so the table shows how our peak memory moves when the model size doubles. Method by method,
the contenders alternate for --repeat rounds (ours first in odd rounds, mergekit first in even
ones, so both see the same load and the same page-cache history). The table gives the median
over the rounds of wall time and of CPU time (user + sys of the whole process tree: it holds
still when other jobs load the machine, wall time does not), and the median of the per-round
ratios mergekit / ours; peak RSS is the largest over the rounds, both summed over the process
tree and for its largest process, sampled every 10 ms (bench/merge_bench.py's `measure`).
--json is rewritten after each method. A contender that fails is reported as failed, the
others still run, and the script exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.merge_bench import MERGEKIT, REPO, SHAPES, build_models, measure, parse_count, warm

MODELS = ("base", "model_a", "model_b")
# method -> (parameters of each merged model, top-level parameters): mergekit 0.1.5's names,
# values as its docs' examples use them. Every method merges model_a and model_b into
# base_model (three models), except slerp (base_model and model_a) and linear (all three, no base).
METHODS = {
    "linear": ({"weight": 1.0}, {}),
    "slerp": ({}, {"t": 0.5}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "dare_linear": ({"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs": ({"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.9, "gamma": 0.01}, {}),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0}),
    "della_linear": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {"lambda": 1.0}),
    "model_stock": ({}, {}),
    "nuslerp": ({"weight": 0.5}, {}),
}
NEW_METHODS = [m for m in METHODS if m not in ("linear", "slerp")]  # the default: slerp has bench/merge_bench.py


def recipe(method: str, dirs) -> dict:
    """mergekit YAML (as JSON, a YAML subset) of one method over the bench's models."""
    per_model, top = METHODS[method]
    names = {"linear": MODELS, "slerp": MODELS[:2]}.get(method, MODELS[1:])
    models = [{"model": str(dirs[name]), **({"parameters": dict(per_model)} if per_model else {})} for name in names]
    config = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        config["base_model"] = str(dirs[MODELS[0]])
    if top:
        config["parameters"] = dict(top)
    return config


def run_once(key, cmd, out: Path, dirs, env, results) -> None:
    """One measured run of one contender on warm page cache; results[key] accumulates."""
    row = results.setdefault(key, {"walls": [], "cpu_seconds": [], "peak_rss_tree": 0, "peak_rss_largest": 0})
    if row.get("failed"):
        return
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    warm(dirs)
    wall, tree, largest, cpu, rc = measure(cmd, env=env)
    shutil.rmtree(out, ignore_errors=True)
    label = f"{key[0]} {key[1]} x{key[2]:g}"
    if rc != 0:
        row["failed"] = f"exit {rc}"
        print(f"  {label:30s} FAILED (exit {rc})", flush=True)
        return
    row["walls"].append(round(wall, 3))
    row["cpu_seconds"].append(round(cpu, 3))
    row["peak_rss_tree"] = max(row["peak_rss_tree"], tree)
    row["peak_rss_largest"] = max(row["peak_rss_largest"], largest)
    print(f"  {label:30s} {wall:7.2f} s wall  {cpu:7.2f} s CPU  peak RSS {tree / 2**20:6.0f} MiB "
          f"(largest process {largest / 2**20:.0f})  load {os.getloadavg()[0]:.1f}", flush=True)


def run_ours(m, args, scales, mergekit_scales, models, env, results) -> None:
    """One round of ours on `m`, at every scale."""
    if args.skip_ours:
        return
    for scale in scales:
        root, dirs = models[scale]
        cfg = root / f"{m}.yml"
        cfg.write_text(json.dumps(recipe(m, dirs)))
        out = root / f"ours-{m}"
        run_once(("ours", m, scale), [sys.executable, str(REPO / "launch" / "merge.py"), str(cfg), str(out),
                                      "--workers", str(args.workers), "--shard-size", "2GB", "--quiet"],
                 out, dirs, env, results)


def run_mergekit(m, args, scales, mergekit_scales, models, env, results) -> None:
    """One round of mergekit on `m`, at the scales it runs at."""
    for scale in scales:
        root, dirs = models[scale]
        if scale not in mergekit_scales:
            continue
        cfg = root / f"{m}.yml"
        cfg.write_text(json.dumps(recipe(m, dirs)))
        out = root / f"mergekit-{m}"
        run_once(("mergekit", m, scale), [str(MERGEKIT), str(cfg), str(out)], out, dirs, env, results)


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def print_table(results, methods, scales) -> None:
    first = scales[0]

    def median(key, field):
        r = results.get(key)
        return statistics.median(r[field]) if r and r[field] and not r.get("failed") else None

    head = ["method", "ours wall s", "mergekit wall s", "wall mergekit / ours", "ours CPU s", "mergekit CPU s",
            "CPU mergekit / ours", "ours peak RSS MiB (tree / largest)", "mergekit peak RSS MiB"]
    head += [f"ours x{s:g}: wall s, peak RSS MiB (tree / largest)" for s in scales[1:]]
    print(f"\n(x{first:g} unless named; medians over the rounds, ratios: median of the per-round ratios)")
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for m in methods:
        ours, mk = ("ours", m, first), ("mergekit", m, first)

        def cell(key, text):
            r = results.get(key)
            return "-" if r is None or not (r["walls"] or r.get("failed")) else ("failed" if r.get("failed") else text(r))

        def ratio(field):
            a, b = results.get(mk), results.get(ours)
            if median(mk, field) is None or median(ours, field) is None:
                return "-"
            return f"{statistics.median(x / y for x, y in zip(a[field], b[field])):.1f}x"

        row = [m, cell(ours, lambda r: f"{median(ours, 'walls'):.2f}"), cell(mk, lambda r: f"{median(mk, 'walls'):.2f}"),
               ratio("walls"), cell(ours, lambda r: f"{median(ours, 'cpu_seconds'):.2f}"),
               cell(mk, lambda r: f"{median(mk, 'cpu_seconds'):.2f}"), ratio("cpu_seconds"),
               cell(ours, lambda r: f"{mib(r['peak_rss_tree'])} / {mib(r['peak_rss_largest'])}"),
               cell(mk, lambda r: mib(r["peak_rss_largest"]))]
        for s in scales[1:]:
            key = ("ours", m, s)
            row.append(cell(key, lambda r: f"{median(key, 'walls'):.2f}, "
                                           f"{mib(r['peak_rss_tree'])} / {mib(r['peak_rss_largest'])}"))
        print("| " + " | ".join(row) + " |", flush=True)


def write_json(path, sizes, results) -> None:
    Path(path).write_text(json.dumps({
        "sizes": {f"x{s:g}": v for s, v in sizes.items()},
        "runs": [{"contender": c, "method": m, "scale": s, **r} for (c, m, s), r in results.items()],
    }, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(NEW_METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    ap.add_argument("--params", default="840M", help="parameters per model at scale 1")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES), help="layer widths of the models")
    ap.add_argument("--scales", default="1,2", help="model sizes as multiples of --params (ours runs at each)")
    ap.add_argument("--mergekit-scales", default="1", help="the sizes mergekit runs at")
    ap.add_argument("--shards", type=int, default=4, help="input shards per model at scale 1")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work-dir", default=str(REPO / "bench" / "_work" / "methods"))
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds over the contenders; medians are reported")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"error: --methods: unknown {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if args.repeat < 1:
        sys.exit("error: --repeat must be >= 1 (3 or more for medians that mean something)")
    scales = [float(s) for s in args.scales.split(",")]
    mergekit_scales = {float(s) for s in args.mergekit_scales.split(",")}
    use_mergekit = MERGEKIT.exists() and not args.skip_mergekit
    if not MERGEKIT.exists() and not args.skip_mergekit:
        print(f"{MERGEKIT} is absent (bash bench/setup_mergekit.sh): ours only", file=sys.stderr)
    work = Path(args.work_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    sizes, models = {}, {}
    for scale in scales:
        root = work / f"x{scale:g}"
        dirs, total, layers = build_models(root / "models", int(parse_count(args.params) * scale),
                                           max(2, round(args.shards * scale)), MODELS, SHAPES[args.shape])
        size = sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors"))
        sizes[scale] = {"params": total, "layers": layers, "bytes_per_model": size}
        models[scale] = (root, dirs)
        print(f"x{scale:g}: {len(MODELS)} models of {total / 1e6:.1f}M params, {layers} layers, "
              f"{size / 1e9:.3f} GB each", flush=True)
    # Method by method, the contenders alternate (same load, each first in every other round);
    # results are written after each method, so an interrupted run keeps what it measured.
    results = {}
    for m in methods:
        for round_index in range(args.repeat):
            contenders = [run_ours, run_mergekit] if round_index % 2 == 0 else [run_mergekit, run_ours]
            for run in contenders:
                run(m, args, scales, mergekit_scales if use_mergekit else set(), models, env, results)
        if args.json:
            write_json(args.json, sizes, results)
    print_table(results, methods, scales)
    if not args.keep:
        for root, _ in models.values():
            shutil.rmtree(root, ignore_errors=True)
    failed = sorted(" ".join(map(str, k)) for k, r in results.items() if r.get("failed"))
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
