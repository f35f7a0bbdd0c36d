"""What weighted mixing costs the data pipeline: a 3-source mix against the same rows as one
source, in tokens/s of train/data/'s prepare step (load, map to the stage's columns, mix,
tokenize, count shares), in memory and streaming.

    python -m bench.data_mix                      # cpt and sft, 3 rounds, 4 copies of the rows
    python -m bench.data_mix --kinds sft --rounds 5 --copies 8

Sources: the bundled materials set (twice: two copies) and the general replay set
(data/general/; its SFT rows mapped from question/answer). The single source is one file holding
exactly those rows. Weights are the sources' row counts with all_exhausted, so the mix uses every
row, like the single source. datasets' cache is off, so every round tokenizes again. In memory:
tokens/s = dataset_tokens / wall seconds of prepare_<kind>; streaming: tokens of the first
--stream-rows rows read from the prepared stream / wall seconds of reading them, and separately
the start-up (building the stream; for the mix this measures the shares on its first rows).
Rounds alternate (single, mix, single, ...); the ratio is median(mix) / median(single).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402

from train.config import compose_train_config  # noqa: E402
from train.data.cpt import prepare_cpt  # noqa: E402
from train.data.sft import prepare_sft  # noqa: E402
from train.model import load_tokenizer  # noqa: E402

SOURCES = {  # kind -> (file, column mapping) of the three sources
    "cpt": [("materials/cpt.jsonl", {}), ("general/cpt.jsonl", {}), ("materials/cpt.jsonl", {})],
    "sft": [("materials/sft.jsonl", {}), ("general/sft.jsonl", {"question": "prompt", "answer": "completion"}),
            ("materials/sft.jsonl", {})],
}
PREPARE = {"cpt": prepare_cpt, "sft": prepare_sft}


def write_sources(kind: str, copies: int, tmp: Path):
    """Three source files (copies x each bundled file) and one file with all their rows."""
    paths, everything = [], []
    for i, (name, columns) in enumerate(SOURCES[kind]):
        rows = [json.loads(line) for line in (ROOT / "data" / name).read_text().splitlines()] * copies
        path = tmp / f"{kind}{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append((path, columns, len(rows)))
        renamed = [{columns.get(k, k): v for k, v in r.items()} for r in rows]
        everything += [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                       if "prompt" in r else r for r in renamed]
    single = tmp / f"{kind}_all.jsonl"
    single.write_text("".join(json.dumps(r) + "\n" for r in everything))
    return paths, single


def overrides(kind: str, paths, single, mixed: bool, streaming: bool):
    common = [f"+stage={kind}", "training.max_seq_length=512"]
    if streaming:
        common += [f"data.{kind}.streaming=true", "training.max_steps=2"]
    if not mixed:
        return common + [f"data.{kind}.path={single}"]
    entries = []
    for path, columns, n in paths:
        mapping = (", columns: {" + ", ".join(f"{a}: {b}" for a, b in columns.items()) + "}") if columns else ""
        entries.append(f"{{path: {path}, weight: {n}{mapping}}}")
    return common + [f"data.{kind}.path=null", f"data.{kind}.sources=[{', '.join(entries)}]",
                     f"data.{kind}.stopping_strategy=all_exhausted"]


def measure(kind, cfg, tokenizer, streaming: bool, stream_rows: int):
    """(tokens/s, start-up seconds). In memory: all of prepare_<kind>, no separate start-up.
    Streaming: tokens/s while reading the prepared stream; start-up = building it (for a mix,
    that includes measuring the shares on its first rows)."""
    start = time.perf_counter()
    data = PREPARE[kind](cfg, tokenizer)
    ready = time.perf_counter()
    if not streaming:
        return data.stats["dataset_tokens"] / (ready - start), 0.0
    tokens = sum(len(r["input_ids"]) for r in data.train_dataset.take(stream_rows))
    return tokens / (time.perf_counter() - ready), ready - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["cpt", "sft"], choices=sorted(SOURCES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--stream-rows", type=int, default=1000)
    args = parser.parse_args()
    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = None
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"datasets {datasets.__version__}; python {platform.python_version()}")
    print("| kind | mode | single source tok/s | 3-source mix tok/s | mix / single | start-up s, single / mix |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            paths, single = write_sources(kind, args.copies, Path(tmp))
            for streaming in (False, True):
                cfgs = {m: compose_train_config(overrides(kind, paths, single, m, streaming)) for m in (False, True)}
                tokenizer = tokenizer or load_tokenizer(cfgs[False].model)
                results = {False: [], True: []}
                for _ in range(args.rounds):
                    for mixed in (False, True):
                        results[mixed].append(measure(kind, cfgs[mixed], tokenizer, streaming, args.stream_rows))
                (one, one_start), (mix, mix_start) = (
                    [statistics.median(column) for column in zip(*results[m])] for m in (False, True))
                mode = f"streaming, {args.stream_rows} rows read" if streaming else "in memory, whole prepare"
                start_up = f"{one_start:.1f} / {mix_start:.1f}" if streaming else "-"
                print(f"| {kind} | {mode} | {one:,.0f} | {mix:,.0f} | {mix / one:.2f} | {start_up} |", flush=True)


if __name__ == "__main__":
    main()
