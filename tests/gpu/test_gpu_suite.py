"""The GPU suite: the real commands in bf16 on CUDA, on random-initialised tiny models (model=tiny,
nothing to download). Every stage full, LoRA and QLoRA (with bitsandbytes installed); a killed
run resumed, on another GPU count too when there is more than one GPU; a SLERP merge of two
outputs; evaluation, data-parallel with more than one GPU; the tiny pipeline.

    python -m pytest tests/gpu -m gpu                               # fast: the pipeline without its evaluations
    DOMAINFORGE_GPU_SUITE=full python -m pytest tests/gpu -m gpu    # the whole tiny pipeline, evaluations and study
    bash bench/gpu_check.sh                                         # on a bare GPU machine: wheels, suite, benchmark

It is collected only when asked for (tests/conftest.py), so CPU-only CI neither runs nor skips
it; asked for without CUDA, each test skips saying so. DOMAINFORGE_GPU_SUITE_ON_CPU=1 runs it on
2 CPU ranks in fp32, to check the suite itself where there is no GPU.

Each `deepspeed` run of the tiny model spends 30-45 s starting (imports, CUDA, NCCL) and a few
seconds training, so the runs every selected test reads are started together when the module
starts, DOMAINFORGE_GPU_JOBS at a time (default: half the cores, at most 8), and each test waits
for its own. DOMAINFORGE_GPU_LOGS=DIR keeps every run's output there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch
from tests.support.env import REPO, free_port, generates, launch, loss_history, offline_env, tail
from safetensors.torch import load_file

from evaluation.results import load_results
from train.checkpoint import is_complete_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("DOMAINFORGE_GPU_SUITE_ON_CPU") == "1" else None)
RANKS = torch.cuda.device_count() if DEVICE == "cuda" else 2  # processes per run: every GPU
FULL = os.environ.get("DOMAINFORGE_GPU_SUITE", "fast") == "full"
JOBS = int(os.environ.get("DOMAINFORGE_GPU_JOBS") or max(1, min(8, (os.cpu_count() or 2) // 2)))
LOGS = os.environ.get("DOMAINFORGE_GPU_LOGS")
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
PRECISION, DTYPE = ("bf16", torch.bfloat16) if DEVICE == "cuda" else ("fp32", torch.float32)
DTYPE_NAME = str(DTYPE).removeprefix("torch.")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="CUDA is not available: the GPU suite needs a GPU "
                                              "(DOMAINFORGE_GPU_SUITE_ON_CPU=1 checks the suite itself on CPU ranks)"),
]

STEPS = 16
COMMON = [
    f"training.precision={PRECISION}",
    "training.max_seq_length=256",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
]
PREFERENCE = [
    "training.per_device_train_batch_size=2",
    "stage.max_length=256",
    "stage.max_prompt_length=192",
]
LEARNING_RATE = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}  # adapters train at higher rates
STAGES = ("cpt", "sft", "dpo", "orpo")
FINETUNES = ("full", "lora", "qlora")
STAGE_RUNS = [f"{stage}-{finetune}" for finetune in FINETUNES for stage in STAGES]
# Resume cases: (ranks of the killed run, ranks of the rerun).
RESUME_CASES = {"same-gpus": (RANKS, RANKS), "fewer-gpus": (RANKS, 1), "more-gpus": (1, RANKS)}
# The kill must land mid-run: a GPU step of the tiny model takes tens of milliseconds.
RESUME_STEPS, RESUME_SAVE = (300, 20) if DEVICE == "cuda" else (40, 8)
EVAL_TASKS = ["materials_sft_mc_loglik", "materials_sft_tf_gen"]
EVAL_LIMIT = 32
PIPELINE_MODELS = ["cpt", "sft", "dpo", "orpo", "slerp-dpo", "slerp"]


@dataclass
class Run:
    """A finished command: its output directory and the completed process."""

    out: Path
    proc: subprocess.CompletedProcess

    def check(self) -> "Run":
        assert self.proc.returncode == 0, f"{' '.join(map(str, self.proc.args))}\n{tail(self.proc)}"
        return self


def run_env(work: Path) -> dict:
    """offline_env, with a datasets cache of the run's own: runs side by side must not tokenize into
    one cache at once."""
    return offline_env(HF_DATASETS_CACHE=str(work / "hf-datasets"))


def keep_log(name: str, proc: subprocess.CompletedProcess) -> None:
    if LOGS:
        Path(LOGS).mkdir(parents=True, exist_ok=True)
        (Path(LOGS) / f"{name}.log").write_text(f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n"
                                               f"{proc.stdout}\n{proc.stderr}")


def learnable_preferences(path: Path) -> Path:
    """Bundled prompts and their right answers against one evasive non-answer: a clear signal."""
    rows = [json.loads(line) for line in (REPO / "data/materials/preference.jsonl").read_text().splitlines()[:64]]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                        "rejected": "I cannot say, maybe ask someone."}) + "\n" for r in rows))
    return path


# --- the runs: each a function of (work dir, Runs) returning a Run, started by Runs ----------


def stage_run(name: str) -> Callable:
    stage, finetune = name.split("-")

    def run(work: Path, runs: "Runs") -> Run:
        out = work / name
        args = [f"+stage={stage}", f"output_dir={out}", *COMMON, f"training.learning_rate={LEARNING_RATE[finetune]}",
                f"training.max_steps={STEPS}", f"training.save_steps={STEPS}", f"training.finetune={finetune}"]
        if stage in ("dpo", "orpo"):
            args += [*PREFERENCE, f"data.preference.path={learnable_preferences(work / f'{name}.jsonl')}"]
        proc = launch("train.py", args, ranks=RANKS, env=run_env(work / f"{name}.cache"), timeout=900)
        keep_log(name, proc)
        return Run(out, proc)

    return run


def start_training(args: List[str], out: Path, ranks: int) -> subprocess.Popen:
    """The launcher in a process group of its own, so that a kill takes all its ranks."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "launch" / "train.py"), *args, f"output_dir={out}"]
    log = open(out.parent / f"{out.name}.killed.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=run_env(out.parent / f"{out.name}.cache"), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def resume_run(case: str) -> Callable:
    first, second = RESUME_CASES[case]

    def run(work: Path, runs: "Runs") -> Run:
        out = work / f"resume-{case}"
        args = ["+stage=cpt", *COMMON, "training.learning_rate=1e-3", f"training.max_steps={RESUME_STEPS}",
                f"training.save_steps={RESUME_SAVE}", "training.save_total_limit=null"]
        launcher = start_training(args, out, first)
        first_checkpoint = out / "checkpoints" / f"checkpoint-{RESUME_SAVE}"
        deadline = time.time() + 600
        while not is_complete_checkpoint(first_checkpoint):
            if launcher.poll() is not None or time.time() > deadline:
                log = (out.parent / f"{out.name}.killed.log").read_text()[-3000:]
                raise AssertionError(f"the run to kill ended (exit {launcher.poll()}) or timed out before "
                                     f"its first checkpoint:\n{log}")
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGKILL)  # every rank at once, like a node failure
        launcher.wait()
        assert not (out / "config.json").exists(), (
            f"the run finished before it was killed: raise RESUME_STEPS ({RESUME_STEPS})")
        proc = launch("train.py", [*args, f"output_dir={out}"], ranks=second, env=run_env(work / f"{out.name}.cache"),
                      timeout=900)
        keep_log(f"resume-{case}", proc)
        return Run(out, proc)

    return run


def merge_run(work: Path, runs: "Runs") -> Run:
    """The paper's gradient SLERP of the DPO output onto the SFT output (same random start)."""
    base, model = runs.result("sft-full").check().out, runs.result("dpo-full").check().out
    out = work / "merged"
    proc = launch("merge.py", ["merge=paper_slerp", f"merge.base_model={base}", f"merge.model={model}",
                               f"merge.dtype={DTYPE_NAME}", f"output_dir={out}"], timeout=600)
    keep_log("merge", proc)
    return Run(out, proc)


def eval_command(model: Path, out: Path) -> List[str]:
    return [str(model), f"tasks=[{','.join(EVAL_TASKS)}]", f"limit={EVAL_LIMIT}", "batch_size=8",
            f"device={DEVICE}", f"dtype={DTYPE_NAME}", f"output_dir={out}", "log_samples=false"]


def eval_run(work: Path, runs: "Runs") -> Run:
    """One process on one GPU: the reference for the data-parallel run."""
    out = work / "eval-1"
    proc = launch("eval.py", eval_command(runs.result("sft-full").check().out, out), env=run_env(work / "eval-1.cache"),
                  timeout=600)
    keep_log("eval-1", proc)
    return Run(out, proc)


def data_parallel_eval_run(work: Path, runs: "Runs") -> Run:
    """One process per GPU, each scoring a share of the questions (lm-eval's data-parallel form,
    started with torch.distributed.run as docs/eval.md and the local pipeline's eval steps do)."""
    out = work / f"eval-{RANKS}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
           str(REPO / "launch" / "eval.py"), *eval_command(runs.result("sft-full").check().out, out)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(work / "eval-dp.cache"), capture_output=True, text=True,
                          timeout=600)
    keep_log("eval-dp", proc)
    return Run(out, proc)


def pipeline_run(work: Path, runs: "Runs") -> Run:
    root = work / "pipelines"
    fast = [] if FULL else ["pipeline.eval.tasks=[]"]  # its evaluations take ~6 of its ~9 minutes
    proc = launch("pipeline.py", ["pipeline=tiny", f"cluster.gpus_per_node={RANKS}", f"root={root}", *fast],
                  env=run_env(work / "pipeline.cache"), timeout=1800)
    keep_log("pipeline", proc)
    return Run(root / "tiny", proc)


def unavailable(name: str) -> Optional[str]:
    """Why a run cannot happen here, or None."""
    if name.endswith("-qlora"):
        if not HAS_BNB:
            return "QLoRA needs bitsandbytes (pip install bitsandbytes)"
        if DEVICE != "cuda":
            return "QLoRA's 4-bit base needs CUDA"
    if name in ("resume-fewer-gpus", "resume-more-gpus", "eval-dp") and RANKS < 2:
        return f"needs more than one GPU ({RANKS} here)"
    return None


# name -> (function, runs it reads). Started in this order: the longest first (the pipeline is a
# chain of runs), and a run's inputs before it, so that the pool never waits on a run it has not
# started.
RUNS: Dict[str, tuple] = {
    "pipeline": (pipeline_run, ()),
    **{f"resume-{case}": (resume_run(case), ()) for case in RESUME_CASES},
    **{name: (stage_run(name), ()) for name in STAGE_RUNS},
    "merge": (merge_run, ("sft-full", "dpo-full")),
    "eval-1": (eval_run, ("sft-full",)),
    "eval-dp": (data_parallel_eval_run, ("sft-full",)),
}
# test -> the runs it reads, from its parameters
READS: Dict[str, Callable[[dict], List[str]]] = {
    "test_stage_trains_in_bf16_and_the_model_generates": lambda p: [p["run"]],
    "test_killed_run_resumes_from_its_checkpoint_and_finishes": lambda p: [f"resume-{p['case']}"],
    "test_merge_of_two_outputs_generates": lambda p: ["merge"],
    "test_evaluation_writes_metrics": lambda p: ["eval-1"],
    "test_data_parallel_evaluation_matches_one_process": lambda p: ["eval-1", "eval-dp"],
    "test_tiny_pipeline": lambda p: ["pipeline"],
}


class Runs:
    """Every run the selected tests read, with the runs those read, started together."""

    def __init__(self, work: Path, wanted: set):
        self.work = work
        needed = set(wanted)
        for name in wanted:
            needed.update(RUNS[name][1])
        self.pool = ThreadPoolExecutor(JOBS)
        self.futures = {name: self.pool.submit(RUNS[name][0], work, self)
                        for name in RUNS if name in needed and not unavailable(name)}

    def result(self, name: str) -> Run:
        reason = unavailable(name)
        if reason:
            pytest.skip(reason)
        return self.futures[name].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    wanted = set()
    for item in request.session.items:
        if item.path == Path(__file__) and item.originalname in READS:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            wanted.update(READS[item.originalname](params))
    started = Runs(tmp_path_factory.mktemp("gpu-suite"), wanted)
    yield started
    started.close()


def training_args(out: Path):
    """The TrainingArguments the newest checkpoint of a run was trained with."""
    newest = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return torch.load(newest / "training_args.bin", weights_only=False)


def mean(values) -> float:
    return sum(values) / len(values)


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("run", STAGE_RUNS)
def test_stage_trains_in_bf16_and_the_model_generates(runs, run):
    """The stage trains under the launcher in bf16, its loss falls, and what it publishes loads
    with AutoModelForCausalLM on the GPU and generates (adapters: adapter/ and the merged model)."""
    out = runs.result(run).check().out
    losses = loss_history(out)
    assert len(losses) == STEPS, losses
    assert mean(losses[-4:]) < 0.95 * mean(losses[:4]), losses
    args = training_args(out)
    assert args.bf16 is (PRECISION == "bf16") and not args.fp16
    assert (out / "config.json").exists()
    if not run.endswith("-full"):
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert generates(out, DEVICE, DTYPE)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_run_resumes_from_its_checkpoint_and_finishes(runs, case):
    """A launcher killed after its first checkpoint, rerun (on another GPU count where named):
    it resumes from a checkpoint past step 0, trains to the end and publishes; the loss after
    the resume continues from where it was, not from a fresh model's."""
    result = runs.result(f"resume-{case}").check()
    resumed = re.search(r"resuming from \S+checkpoint-(\d+)", result.proc.stdout)
    assert resumed, result.proc.stdout[-3000:]
    step = int(resumed.group(1))
    assert RESUME_SAVE <= step < RESUME_STEPS
    assert (result.out / "config.json").exists()
    losses = loss_history(result.out)
    assert len(losses) == RESUME_STEPS
    # weights restored: the first loss after the resume is nearer the last one before it than a fresh model's
    assert abs(losses[step] - losses[step - 1]) < abs(losses[step] - losses[0]), (losses[0], losses[step - 2:step + 2])
    before = losses[max(0, step - 10):step]
    assert mean(losses[-10:]) < mean(before) * 1.1, losses[step - len(before):]  # and kept falling


def test_merge_of_two_outputs_generates(runs):
    """A SLERP of two outputs loads on the GPU and generates, and a middle layer lies between
    its parents (neither one copied)."""
    merged = runs.result("merge").check().out
    parents = [runs.result(name).out for name in ("sft-full", "dpo-full")]
    name = "model.layers.2.self_attn.q_proj.weight"

    def tensor(model_dir: Path) -> torch.Tensor:
        files = sorted(model_dir.glob("*.safetensors"))
        return next(load_file(f)[name] for f in files if name in load_file(f)).float()

    mid = tensor(merged)
    for parent in parents:
        assert (mid - tensor(parent)).abs().max() > 1e-3
    assert generates(merged, DEVICE, DTYPE)


def eval_metrics(run: Run, model_dir: Path) -> dict:
    results = load_results(model_dir, run.out)
    assert sorted(results) == sorted(EVAL_TASKS), sorted(results)
    return results


def test_evaluation_writes_metrics(runs):
    """lm-eval on the GPU: a result file per task, each with metrics in [0, 1] over LIMIT questions."""
    model = runs.result("sft-full").out
    results = eval_metrics(runs.result("eval-1").check(), model)
    for task, metrics in results.items():
        assert metrics, task
        for metric, (value, _, n) in metrics.items():
            assert n == EVAL_LIMIT and 0.0 <= value <= 1.0, (task, metric, value, n)


def test_data_parallel_evaluation_matches_one_process(runs):
    """One evaluation process per GPU scores every question once: the same counts, and the same
    scores as one process up to bf16 batch effects (a question or two)."""
    model = runs.result("sft-full").out
    single = eval_metrics(runs.result("eval-1").check(), model)
    parallel = eval_metrics(runs.result("eval-dp").check(), model)
    for task in EVAL_TASKS:
        assert parallel[task].keys() == single[task].keys()
        for metric, (value, _, n) in parallel[task].items():
            assert n == EVAL_LIMIT
            assert abs(value - single[task][metric][0]) <= 2 / EVAL_LIMIT + 1e-9, (task, metric)


def test_tiny_pipeline(runs):
    """`python launch/pipeline.py pipeline=tiny` on every GPU: each training step and merge
    publishes a model, the last merge generates on the GPU, and (DOMAINFORGE_GPU_SUITE=full)
    every model is evaluated and the study report is written."""
    run = runs.result("pipeline").check()
    for step in PIPELINE_MODELS:
        assert (run.out / step / "config.json").exists(), step
    assert generates(run.out / "slerp", DEVICE, DTYPE)
    if FULL:
        assert (run.out / "study.md").exists()
        for step in PIPELINE_MODELS:
            results = load_results(run.out / step)
            assert results and all(results.values()), (step, results)
