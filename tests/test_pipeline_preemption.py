"""train/preemption.py: a stop signal becomes save + stop at the next step end and exit code 75,
never during the last step (in-process); under a 2-rank deepspeed launcher, a signal that reaches
one rank only stops both at the same step. The real requeue cycle is in test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import pytest
from tests.support.env import REPO, SMALL_BATCH, free_port, launch, loss_history, offline_env, tail
from tests.support.processes import rank_process
from transformers import TrainerControl, TrainerState

from train import preemption
from train.checkpoint import newest_complete_checkpoint


@pytest.fixture
def callback():
    saved = {sig: signal.getsignal(sig) for sig in preemption.STOP_SIGNALS}
    yield preemption.preemption_callback()
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    preemption._CALLBACK = None


def step_end(cb, step, max_steps=10):
    state = TrainerState(global_step=step, max_steps=max_steps)
    control = TrainerControl()
    cb.on_step_end(SimpleNamespace(device="cpu"), state, control)
    return control


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_and_stops_at_the_next_step_end(callback, sig, capsys):
    control = step_end(callback, 3)
    assert not control.should_save and not control.should_training_stop
    os.kill(os.getpid(), sig)  # the process survives: the handler only records it
    control = step_end(callback, 4)
    assert control.should_save and control.should_training_stop
    assert preemption.was_preempted()
    assert f"{signal.Signals(sig).name} received, saving checkpoint-4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        preemption.exit_if_preempted()
    assert exit_info.value.code == preemption.PREEMPTED_EXIT_CODE == 75


def test_signal_during_the_last_step_lets_the_run_finish(callback):
    os.kill(os.getpid(), signal.SIGUSR1)
    control = step_end(callback, 10, max_steps=10)
    assert not control.should_training_stop
    assert not preemption.was_preempted()
    preemption.exit_if_preempted()  # returns: the final model gets saved


# ---------------------------------------------------------------------------------------------
# a 2-rank run where the signal reaches one rank only
# ---------------------------------------------------------------------------------------------
PREEMPT_STEPS = 40


def signal_rank_one_once_training(args: List[str], log: Path) -> str:
    """`deepspeed --num_gpus 2 launch/train.py ARGS`; once rank 0 logs its first loss (both ranks
    have their handlers), SIGUSR1 to rank 1's process alone. Returns the launcher's output; fails
    unless it exits 75 within 150 s (ranks that disagree would hang in the collective save)."""
    with open(log, "w") as sink:
        launcher = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                                     str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=offline_env(),
                                    stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while "'loss'" not in log.read_text():
            assert launcher.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        os.kill(rank_process(launcher.pid, 1), signal.SIGUSR1)
        code = launcher.wait(timeout=150)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # every rank: a hung run must not outlive the test
            launcher.wait()
    assert code == preemption.PREEMPTED_EXIT_CODE, log.read_text()[-4000:]
    return log.read_text()


@pytest.mark.integration
def test_signal_to_one_rank_stops_both_at_one_step_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    """docs/slurm.md: only rank 1's process gets SIGUSR1 (rank 0's never does). The ranks agree
    through the all-reduce: both stop after the same step, the checkpoint of that step has both
    ranks' ZeRO-3 shards and is complete, the launcher exits 75, and a rerun resumes from it."""
    out = tmp_path / "run"
    args = ["+stage=cpt", *SMALL_BATCH, f"training.max_steps={PREEMPT_STEPS}", f"training.save_steps={PREEMPT_STEPS}",
            "training.max_seq_length=64", "data.cpt.max_samples=80", f"output_dir={out}"]
    text = signal_rank_one_once_training(args, tmp_path / "launcher.log")
    assert "runtime: 2 rank(s) on cpu, gloo, " in text  # the line the GPU suite reads for nccl
    # rank 0, which got no signal, stops for rank 1 and says so, once for both
    stops = re.findall(r"preemption: a stop signal reached another rank, saving checkpoint-(\d+) and stopping", text)
    assert len(stops) == 1 and text.count("preemption: ") == 1, text[-4000:]
    step = int(stops[0])
    assert 0 < step < PREEMPT_STEPS
    ckpt = out / "checkpoints" / f"checkpoint-{step}"
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == [ckpt.name]
    assert newest_complete_checkpoint(out) == ckpt
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    shards = sorted(p.name for p in (ckpt / f"global_step{step}").glob("*model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]
    assert not (out / "config.json").exists()

    rerun = launch("train.py", args, ranks=2, timeout=600)
    assert rerun.returncode == 0, tail(rerun)
    assert f"resuming from {ckpt}" in rerun.stdout
    assert (out / "config.json").is_file()
    assert len(loss_history(out)) == PREEMPT_STEPS  # each step once: the rerun went on from `step`
