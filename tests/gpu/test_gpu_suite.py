"""The GPU suite: the real commands in bf16 on CUDA, on random-initialised tiny models (model=tiny,
nothing to download). Every stage full, LoRA and QLoRA (with bitsandbytes installed; the merged
model checked against the dequantized base plus the adapter's delta); the automatic precision
and fp16 with dynamic loss scaling; a killed run resumed, on another GPU count too when there is
more than one GPU, loss by loss against an uninterrupted run; a SLERP merge of two outputs;
evaluation, exact on a known-answer model and data-parallel with more than one GPU; the tiny
pipeline.

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
from tests.support.eval_sets import KNOWN_ANSWER_FAVOUR, known_answer_sets
from tests.support.gpu import qlora_merge_reference
from tests.support.models import EVAL_SHAPE, load_dir, tiny_llama
from omegaconf import OmegaConf
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
SETTINGS = [
    "training.max_seq_length=256",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
]
COMMON = [f"training.precision={PRECISION}", *SETTINGS]
PREFERENCE = [
    "training.per_device_train_batch_size=2",
    "stage.max_length=256",
    "stage.max_prompt_length=192",
]
LEARNING_RATE = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}  # adapters train at higher rates
STAGES = ("cpt", "sft", "dpo", "orpo")
FINETUNES = ("full", "lora", "qlora")
STAGE_RUNS = [f"{stage}-{finetune}" for finetune in FINETUNES for stage in STAGES]
# The precision settings a plain stage run does not cover: auto (bf16 on a GPU with native bf16,
# else fp16) and fp16 with DeepSpeed's dynamic loss scaling (V100, T4). fp16 runs longer: its
# first steps may be skipped while the loss scale comes down from 2^16.
PRECISION_RUNS = {"cpt-auto": ("auto", STEPS), "cpt-fp16": ("fp16", 2 * STEPS)}
QLORA_FP16_RUN = "sft-qlora-fp16"
"""QLoRA where `auto` picks fp16 (V100, T4): its 4-bit weights must be stored in fp16, or DeepSpeed
casts the packed bytes as numbers."""
# Resume cases: (ranks of the killed run, ranks of the rerun).
RESUME_CASES = {"same-gpus": (RANKS, RANKS), "fewer-gpus": (RANKS, 1), "more-gpus": (1, RANKS)}
# The kill must land mid-run: a GPU step of the tiny model takes tens of milliseconds.
RESUME_STEPS, RESUME_SAVE = (300, 20) if DEVICE == "cuda" else (40, 8)
# Post-resume losses against the uninterrupted run of the same seed and global batch: bf16 (and
# NCCL's reduction order on another GPU count) moves them by ~1e-3; a lost optimizer state or
# data position moves them by more. fp32 on CPU ranks matches to 1e-4 (tests/test_reshard.py).
RESUME_TOLERANCE = 2e-2 if DEVICE == "cuda" else 1e-3
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


def qlora_base(path: Path) -> Path:
    """model=tiny's architecture, random, saved in bf16: a QLoRA run starts from it (model.path),
    so that the test can quantize the same weights again."""
    return tiny_llama(path, layers=4, hidden=256, intermediate=688, heads=4, kv_heads=2, tie=True,
                      max_positions=4096, special_tokens=True, shard=None)


def stage_run(name: str) -> Callable:
    stage, finetune, *precision = name.split("-")  # sft-qlora-fp16: QLoRA in fp16 (V100, T4)
    common = [*COMMON, f"training.precision={precision[0]}"] if precision else COMMON

    def run(work: Path, runs: "Runs") -> Run:
        out = work / name
        args = [f"+stage={stage}", f"output_dir={out}", *common, f"training.learning_rate={LEARNING_RATE[finetune]}",
                f"training.max_steps={STEPS}", f"training.save_steps={STEPS}", f"training.finetune={finetune}"]
        if stage in ("dpo", "orpo"):
            args += [*PREFERENCE, f"data.preference.path={learnable_preferences(work / f'{name}.jsonl')}"]
        if finetune == "qlora":
            args.append(f"model.path={qlora_base(work / f'{name}-base')}")
        proc = launch("train.py", args, ranks=RANKS, env=run_env(work / f"{name}.cache"), timeout=900)
        keep_log(name, proc)
        return Run(out, proc)

    return run


def precision_run(name: str) -> Callable:
    precision, steps = PRECISION_RUNS[name]

    def run(work: Path, runs: "Runs") -> Run:
        out = work / name
        args = ["+stage=cpt", f"output_dir={out}", f"training.precision={precision}", *SETTINGS,
                f"training.learning_rate={LEARNING_RATE['full']}", f"training.max_steps={steps}",
                f"training.save_steps={steps}"]
        proc = launch("train.py", args, ranks=RANKS, env=run_env(work / f"{name}.cache"), timeout=900)
        keep_log(name, proc)
        return Run(out, proc)

    return run


def resume_args() -> List[str]:
    return ["+stage=cpt", *COMMON, "training.learning_rate=1e-3", f"training.max_steps={RESUME_STEPS}",
            f"training.save_steps={RESUME_SAVE}", "training.save_total_limit=null"]


def uninterrupted_run(work: Path, runs: "Runs") -> Run:
    """The resume runs' reference: the same seed, settings and global batch, never killed."""
    out = work / "resume-reference"
    proc = launch("train.py", [*resume_args(), f"output_dir={out}"], ranks=RANKS, env=run_env(work / f"{out.name}.cache"),
                  timeout=900)
    keep_log("resume-reference", proc)
    return Run(out, proc)


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
        args = resume_args()
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


def known_answer_eval_run(work: Path, runs: "Runs") -> Run:
    """lm-eval on the GPU, both protocols, on the model that always answers A
    (tests/support/models.py's favour) with the eval sets of known scores."""
    folder = work / "known-answers"
    folder.mkdir()
    model = tiny_llama(folder / "model", **EVAL_SHAPE, favour=KNOWN_ANSWER_FAVOUR)
    right, shuffled = known_answer_sets(folder)
    out = work / "eval-known"
    proc = launch("eval.py", [str(model), "tasks=[]", f"eval_sets=[{right},{shuffled}]", "batch_size=8",
                              f"device={DEVICE}", f"dtype={DTYPE_NAME}", f"output_dir={out}", "log_samples=false"],
                  env=run_env(work / "eval-known.cache"), timeout=600)
    keep_log("eval-known", proc)
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
    if "-qlora" in name:
        if not HAS_BNB:
            return "QLoRA needs bitsandbytes (pip install bitsandbytes)"
        if DEVICE != "cuda":
            return "QLoRA's 4-bit base needs CUDA"
    if name in ("resume-fewer-gpus", "resume-more-gpus", "eval-dp") and RANKS < 2:
        return f"needs more than one GPU ({RANKS} here)"
    if name in PRECISION_RUNS and DEVICE != "cuda":
        return "the automatic precision and fp16 loss scaling are GPU choices (CUDA is not available)"
    return None


# name -> (function, runs it reads). Started in this order: the longest first (the pipeline is a
# chain of runs), and a run's inputs before it, so that the pool never waits on a run it has not
# started.
RUNS: Dict[str, tuple] = {
    "pipeline": (pipeline_run, ()),
    **{f"resume-{case}": (resume_run(case), ()) for case in RESUME_CASES},
    "resume-reference": (uninterrupted_run, ()),
    **{name: (stage_run(name), ()) for name in STAGE_RUNS},
    **{name: (precision_run(name), ()) for name in PRECISION_RUNS},
    QLORA_FP16_RUN: (stage_run(QLORA_FP16_RUN), ()),
    "merge": (merge_run, ("sft-full", "dpo-full")),
    "eval-1": (eval_run, ("sft-full",)),
    "eval-known": (known_answer_eval_run, ()),
    "eval-dp": (data_parallel_eval_run, ("sft-full",)),
}
# test -> the runs it reads, from its parameters
READS: Dict[str, Callable[[dict], List[str]]] = {
    "test_stage_trains_in_bf16_and_the_model_generates": lambda p: [p["run"]],
    "test_qlora_merged_model_is_the_dequantized_base_plus_the_adapter_delta": lambda p: [p["run"]],
    "test_automatic_precision_takes_bf16_where_native_and_nccl": lambda p: ["cpt-auto"],
    "test_fp16_trains_with_a_loss_scale_that_settles": lambda p: ["cpt-fp16"],
    "test_qlora_in_fp16_starts_from_the_same_base_as_in_bf16": lambda p: [QLORA_FP16_RUN, "sft-qlora"],
    "test_killed_run_resumes_from_its_checkpoint_and_finishes": lambda p: [f"resume-{p['case']}", "resume-reference"],
    "test_merge_of_two_outputs_generates": lambda p: ["merge"],
    "test_evaluation_writes_metrics": lambda p: ["eval-1"],
    "test_known_answers_score_exactly_on_the_gpu": lambda p: ["eval-known"],
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


@pytest.mark.parametrize("run", [name for name in STAGE_RUNS if name.endswith("-qlora")])
def test_qlora_merged_model_is_the_dequantized_base_plus_the_adapter_delta(runs, run):
    """What a QLoRA run publishes, after DeepSpeed's ZeRO-3 gather on the GPU: in every 4-bit
    layer, the base weight through bitsandbytes' 4-bit round trip plus the adapter's delta, to
    bf16 rounding; the delta and the 4-bit error both far above that rounding, so neither the
    unquantized base nor the base without the adapter passes."""
    out = runs.result(run).check().out
    cfg = OmegaConf.load(out / "domainforge.yaml")
    reference = qlora_merge_reference(Path(cfg.model.path), out / "adapter", cfg.lora.qlora_quant_type,
                                      cfg.lora.qlora_double_quant, DEVICE)
    merged, original = load_dir(out), load_dir(Path(cfg.model.path))
    assert reference and set(reference) <= set(merged)
    largest_delta = largest_quantization_error = 0.0
    for name, (base, delta) in reference.items():
        expected = base + delta
        rounding = 1e-2 * expected.abs().max().item()  # bf16 keeps 8 bits: ~0.4% of a value
        assert (merged[name].float() - expected).abs().max().item() <= rounding, name
        largest_delta = max(largest_delta, delta.abs().max().item() / rounding)
        largest_quantization_error = max(largest_quantization_error,
                                         (original[name].float() - base).abs().max().item() / rounding)
    assert largest_delta > 5 and largest_quantization_error > 5, (largest_delta, largest_quantization_error)


def test_automatic_precision_takes_bf16_where_native_and_nccl(runs):
    """training.precision=auto on the GPU: bf16 where the GPU computes it natively (compute
    capability 8.0+), else fp16; the ranks talk over NCCL (the backend the process group runs)."""
    result = runs.result("cpt-auto").check()
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert f"runtime: {RANKS} rank(s) on cuda, nccl, {expected}" in result.proc.stdout, result.proc.stdout[-3000:]
    args = training_args(result.out)
    assert (args.bf16, args.fp16) == (expected == "bf16", expected == "fp16")
    losses = loss_history(result.out)
    assert mean(losses[-4:]) < 0.95 * mean(losses[:4]), losses


def loss_scaler(out: Path):
    """DeepSpeed's loss scaler as the newest checkpoint saved it (rank 0's ZeRO-3 optimizer file)."""
    newest = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    (optimizer,) = newest.glob("global_step*/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return torch.load(optimizer, weights_only=False)["optimizer_state_dict"]["loss_scaler"]


def test_fp16_trains_with_a_loss_scale_that_settles(runs):
    """training.precision=fp16 (the V100/T4 path): DeepSpeed's dynamic loss scaling may skip
    the first steps while the scale comes down from 2^16, then every step applies (the scale
    stays above its minimum and no step of the second half overflows), and the loss falls."""
    result = runs.result("cpt-fp16").check()
    assert f"runtime: {RANKS} rank(s) on cuda, nccl, fp16" in result.proc.stdout, result.proc.stdout[-3000:]
    args = training_args(result.out)
    assert args.fp16 and not args.bf16
    steps = PRECISION_RUNS["cpt-fp16"][1]
    scaler = loss_scaler(result.out)
    # cur_iter counts optimizer steps; last_overflow_iter is -1 when no step overflowed
    assert scaler.dynamic and scaler.cur_scale > scaler.min_scale, vars(scaler)
    assert scaler.cur_iter - scaler.last_overflow_iter > steps // 2, vars(scaler)
    losses = loss_history(result.out)
    assert len(losses) == steps and mean(losses[-4:]) < 0.95 * mean(losses[:4]), losses


def test_qlora_in_fp16_starts_from_the_same_base_as_in_bf16(runs):
    """QLoRA in fp16 (what `auto` picks on a V100 or T4) stores its packed 4-bit weights in fp16,
    the engine's dtype, so DeepSpeed leaves them alone: its first loss is the bf16 run's on the
    same base weights and rows (to half-precision noise), and it learns. Stored in bf16, the
    bytes were cast to fp16 as numbers and the base became noise: a first loss far from it."""
    fp16 = runs.result(QLORA_FP16_RUN).check()
    assert f"runtime: {RANKS} rank(s) on cuda, nccl, fp16" in fp16.proc.stdout, fp16.proc.stdout[-3000:]
    assert OmegaConf.load(fp16.out / "domainforge.yaml").training.precision == "fp16"
    losses, reference = loss_history(fp16.out), loss_history(runs.result("sft-qlora").check().out)
    assert abs(losses[0] - reference[0]) <= 0.02 * reference[0], (losses[:3], reference[:3])
    assert mean(losses[-4:]) < 0.95 * mean(losses[:4]), losses
    assert generates(fp16.out, DEVICE, torch.float16)


def test_flash_attn_preflight_matches_this_gpu():
    """train/attention.py's pre-flight on the real GPU: flash-attn 2 runs in half precision on
    compute capability 8.0+, and is refused in fp32 and on older GPUs, naming the sdpa fix."""
    from core.errors import UserError
    from train.attention import check_attention_runs_here

    if DEVICE != "cuda":
        pytest.skip("the pre-flight asks the CUDA device (CUDA is not available)")
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed: pip install -e '.[flash]' --no-build-isolation")
    if torch.cuda.get_device_capability() >= (8, 0):
        check_attention_runs_here("flash_attention_2", "bf16")
        check_attention_runs_here("flash_attention_2", "fp16")
        refused = "fp32"
    else:
        refused = "fp16"
    with pytest.raises(UserError, match="model.attn_implementation=sdpa"):
        check_attention_runs_here("flash_attention_2", refused)


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_run_resumes_from_its_checkpoint_and_finishes(runs, case):
    """A launcher killed after its first checkpoint, rerun (on another GPU count where named):
    it resumes from a checkpoint past step 0, trains to the end and publishes; every loss after
    the resume is the uninterrupted run's (same seed and global batch) to bf16 noise, so the
    weights, optimizer moments and data position all came back."""
    result = runs.result(f"resume-{case}").check()
    resumed = re.search(r"resuming from \S+checkpoint-(\d+)", result.proc.stdout)
    assert resumed, result.proc.stdout[-3000:]
    step = int(resumed.group(1))
    assert RESUME_SAVE <= step < RESUME_STEPS
    assert (result.out / "config.json").exists()
    losses = loss_history(result.out)
    reference = loss_history(runs.result("resume-reference").check().out)
    assert len(losses) == len(reference) == RESUME_STEPS
    first = [round(abs(a - b), 4) for a, b in zip(losses[step:step + 10], reference[step:step + 10])]
    assert max(first) <= RESUME_TOLERANCE, first  # the steps right after the resume, one by one
    assert abs(mean(losses[step:]) - mean(reference[step:])) <= RESUME_TOLERANCE, (mean(losses[step:]),
                                                                                  mean(reference[step:]))


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
    """lm-eval on the GPU: a result file per task, each with its metrics over LIMIT questions
    (their values: test_known_answers_score_exactly_on_the_gpu)."""
    model = runs.result("sft-full").out
    results = eval_metrics(runs.result("eval-1").check(), model)
    assert {metric for metrics in results.values() for metric in metrics} >= {"acc", "acc_norm", "exact_match"}
    for task, metrics in results.items():
        assert metrics, task
        for metric, (value, _, n) in metrics.items():
            assert n == EVAL_LIMIT, (task, metric, value, n)


def test_known_answers_score_exactly_on_the_gpu(runs):
    """The model that always answers A, in bf16 on the GPU: 1.0 on questions whose answer is
    always A, exactly 0.25 where the answers spread evenly over A-D, under both protocols."""
    run = runs.result("eval-known").check()
    results = load_results(run.out, run.out)
    scores = {task: {metric: value for metric, (value, _, _) in metrics.items()} for task, metrics in results.items()}
    assert scores == {
        "right_loglik": {"acc": 1.0, "acc_norm": 1.0},
        "right_gen": {"exact_match": 1.0},
        "shuffled_loglik": {"acc": 0.25, "acc_norm": 0.25},
        "shuffled_gen": {"exact_match": 0.25},
    }, scores


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
