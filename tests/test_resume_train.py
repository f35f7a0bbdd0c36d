"""`resume=<checkpoint dir>` and `resume=never` through `python launch/train.py`, on the
checkpoints of a first run whose Hub upload fails (exit 2, the local model finished):

    flock /tmp/df-heavy.lock python -m pytest -q tests/test_resume_train.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.support.env import SMALL_BATCH, assert_one_line_error, launch, offline_env, tail
from tests.support.hub_standin import HubStandIn

from core.outputs import is_model_dir

pytestmark = pytest.mark.integration

RUN = ["+stage=cpt", *SMALL_BATCH, "training.max_seq_length=64", "data.cpt.max_samples=40",
       "training.save_steps=1", "training.save_total_limit=3"]
MARK = 99.0
"""A loss no step logs: written into a copied checkpoint's log rows, it shows which checkpoint
a run continued from (the Trainer carries the loaded checkpoint's rows on)."""


def trainer_state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())


def loss_rows(state: dict) -> dict:
    return {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row}


def copy_checkpoints_marked(first: Path, out: Path, marked_steps) -> None:
    """`first`'s checkpoints under `out`, with the loss rows of `marked_steps` set to MARK."""
    shutil.copytree(first / "checkpoints", out / "checkpoints")
    for ckpt in (out / "checkpoints").glob("checkpoint-*"):
        state_file = ckpt / "trainer_state.json"
        state = json.loads(state_file.read_text())
        for row in state["log_history"]:
            if row.get("step") in marked_steps and "loss" in row:
                row["loss"] = MARK
        state_file.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """3 steps, a checkpoint after each; the upload to a Hub that answers 500 fails the run."""
    out = tmp_path_factory.mktemp("resume") / "first"
    with HubStandIn(fail=True) as hub:
        proc = launch("train.py", [*RUN, "training.max_steps=3", f"output_dir={out}", "hub.push=true",
                                   "hub.repo_id=lab/tiny-cpt"], env=offline_env(**hub.client_env()), timeout=300)
    return out, proc


def test_a_failed_hub_push_fails_the_run_and_leaves_the_model_finished(first):
    out, proc = first
    assert proc.returncode == 2, tail(proc)
    assert_one_line_error(proc, f"hub push of {out} to lab/tiny-cpt failed", "the local model is complete",
                          f"hf upload lab/tiny-cpt {out}")
    assert "saved final model" in proc.stdout and "pushed" not in proc.stdout
    assert is_model_dir(out) and (out / "model.safetensors").is_file() and not (out / ".final-tmp").exists()


def test_resume_from_a_named_checkpoint_continues_from_it(first, tmp_path):
    """The run directory also holds a newer checkpoint-3 (which resume=auto would take)."""
    source, _ = first
    expected = loss_rows(trainer_state(source, 3))
    out = tmp_path / "run"
    copy_checkpoints_marked(source, out, marked_steps={1, 2, 3})
    named = out / "checkpoints" / "checkpoint-1"
    proc = launch("train.py", [*RUN, "training.max_steps=3", f"output_dir={out}", f"resume={named}"], timeout=300)
    assert proc.returncode == 0, tail(proc)
    state = trainer_state(out, 3)
    assert state["global_step"] == 3
    losses = loss_rows(state)
    assert list(losses) == [1, 2, 3]
    assert losses[1] == MARK  # carried on from checkpoint-1 ...
    assert losses[2] == pytest.approx(expected[2], abs=1e-4)  # ... and steps 2 and 3 trained again, on the
    assert losses[3] == pytest.approx(expected[3], abs=1e-4)  # first run's trajectory
    assert f"resuming from {named}\n" in proc.stdout


def test_resume_never_starts_over_and_sets_the_old_checkpoints_aside(first, tmp_path):
    source, _ = first
    expected = loss_rows(trainer_state(source, 2))
    out = tmp_path / "run"
    copy_checkpoints_marked(source, out, marked_steps={1, 2, 3})
    proc = launch("train.py", [*RUN, "training.max_steps=2", f"output_dir={out}", "resume=never"], timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    state = trainer_state(out, 2)
    assert state["global_step"] == 2
    losses = loss_rows(state)
    assert list(losses) == [1, 2] and MARK not in losses.values()  # every step trained by this run
    assert losses == pytest.approx(expected, abs=1e-4)  # from the start, as the first run did
    assert is_model_dir(out)
    assert "resuming from" not in proc.stdout
    aside = list(out.glob("checkpoints.before-*"))
    assert len(aside) == 1 and f"resume=never: moved the earlier run's checkpoints to {aside[0]}" in proc.stdout
    assert sorted(p.name for p in aside[0].glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
