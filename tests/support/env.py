"""Run the real entry points the way a user types them, and read what they left behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]


def offline_env(**extra: str) -> dict:
    """The environment every launched command gets: offline, quiet, 1 thread per rank, and
    `auto` precision fp32 on any CPU: the suite's pinned trajectories and equalities (resumes,
    reshards, evaluation layouts) are fp32 figures; bf16 on the CPU has tests of its own
    (tests/test_cpu_precision.py)."""
    env = dict(os.environ)
    env.update(
        DOMAINFORGE_CPU_BF16="0",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("WANDB_RUN_ID", None)
    env.update(extra)
    return env


SMALL_BATCH = [
    "training.per_device_train_batch_size=1",
    "training.gradient_accumulation_steps=1",
    "training.global_batch_size=null",
    "training.gradient_checkpointing=false",
]
"""Tests train the tiny model one sequence a step, as conf/pipeline/tiny.yaml does (its size preset,
conf/size/tiny.yaml, trains 4; the stage presets carry the paper's 8B settings, 6 and a global batch of 96)."""


def launch(
    script: str,
    args: List[str],
    ranks: Optional[int] = None,
    timeout: int = 600,
    cwd: Optional[Path] = None,
    env: Optional[dict] = None,
) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launch/<script> ...` (ranks=N) or `python launch/<script> ...`.

    A free master port per call lets tests run one after another without TIME_WAIT clashes.
    """
    path = str(REPO / "launch" / script)
    if ranks:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), path, *args]
    else:
        cmd = [sys.executable, path, *args]
    return subprocess.run(
        cmd, cwd=cwd or REPO, env=env or offline_env(), capture_output=True, text=True, timeout=timeout
    )


HEAVY = ("torch", "transformers", "trl", "deepspeed")
"""What a login-node command must not import."""

POISON = (
    "import runpy, sys\n"
    f"for name in {HEAVY!r}: sys.modules[name] = None\n"
    "script = sys.argv[1]; sys.argv = sys.argv[1:]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def run_light(script: str, *args, env: Optional[dict] = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python launch/<script> ...` with the heavy libraries poisoned: importing one fails."""
    return subprocess.run(
        [sys.executable, "-c", POISON, str(REPO / "launch" / script), *map(str, args)],
        cwd=cwd, env=env or offline_env(), capture_output=True, text=True, timeout=120,
    )


def tail(proc: subprocess.CompletedProcess) -> str:
    """The end of a finished command's output, for an assertion message."""
    return (proc.stdout + proc.stderr)[-4000:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_history(output_dir: Path) -> List[float]:
    """Per-step training losses that the HF Trainer recorded, from the newest trainer_state."""
    states = sorted(
        (output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
        key=lambda p: int(p.parent.name.split("-")[1]),
    )
    assert states, f"no trainer_state.json under {output_dir}/checkpoints"
    history = json.loads(states[-1].read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, exactly one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_main(main, argv: List[str], capsys) -> subprocess.CompletedProcess:
    """An entry point's `main(argv)` in this process, the way its `__main__` runs it (a
    UserError is one `error:` line and SystemExit), for matrix tests that would otherwise pay
    a process start (torch imports) per case. The environment and the stop-signal handlers a
    run installs are restored afterwards."""
    import signal

    from core.errors import exit_on_user_error

    env = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    code = 0
    try:
        exit_on_user_error(main, argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


REQUIRE_REFERENCES = "DOMAINFORGE_REQUIRE_REFERENCES"


def require_reference(available: bool, missing: str) -> None:
    """Skip a test whose reference (mergekit's venv, a model file) is absent, saying `missing`
    (what is absent and how to install it); fail instead where CI or DOMAINFORGE_REQUIRE_REFERENCES
    is set, so that a broken CI setup cannot pass by skipping the comparisons."""
    if available:
        return
    if any(os.environ.get(name, "") not in ("", "0", "false") for name in ("CI", REQUIRE_REFERENCES)):
        pytest.fail(f"{missing} (CI or {REQUIRE_REFERENCES} is set: the reference comparisons must run)",
                    pytrace=False)
    pytest.skip(missing)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (we run as root) for tests of full or read-only disks;
    unmounted afterwards. Skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)



def generates(model_dir: Path, device: str = "cpu", dtype=None) -> str:
    """Load a saved model with AutoModelForCausalLM (on `device`, in `dtype` or the saved one)
    and greedily answer one chat turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **({"dtype": dtype} if dtype else {})).to(device)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the density of iron?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    ).to(device)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    assert new.numel() > 0
    return tok.decode(new)
