"""Preemption and time limits: on SIGUSR1 (SLURM's warning signal, `--signal=B:USR1@N`,
forwarded to every rank by the batch script) or SIGTERM, finish the current optimizer step,
write a checkpoint, stop training, and exit with PREEMPTED_EXIT_CODE so the batch script
requeues the job. The requeued job resumes from that checkpoint (`resume=auto`).

Wiring in train/run.py:

    callbacks = [preemption_callback()]            # passed to the stage's trainer
    trainer.train(resume_from_checkpoint=...)
    exit_if_preempted()                            # before the final model is saved
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from core.errors import PREEMPTED_EXIT_CODE
from train.runtime import shutdown_process_group

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionCallback(TrainerCallback):
    """Turns a stop signal into `should_save` + `should_training_stop` at the next step end."""

    def __init__(self) -> None:
        self.signal_received: int | None = None
        self.preempted_at_step: int | None = None

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag: saving from inside a signal handler would race the training step.
        self.signal_received = signum

    def install(self) -> "PreemptionCallback":
        # Installed before the model loads: a signal during setup must not kill the rank.
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def on_step_end(self, args, state, control, **kwargs):
        if not self._any_rank_signalled(args):
            return control
        if state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.preempted_at_step = state.global_step
            if state.is_world_process_zero:
                name = (f"{signal.Signals(self.signal_received).name} received" if self.signal_received
                        else "a stop signal reached another rank")
                print(
                    f"preemption: {name}, saving checkpoint-{state.global_step} and stopping "
                    f"(exit {PREEMPTED_EXIT_CODE} asks the batch script to requeue)",
                    flush=True,
                )
        return control

    def _any_rank_signalled(self, args) -> bool:
        """Every rank must stop at the same step, or the collective ZeRO-3 save deadlocks; the
        signal can land on the ranks on either side of a step boundary, so agree via all-reduce."""
        flag = 1 if self.signal_received is not None else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # One int per optimizer step: negligible next to the step's own all-reduces.
            t = torch.tensor([flag], dtype=torch.int32, device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)


_CALLBACK: PreemptionCallback | None = None


def preemption_callback() -> PreemptionCallback:
    """The process-wide callback (one per training run); add it to the trainer's callbacks."""
    global _CALLBACK
    _CALLBACK = PreemptionCallback().install()
    return _CALLBACK


def was_preempted() -> bool:
    """True when training stopped early because of a stop signal (a checkpoint was saved)."""
    return _CALLBACK is not None and _CALLBACK.preempted_at_step is not None


def exit_if_preempted() -> None:
    """After `trainer.train()` returns: exit PREEMPTED_EXIT_CODE instead of saving the final
    model when a signal stopped training."""
    if not was_preempted():
        return
    # Let rank 0 finish writing trainer_state.json before any rank exits: srun's
    # --kill-on-bad-exit would otherwise kill it mid-write.
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    shutdown_process_group()
    sys.exit(PREEMPTED_EXIT_CODE)
