"""train/preemption.py in-process: a stop signal becomes save + stop at the next step end and
exit code 75, never during the last step. The real requeue cycle is in test_slurm_cluster.py."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from train import preemption


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
