"""The fault matrix: real `deepspeed` launcher runs on CPU ranks (gloo, the tiny model) that are
interrupted the way a cluster interrupts them, then rerun with the same command on the same or
another world size, and compared with the same run left alone (tests/support/trajectory.py): the
same optimizer steps and epochs, tokens seen, learning rate at every step, loss within 1e-4, the
final model published only once training finished, and no step lost beyond the last checkpoint
or signal. What cannot work is refused in one line, by `launch/submit.py --dry-run` and at start.

    python -m pytest -q tests/test_fault_matrix.py    # the plain suite's cells (CI)
    python -m pytest -q -m faults                     # every cell (SLURM cells included)

Interruptions: `kill-9` of one rank after a checkpoint and before the next; `usr1`, SIGUSR1 (SLURM's
time-limit warning, what preemption turns into, train/preemption.py) to every rank: save and stop,
exit 75; `+convert-kill`, a second interruption: the resumed run killed (kill -9, every process)
while rank 0 converts the checkpoint to a universal one; `+convert-usr1`: SIGUSR1 to every rank
of the run (the converter too, as slurmstepd signals a whole step) while it converts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest
from tests.support.env import assert_one_line_error, launch, run_light, run_main, tail
from tests.support.processes import BackgroundLaunch, descendants
from tests.support.selection import marker_requested
from tests.support.trajectory import (assert_same_trajectory, read_trajectory, resumed_step, trained_steps,
                                       trajectory_differences)

from core.checkpoints import UNIVERSAL_LATEST, has_universal_checkpoint, is_complete_checkpoint, newest_complete_checkpoint
from core.errors import PREEMPTED_EXIT_CODE
from core.outputs import is_model_dir
from train.reshard import UNIVERSAL_TMP

# A global batch of 2 whatever the world size (1 x 2 on 1 rank, 1 x 1 on 2): a resume on another
# world size keeps it, so each step sees the same samples. 2 epochs (CPT 9 steps each, SFT 4, DPO
# 6), a checkpoint every 4 steps, the presets' cosine schedule with warm-up (so the learning rate
# differs at every step). Each epoch's sample count is even (CPT 18 blocks, SFT 8 packed rows, DPO
# 12 pairs): on 2 ranks an odd one is padded with a repeated sample (accelerate's even batches),
# so 1 and 2 ranks would see different epochs whatever the resume does.
BATCH = ["training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=null",
         "training.global_batch_size=2", "training.gradient_checkpointing=false", "training.num_train_epochs=2",
         "training.save_steps=4", "training.save_total_limit=null", "logging.logging_steps=1"]
STAGES: Dict[str, list] = {
    "cpt": ["+stage=cpt", "training.max_seq_length=64", "data.cpt.max_samples=10"],
    "sft": ["+stage=sft", "training.max_seq_length=256", "data.sft.max_samples=28"],
    "dpo": ["+stage=dpo", "stage.max_length=256", "stage.max_prompt_length=128", "data.preference.max_samples=12"],
}
ZERO = {3: [], 2: ["deepspeed=zero2"]}
REFERENCE_RANKS = 2
SAVE_STEPS = 4



@dataclass(frozen=True)
class Cell:
    zero: int
    stage: str
    before: int
    after: int
    fault: str
    """kill-9, usr1, kill-9+convert-kill or kill-9+convert-usr1"""
    ci: bool = False
    """In the plain suite's subset."""

    @property
    def id(self) -> str:
        return f"zero{self.zero}-{self.stage}-{self.before}to{self.after}-{self.fault}"


CELLS = (
    Cell(3, "cpt", 2, 2, "kill-9"),
    Cell(3, "cpt", 2, 1, "kill-9", ci=True),
    Cell(3, "cpt", 1, 2, "kill-9"),
    Cell(3, "cpt", 2, 2, "usr1"),
    Cell(3, "cpt", 2, 1, "usr1"),
    Cell(3, "cpt", 1, 2, "usr1"),
    Cell(3, "cpt", 2, 1, "kill-9+convert-kill", ci=True),
    Cell(3, "cpt", 2, 1, "kill-9+convert-usr1"),
    Cell(2, "cpt", 2, 2, "kill-9"),
    Cell(2, "cpt", 2, 1, "kill-9"),
    Cell(2, "cpt", 2, 2, "usr1"),
    Cell(2, "cpt", 1, 2, "usr1", ci=True),
    Cell(3, "sft", 2, 1, "kill-9"),
    Cell(3, "dpo", 2, 2, "usr1"),
)


def cell_param(cell: Cell):
    return pytest.param(cell, id=cell.id, marks=[pytest.mark.faults(ci=cell.ci), pytest.mark.integration])


def run_args(stage: str, zero: int, out: Path) -> list:
    return [*STAGES[stage], *BATCH, *ZERO[zero], f"output_dir={out}"]


def test_the_comparison_names_each_step_and_quantity_that_differs(tmp_path):
    """The yardstick itself, on trainer_state.json files written here."""
    def run(name, rows, **state):
        ckpt = tmp_path / name / "checkpoints" / "checkpoint-3"
        (ckpt / "global_step3").mkdir(parents=True)
        (ckpt / "global_step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\0")
        (ckpt / "latest").write_text("global_step3")
        log = [dict(step=i + 1, loss=loss, learning_rate=lr, epoch=(i + 1) / 3, num_input_tokens_seen=64 * (i + 1))
               for i, (loss, lr) in enumerate(rows)]
        (ckpt / "trainer_state.json").write_text(json.dumps(dict(
            dict(global_step=len(rows), max_steps=3, epoch=len(rows) / 3, num_train_epochs=1,
                 num_input_tokens_seen=64 * len(rows), log_history=log), **state)))
        return read_trajectory(tmp_path / name)

    straight = run("straight", [(2.0, 1e-3), (1.9, 5e-4), (1.8, 0.0)])
    assert trajectory_differences(run("within", [(2.0, 1e-3), (1.90009, 5e-4), (1.8, 0.0)]), straight) == []
    assert trajectory_differences(run("off", [(2.0, 1e-3), (1.9002, 5e-4), (1.8, 1e-4)]), straight) == [
        "step 2 loss: 1.9002, uninterrupted 1.9", "step 3 learning_rate: 0.0001, uninterrupted 0.0"]
    short = run("short", [(2.0, 1e-3), (1.9, 5e-4)])
    assert trajectory_differences(short, straight) == [
        "global_step: 2, uninterrupted 3", "num_input_tokens_seen: 128, uninterrupted 192",
        "epoch: 0.6666666666666666, uninterrupted 1.0", "logged steps: [1, 2], uninterrupted [1, 2, 3]"]
    assert trajectory_differences(short, straight, upto=2) == []
    with pytest.raises(AssertionError, match="records no num_input_tokens_seen"):
        run("untracked", [(2.0, 1e-3)], num_input_tokens_seen=0)


def test_the_plain_suite_runs_the_ci_cells_and_faults_runs_all():
    assert marker_requested("faults", "faults") and marker_requested("integration and (faults)", "faults")
    assert not marker_requested("not faults", "faults") and not marker_requested("", "faults")
    ci = [c.id for c in CELLS if c.ci]
    assert len(ci) == 3 and len(CELLS) >= 12
    assert {c.zero for c in CELLS} == {2, 3} and {c.stage for c in CELLS} == {"cpt", "sft", "dpo"}
    assert {(c.before, c.after) for c in CELLS} == {(2, 2), (2, 1), (1, 2)}


# ---------------------------------------------------------------------------------------------
# the runs left alone, one per stage and ZeRO stage, shared by the cells
# ---------------------------------------------------------------------------------------------
class References:
    def __init__(self, root: Path):
        self.root = root
        self.runs: Dict[Tuple[str, int], Path] = {}

    def get(self, stage: str, zero: int) -> Path:
        key = (stage, zero)
        if key not in self.runs:
            out = self.root / f"{stage}-zero{zero}"
            proc = launch("train.py", run_args(stage, zero, out), ranks=REFERENCE_RANKS)
            assert proc.returncode == 0, tail(proc)
            assert trained_steps(proc.stdout) == read_trajectory(out).max_steps
            self.runs[key] = out
        return self.runs[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> References:
    return References(tmp_path_factory.mktemp("uninterrupted"))


# ---------------------------------------------------------------------------------------------
# the interruptions
# ---------------------------------------------------------------------------------------------
def start(cell: Cell, out: Path, ranks: int, log: Path) -> BackgroundLaunch:
    return BackgroundLaunch("train.py", run_args(cell.stage, cell.zero, out), ranks, log)


def kill_one_rank_after_a_checkpoint(cell: Cell, out: Path, tmp_path: Path) -> int:
    """kill -9 of the last rank once checkpoint-4 is complete and before checkpoint-8; the run
    must end (no rank left behind) without publishing. Returns the step to resume from."""
    run = start(cell, out, cell.before, tmp_path / "killed.log")
    first = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    run.wait_for(first.name, lambda: is_complete_checkpoint(first))
    os.kill(run.rank(cell.before - 1), signal.SIGKILL)
    signal_sent = time.monotonic()
    code = run.wait(timeout=120)
    print(f"kill -9 of rank {cell.before - 1}: launcher exit {code} after {time.monotonic() - signal_sent:.1f} s")
    assert code != 0, run.output()[-3000:]
    assert not is_model_dir(out), "a killed run published its model"
    newest = newest_complete_checkpoint(out)
    assert newest == first, f"killed after {first.name} and before the next, newest complete: {newest}"
    return SAVE_STEPS


def stop_every_rank_with_usr1(cell: Cell, out: Path, tmp_path: Path) -> int:
    """SIGUSR1 to every rank past step 5: save at the next step end and exit 75, unpublished.
    Returns the step the signal saved."""
    run = start(cell, out, cell.before, tmp_path / "signalled.log")
    run.wait_for("step 5", lambda: trained_steps(run.output()) >= 5)
    run.signal_ranks(signal.SIGUSR1)
    code = run.wait(timeout=150)
    text = run.output()
    assert code == PREEMPTED_EXIT_CODE, text[-4000:]
    saved = [int(s) for s in re.findall(r"preemption: SIGUSR1 received, saving checkpoint-(\d+) and stopping", text)]
    assert len(saved) == 1, text[-4000:]
    step = saved[0]
    assert step == trained_steps(text), "the run stopped at another step than the one it saved"
    assert newest_complete_checkpoint(out) == out / "checkpoints" / f"checkpoint-{step}"
    assert not is_model_dir(out), "a preempted run published its model"
    return step


def interrupt_the_conversion(cell: Cell, out: Path, tmp_path: Path, how: str) -> Optional[int]:
    """The resumed run on `cell.after` ranks, interrupted while rank 0 converts: `kill` (kill -9 of
    every process of the run: a node lost) must leave no conversion that counts; `usr1` (to every
    rank and what it started, the converter included) must let the conversion finish, then
    stop with a checkpoint. Returns the step the rerun resumes from (None: the same as before)."""
    ckpt = newest_complete_checkpoint(out)
    run = start(cell, out, cell.after, tmp_path / f"convert-{how}.log")
    # a file from the converter (in .universal-tmp/, or wherever a broken run would write it)
    converting = lambda: any(p.is_file() for d in [ckpt / UNIVERSAL_TMP, *ckpt.glob("*_universal")]
                             for p in d.rglob("*"))  # noqa: E731
    run.wait_for("a conversion under way", converting, poll_s=0.01)
    assert not has_universal_checkpoint(ckpt)
    if how == "kill":
        run.kill_all()
        assert not has_universal_checkpoint(ckpt) and not (ckpt / UNIVERSAL_LATEST).exists()
        return None
    # the ranks and what they started (the converter, its workers); not deepspeed's own launcher
    # processes, which SLURM's srun does not have
    ranks = [run.rank(r) for r in range(cell.after)]
    for pid in ranks + [below for rank in ranks for below in descendants(rank)]:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    code = run.wait(timeout=150)
    text = run.output()
    assert code == PREEMPTED_EXIT_CODE, text[-4000:]
    assert has_universal_checkpoint(ckpt), "the signal cut the conversion short"
    assert text.count("resume: converted") == 1, text[-4000:]
    assert not is_model_dir(out)
    return int(newest_complete_checkpoint(out).name.split("-")[1])


def interrupt(cell: Cell, out: Path, tmp_path: Path) -> int:
    """Every interruption of `cell`, in order; returns the step the rerun must resume from."""
    first, _, second = cell.fault.partition("+")
    step = (kill_one_rank_after_a_checkpoint if first == "kill-9" else stop_every_rank_with_usr1)(cell, out, tmp_path)
    if second:
        step = interrupt_the_conversion(cell, out, tmp_path, second.split("-")[1]) or step
    return step


@pytest.mark.parametrize("cell", [cell_param(c) for c in CELLS])
def test_cell(cell: Cell, references, tmp_path):
    reference = read_trajectory(references.get(cell.stage, cell.zero))
    out = tmp_path / "run"
    resume_at = interrupt(cell, out, tmp_path)

    rerun = launch("train.py", run_args(cell.stage, cell.zero, out), ranks=cell.after)
    assert rerun.returncode == 0, tail(rerun)
    # no work lost: the rerun resumes where the interruption left a checkpoint, and trains the rest
    assert resumed_step(rerun.stdout) == resume_at, tail(rerun)
    assert trained_steps(rerun.stdout) == reference.max_steps - resume_at
    # after a signal during the conversion, the run saved a checkpoint on the new world size
    written_on = cell.after if cell.fault.endswith("convert-usr1") else cell.before
    if written_on != cell.after:
        assert f"was written on {written_on} ranks and this run has {cell.after}" in rerun.stdout, tail(rerun)
        assert "the global batch stays 2" in rerun.stdout, tail(rerun)
        # a conversion interrupted halfway is done again, once; a complete one is reused
        assert rerun.stdout.count("resume: converted") == 1, tail(rerun)
    assert is_model_dir(out)
    assert_same_trajectory(read_trajectory(out), reference)


# ---------------------------------------------------------------------------------------------
# what cannot work: refused in one line, before queueing and at start, before any training
# ---------------------------------------------------------------------------------------------
def train_main(argv):
    """What launch/train.py does: compose, then train."""
    from train.config import compose_train_config
    from train.run import train

    train(compose_train_config(argv))


def resume_of_the_reference(references, tmp_path: Path) -> Path:
    """A new output_dir holding checkpoint-4 of the 2-rank ZeRO-3 CPT run, as if it were killed after it."""
    out = tmp_path / "run"
    ckpt = references.get("cpt", 3) / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(ckpt, out / "checkpoints" / ckpt.name)
    return out


def assert_refused_at_submit_and_at_start(out: Path, args: list, ranks: int, needles, capsys, monkeypatch):
    """`launch/submit.py ARGS cluster.gpus_per_node=<ranks> --dry-run` and the run itself on
    `ranks` ranks (rank 0's start-up, in this process) each refuse in one line naming `needles`,
    and neither touches the run directory."""
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    proc = run_light("submit.py", *args, "cluster=slurm", f"cluster.gpus_per_node={ranks}", "--dry-run")
    assert_one_line_error(proc, *needles)
    monkeypatch.setenv("WORLD_SIZE", str(ranks))
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", str(ranks)),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29400")):
        monkeypatch.setenv(name, value)
    assert_one_line_error(run_main(train_main, args, capsys), *needles)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "a refused run wrote into its output_dir"


@pytest.mark.faults(ci=True)
@pytest.mark.integration
def test_refused_zero_stage_change(references, tmp_path, capsys, monkeypatch):
    out = resume_of_the_reference(references, tmp_path)
    ckpt = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    assert_refused_at_submit_and_at_start(
        out, run_args("cpt", 2, out), REFERENCE_RANKS, (str(ckpt), "deepspeed.zero_stage=2", "resume=never"),
        capsys, monkeypatch)


@pytest.mark.faults(ci=True)
@pytest.mark.integration
def test_refused_world_size_that_cannot_keep_the_global_batch(references, tmp_path, capsys, monkeypatch):
    """The checkpoint's global batch is 2; 4 ranks of 1 sequence cannot keep it. The command sets
    no batch (it keeps the checkpoint's), as a resubmission on more GPUs does."""
    out = resume_of_the_reference(references, tmp_path)
    args = [a if not a.startswith("training.global_batch_size=") else "training.global_batch_size=null"
            for a in run_args("cpt", 3, out)]
    ckpt = out / "checkpoints" / f"checkpoint-{SAVE_STEPS}"
    assert_refused_at_submit_and_at_start(
        out, args, 4, (str(ckpt), "training.global_batch_size=2", "4 rank(s)", "resume=never"), capsys, monkeypatch)
