"""A training run's trajectory as the HF Trainer recorded it (trainer_state.json of its newest
checkpoint: the Trainer saves one at the last step), and the comparison of an interrupted run
with the same run left alone, which every fault-matrix cell makes (tests/test_fault_matrix.py;
the SLURM cells too).

    reference = read_trajectory(straight_output_dir)
    assert_same_trajectory(read_trajectory(interrupted_output_dir), reference)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from core.checkpoints import newest_complete_checkpoint

LOSS_TOLERANCE = 1e-4
"""As the resume tests (tests/test_reshard.py): fp32 sums in another order (an all-reduce of 2 ranks
against accumulated micro-batches) differ in the last bits; a lost or doubled optimizer state is
off by 1e-3 or more."""


@dataclass(frozen=True)
class Trajectory:
    """What a run did, step by step."""

    source: Path
    global_step: int
    """Optimizer steps taken."""
    max_steps: int
    """Optimizer steps the run planned."""
    epoch: float
    num_train_epochs: int
    num_input_tokens_seen: int
    """Tokens of every rank's batches, summed (include_num_input_tokens_seen): the samples seen."""
    steps: Dict[int, Dict[str, float]]
    """Per logged training step: loss, learning_rate, epoch, num_input_tokens_seen."""


def read_trajectory(run: Path) -> Trajectory:
    """The trajectory in `run`'s newest complete checkpoint (`run` is an output_dir) or in `run`
    itself (a checkpoint-<k> directory)."""
    run = Path(run)
    ckpt = run if (run / "trainer_state.json").is_file() else newest_complete_checkpoint(run)
    assert ckpt is not None, f"no complete checkpoint under {run}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert "num_input_tokens_seen" in state and state["num_input_tokens_seen"] > 0, (
        f"{ckpt}/trainer_state.json records no num_input_tokens_seen (include_num_input_tokens_seen is off)")
    steps: Dict[int, Dict[str, float]] = {}
    for row in state["log_history"]:
        if "loss" in row:  # a training log row; evaluation and summary rows have other keys
            steps[row["step"]] = {k: row[k] for k in ("loss", "learning_rate", "epoch", "num_input_tokens_seen")
                                  if k in row}
    return Trajectory(ckpt, state["global_step"], state["max_steps"], state["epoch"], state["num_train_epochs"],
                      state["num_input_tokens_seen"], steps)


def trajectory_differences(run: Trajectory, reference: Trajectory, loss_tol: float = LOSS_TOLERANCE,
                           upto: Optional[int] = None) -> List[str]:
    """Every way `run` departs from `reference`, one line each naming the step and the quantity;
    empty when they agree. `upto`: compare the steps up to that one only (a run stopped early on
    purpose); the totals are then not compared."""
    diffs: List[str] = []
    if upto is None:
        for name in ("global_step", "max_steps", "num_train_epochs", "num_input_tokens_seen"):
            got, want = getattr(run, name), getattr(reference, name)
            if got != want:
                diffs.append(f"{name}: {got}, uninterrupted {want}")
        if not math.isclose(run.epoch, reference.epoch, rel_tol=1e-9):
            diffs.append(f"epoch: {run.epoch}, uninterrupted {reference.epoch}")
    wanted = sorted(s for s in reference.steps if upto is None or s <= upto)
    got_steps = sorted(s for s in run.steps if upto is None or s <= upto)
    if got_steps != wanted:
        diffs.append(f"logged steps: {got_steps}, uninterrupted {wanted}")
    for step in wanted:
        row, want = run.steps.get(step), reference.steps[step]
        if row is None:
            continue
        for quantity, value in want.items():
            got = row.get(quantity)
            tol = loss_tol if quantity == "loss" else 1e-9 * max(1.0, abs(value))
            if got is None or abs(got - value) > tol:
                diffs.append(f"step {step} {quantity}: {got}, uninterrupted {value}")
    return diffs


def assert_same_trajectory(run: Trajectory, reference: Trajectory, loss_tol: float = LOSS_TOLERANCE,
                           upto: Optional[int] = None) -> None:
    """The same optimizer steps and epochs, tokens seen, learning rate at every step and loss
    within `loss_tol` as the uninterrupted run."""
    diffs = trajectory_differences(run, reference, loss_tol, upto)
    assert not diffs, (f"{run.source} departs from the uninterrupted run {reference.source}:\n  "
                       + "\n  ".join(diffs[:20]))


def trained_steps(output: str) -> int:
    """Optimizer steps one launch logged (the Trainer prints a {'loss': ...} row each step with
    logging.logging_steps=1)."""
    return len(re.findall(r"'loss': ", output))


def resumed_step(output: str) -> Optional[int]:
    """The checkpoint step a launch resumed from (train/run.py's `resuming from` line), or None."""
    found = re.search(r"resuming from \S*checkpoint-(\d+)", output)
    return int(found.group(1)) if found else None
