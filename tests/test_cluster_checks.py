"""What used to break only on a GPU cluster, after the job had queued or trained, now stopped
early or made right, each tested on the CPU:

- a flash_attention_2 preset without flash-attn: `submit.py --dry-run` refuses it in one line on
  a login node (no torch, no GPU), and a training run before it tokenizes anything;
- bf16 on a GPU without native bf16 (V100, T4): auto picks fp16 with loss scaling, a forced bf16
  is one line (the GPU's capability query is faked here; tests/gpu/ runs the real one);
- an output_dir under /proc: the writable check proves it by making a directory;
- a refused `scontrol requeue`: the rendered batch script fails the job instead of exiting 0;
- ZeRO-3 saves without weights (stage3_gather_16bit_weights_on_model_save=false): refused by
  the schema, and a model directory without weights is never published.

    python -m pytest -q tests/test_cluster_checks.py
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.env import REPO, assert_one_line_error, offline_env, run_main
from tests.support.models import stand_in_model

from core.errors import PREEMPTED_EXIT_CODE, UserError
from core.validate import writable_dir
from orchestration.config import compose_pipeline_job
from orchestration.job_scripts import render_step
from orchestration.slurm import stage_plan
from train.attention import check_attention_installed, check_attention_runs_here, module_installed
from train.config import compose_train_config

LLAMA = "llama_instruct_cpt_sft_orpo_slerp"  # conf/model/llama3_1_8b.yaml: flash_attention_2
DEMO = "data.allow_demo=true"  # the 8B presets refuse the bundled demo data otherwise
FLASH_FIX = ("model.attn_implementation=flash_attention_2", "pip install flash-attn", "model.attn_implementation=sdpa")

# A login node: the heavy libraries cannot be imported (as in test_architecture.py), and
# flash-attn is made absent whatever this machine has (find_spec answers None for a None entry).
LOGIN_NODE = (
    "import runpy, sys\n"
    "for name in ('torch', 'transformers', 'trl', 'deepspeed', 'flash_attn'): sys.modules[name] = None\n"
    "script = sys.argv[1]; sys.argv = sys.argv[1:]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def submit_on_login_node(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOGIN_NODE, str(REPO / "launch" / "submit.py"), *map(str, args)],
                          cwd=REPO, env=env or offline_env(), capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# flash-attn
# ---------------------------------------------------------------------------------------------
def test_submit_dry_run_refuses_a_flash_attn_preset_without_flash_attn(tmp_path):
    proc = submit_on_login_node(f"pipeline={LLAMA}", "cluster=slurm", f"root={tmp_path / 'runs'}", DEMO, "--dry-run")
    assert proc.returncode == 2
    line = assert_one_line_error(proc, f"pipeline {LLAMA}, step 'cpt'", *FLASH_FIX)
    assert sys.executable in line  # the interpreter the jobs would run
    assert "#!/bin/bash" not in proc.stdout and not (tmp_path / "runs").exists()
    # the fix it names is one this command takes as written
    fix = line.rsplit(", or add ", 1)[1].split(" ")[0]
    start = f"pipeline.start={stand_in_model(tmp_path / 'llama-instruct')}"  # dry runs check the start model
    fixed = submit_on_login_node(f"pipeline={LLAMA}", "cluster=slurm", f"root={tmp_path / 'runs'}", DEMO, fix,
                                 start, "--dry-run")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert fixed.stdout.count("#!/bin/bash") == 4


def test_submit_of_one_stage_refuses_it_too(tmp_path):
    proc = submit_on_login_node("+stage=sft", "model=llama3_1_8b", f"output_dir={tmp_path / 'sft'}", DEMO, "--dry-run")
    assert_one_line_error(proc, *FLASH_FIX)
    assert not (tmp_path / "sft").exists()


def test_submit_dry_run_passes_once_flash_attn_is_installed_or_sdpa_chosen(tmp_path, fake_flash_attn):
    root = tmp_path / "runs"
    start = f"pipeline.start={stand_in_model(tmp_path / 'llama-instruct')}"  # dry runs check the start model
    installed = subprocess.run(
        [sys.executable, str(REPO / "launch" / "submit.py"), f"pipeline={LLAMA}", "cluster=slurm", f"root={root}",
         start, DEMO, "--dry-run"],
        cwd=REPO, env=offline_env(PYTHONPATH=str(fake_flash_attn)), capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr[-2000:]
    assert installed.stdout.count("#!/bin/bash") == 4  # cpt, sft, orpo, slerp; flash_attn never imported
    sdpa = submit_on_login_node(f"pipeline={LLAMA}", "cluster=slurm", f"root={root}", start, DEMO, "--dry-run",
                                "pipeline.overrides=['model.attn_implementation=sdpa']")
    assert sdpa.returncode == 0, sdpa.stderr[-2000:]
    assert sdpa.stdout.count("#!/bin/bash") == 4


def test_the_jobs_interpreter_is_asked_when_it_is_another_one(tmp_path, fake_flash_attn):
    other = tmp_path / "bin" / "python"
    other.parent.mkdir()
    other.symlink_to(sys.executable)
    assert module_installed("json", str(other)) is True
    assert module_installed("no_such_module_here", str(other)) is False
    assert module_installed("json", str(tmp_path / "missing" / "python")) is None  # cannot ask: train start will
    os.environ["PYTHONPATH"], saved = str(fake_flash_attn), os.environ.get("PYTHONPATH")
    try:
        assert module_installed("flash_attn", str(other)) is True
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)


def test_train_start_refuses_flash_attn_before_tokenizing(tmp_path, capsys, monkeypatch, fake_flash_attn):
    from train.run import train

    out = tmp_path / "run"
    argv = ["+stage=cpt", f"output_dir={out}", "model.attn_implementation=flash_attention_2"]
    tokenized = []
    monkeypatch.setattr("train.run.load_tokenizer", lambda *a: tokenized.append(a))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # absent, whatever this machine has
    proc = run_main(lambda a: train(compose_train_config(a)), argv, capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, *FLASH_FIX)
    assert tokenized == [] and not out.exists()

    # Installed, but this is no CUDA machine: transformers' own test says no, still before tokenizing.
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.syspath_prepend(str(fake_flash_attn))
    with pytest.raises(UserError, match="flash_attn is installed but transformers cannot use it here.*sdpa"):
        check_attention_runs_here("flash_attention_2", "bf16")
    check_attention_installed("flash_attention_2")  # the login-node half is satisfied
    check_attention_runs_here("sdpa", "fp32")


# ---------------------------------------------------------------------------------------------
# bf16 only where the GPU has it
# ---------------------------------------------------------------------------------------------
def fake_gpu(monkeypatch, name: str, capability: tuple):
    """torch.cuda as a GPU of `capability` would answer; bf16 is emulated (torch's default
    answer True) on older ones, native from 8.0."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or including_emulation)


@pytest.mark.parametrize("name, capability, precision", [
    ("Tesla V100-SXM2-32GB", (7, 0), "fp16"),
    ("Tesla T4", (7, 5), "fp16"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"),
    ("NVIDIA H200", (9, 0), "bf16"),
])
def test_auto_precision_is_bf16_only_where_the_gpu_has_it(monkeypatch, name, capability, precision):
    from train.runtime import detect_runtime

    fake_gpu(monkeypatch, name, capability)
    runtime = detect_runtime("auto")
    assert (runtime.device, runtime.backend, runtime.precision) == ("cuda", "nccl", precision)


@pytest.mark.parametrize("name, capability, dtype", [
    ("Tesla V100-SXM2-32GB", (7, 0), "float16"),
    ("NVIDIA H200", (9, 0), "bfloat16"),
])
def test_evaluation_picks_bf16_only_where_the_gpu_has_it(monkeypatch, name, capability, dtype):
    from evaluation.config import compose_eval_config
    from evaluation.run import resolve_device_dtype

    fake_gpu(monkeypatch, name, capability)
    cfg = compose_eval_config(["model_dir=/models/any"])
    assert resolve_device_dtype(cfg) == ("cuda", dtype)


def test_forced_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    from train.runtime import detect_runtime

    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    with pytest.raises(UserError) as err:
        detect_runtime("bf16")
    message = str(err.value)
    for needle in ("training.precision=bf16", "Tesla V100-SXM2-32GB", "compute capability 7.0", "training.precision=auto"):
        assert needle in message, message
    assert detect_runtime("fp16").precision == "fp16"


@pytest.fixture
def flash_attn_accepted_by_transformers(monkeypatch, fake_flash_attn):
    """flash-attn installed and transformers' own test passing, as on a GPU node with it."""
    import transformers.utils

    monkeypatch.syspath_prepend(str(fake_flash_attn))
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)


@pytest.mark.parametrize("name, capability", [("Tesla V100-SXM2-32GB", (7, 0)), ("Tesla T4", (7, 5))])
def test_flash_attn_on_a_gpu_older_than_ampere_is_refused_at_train_start(
        monkeypatch, flash_attn_accepted_by_transformers, name, capability):
    """transformers accepts flash-attn there; its kernels would refuse the first forward."""
    fake_gpu(monkeypatch, name, capability)
    with pytest.raises(UserError) as err:
        check_attention_runs_here("flash_attention_2", "fp16")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"model.attn_implementation=flash_attention_2 needs a GPU of compute capability 8.0 or newer, "
                       f"and this one ({name}) is {capability[0]}.{capability[1]}: set model.attn_implementation=sdpa "
                       "(PyTorch's fused attention runs on any GPU)")


def test_flash_attn_in_fp32_is_refused_and_runs_in_half_precision_on_ampere(monkeypatch, flash_attn_accepted_by_transformers):
    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    with pytest.raises(UserError, match=r"^model.attn_implementation=flash_attention_2 runs in bf16 or fp16 only, and this "
                                        r"run trains in fp32 \(training.precision\): set training.precision=auto .* or set "
                                        r"model.attn_implementation=sdpa$"):
        check_attention_runs_here("flash_attention_2", "fp32")
    check_attention_runs_here("flash_attention_2", "bf16")
    check_attention_runs_here("flash_attention_2", "fp16")
    check_attention_runs_here("sdpa", "fp32")


def test_fp16_runs_get_dynamic_loss_scaling():
    from train.run import common_trainer_kwargs
    from train.runtime import Runtime

    cfg = compose_train_config(["+stage=sft", "model=llama3_1_8b", "data.allow_demo=true"])
    v100 = Runtime(device="cuda", backend="nccl", precision="fp16", rank=0, local_rank=0, world_size=8)
    kwargs = common_trainer_kwargs(cfg, v100)
    assert kwargs["fp16"] is True and kwargs["bf16"] is False
    # The HF integration fills "auto" from those flags; loss_scale 0 is DeepSpeed's dynamic scaling.
    assert kwargs["deepspeed"]["fp16"] == {"enabled": "auto", "loss_scale": 0}
    assert kwargs["deepspeed"]["bf16"] == {"enabled": "auto"}
    import torch

    assert v100.torch_dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# output_dir on a filesystem that takes no directories
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/proc/forbidden/out", "/proc", "/sys/kernel/forbidden/out"])
def test_writable_check_refuses_special_filesystems(path):
    problem = writable_dir.problem(path)
    assert problem is not None and "does not accept new directories" in problem, problem


def test_writable_check_accepts_a_writable_directory_and_leaves_nothing(tmp_path):
    assert writable_dir.problem(str(tmp_path / "a" / "b")) is None
    assert writable_dir.problem(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == []  # the probe directory is gone


def test_training_into_proc_is_one_line_before_anything(capsys):
    from train.run import train

    proc = run_main(lambda a: train(compose_train_config(a)), ["+stage=cpt", "output_dir=/proc/forbidden/out"], capsys)
    assert proc.returncode == 2
    assert_one_line_error(proc, "output_dir=/proc/forbidden/out: cannot be created: /proc does not accept new")


# ---------------------------------------------------------------------------------------------
# a refused requeue fails the job
# ---------------------------------------------------------------------------------------------
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> {calls}
case "$1 $2" in
    "show hostnames") echo localhost ;;
    "show job") echo "JobId=$4 JobState=RUNNING Restarts=0" ;;
    requeue*) {requeue} ;;
esac
"""


def run_train_script(tmp_path: Path, srun_exit: int, requeue: str) -> tuple[subprocess.CompletedProcess, str]:
    """The rendered train.sbatch, run by bash with stand-ins for srun (the ranks exit `srun_exit`)
    and scontrol (`requeue`: the shell line `scontrol requeue` runs)."""
    out = tmp_path / "cpt"
    plan = stage_plan(["+stage=cpt", f"output_dir={out}"])
    cluster = compose_pipeline_job(["cluster=slurm"]).cluster
    _, text = render_step(plan, plan.steps[0], cluster, None)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nexit {srun_exit}\n")
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL.format(calls=calls, requeue=requeue))
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755 | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text()


def test_a_refused_requeue_fails_the_job(tmp_path):
    refused = "echo 'scontrol: error: Requested operation is presently disabled for job 4242' >&2; exit 1"
    proc, calls = run_train_script(tmp_path, PREEMPTED_EXIT_CODE, refused)
    assert "requeue 4242" in calls
    # Not 0: SLURM marks the job FAILED, and its afterok dependents are cancelled, not started.
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stdout + proc.stderr
    assert "SLURM refused to requeue job 4242" in proc.stderr and "resubmit the same command" in proc.stderr


def test_an_accepted_requeue_still_ends_the_script_cleanly(tmp_path):
    proc, calls = run_train_script(tmp_path, PREEMPTED_EXIT_CODE, "exit 0")
    assert "requeue 4242" in calls and proc.returncode == 0, proc.stdout + proc.stderr
    assert "requeueing job 4242" in proc.stdout and "refused" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# a model directory without weights is never published
# ---------------------------------------------------------------------------------------------
def test_gather_on_save_false_is_refused_at_composition():
    with pytest.raises(UserError, match=r"deepspeed.stage3_gather_16bit_weights_on_model_save=False: must be true"):
        compose_train_config(["+stage=cpt", "deepspeed.stage3_gather_16bit_weights_on_model_save=false"])


def final_tmp(out: Path, weights: dict | None) -> Path:
    """<out>/.final-tmp as a save leaves it: config, tokenizer, and `weights` ({name: float
    values}; None: no weight file, as ZeRO-3 without gathering leaves it)."""
    import torch
    from safetensors.torch import save_file

    from train.checkpoint import FINAL_TMP

    tmp = out / FINAL_TMP
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text("{}")
    (tmp / "latest").write_text("global_step4")
    (tmp / "global_step4").mkdir()
    if weights is not None:
        save_file({k: torch.tensor(v) for k, v in weights.items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp


@pytest.mark.parametrize("weights", [None, {}], ids=["no-weight-file", "empty-weight-file"])
def test_a_model_without_weights_is_not_published(tmp_path, weights):
    from train.checkpoint import publish_final_model

    out = tmp_path / "run"
    tmp = final_tmp(out, weights)
    with pytest.raises(UserError, match="holds no weights.*stage3_gather_16bit_weights_on_model_save=true"):
        publish_final_model(out)
    assert not (out / "config.json").exists() and (tmp / "config.json").is_file()  # nothing looks finished


def test_a_model_with_weights_is_published(tmp_path):
    from train.checkpoint import publish_final_model

    out = tmp_path / "run"
    final_tmp(out, {"lm_head.weight": [[1.0, 2.0]]})
    publish_final_model(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
