"""Faults during training's saves, against real files and processes: a full disk (a tmpfs) during
a checkpoint and during the final save of a 2-rank ZeRO-3 run, SIGKILL and SIGTERM while the
final model is being written. The previous checkpoint stays usable and a rerun finishes.

    flock /tmp/df-heavy.lock python -m pytest -q tests/test_faults_train.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from tests.support.env import (REPO, SMALL_BATCH, assert_one_line_error, generates, launch, offline_env, tail,
                               tmpfs)

from train.checkpoint import FINAL_TMP, newest_complete_checkpoint

# A 2-rank ZeRO-3 CPT run of 2 epochs, a checkpoint (55 MB: 41 MB of DeepSpeed partitions, 14 MB of
# gathered weights) at each epoch end, then the 14 MB final model. The tmpfs sizes are set from these.
EPOCHS_RUN = ["+stage=cpt", *SMALL_BATCH, "training.max_seq_length=64", "data.cpt.max_samples=2",
              "training.num_train_epochs=2", "training.keep_epoch_models=true", "training.save_total_limit=null"]


def launch_on(out):
    return launch("train.py", [*EPOCHS_RUN, f"output_dir={out}"], ranks=2)


def remount(mnt, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


def file_bytes(directory):
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def weights(model_dir):
    from safetensors.torch import load

    return load((model_dir / "model.safetensors").read_bytes())  # not mapped: the tmpfs can be unmounted


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_full_disk_during_a_multi_rank_save_keeps_the_last_checkpoint_and_the_rerun_publishes(tmp_path):
    """A real ENOSPC on a tmpfs under `deepspeed --num_gpus 2`: first in the checkpoint that ends
    epoch 2, then (more space) in the final save; each time one error line, the run not finished
    and the checkpoint before intact; with space, the rerun resumes from it and publishes."""
    with tmpfs(tmp_path / "disk", "size=80m") as out:  # room for one checkpoint, not two
        proc = launch_on(out)
        assert_one_line_error(proc, "out of disk space", "rerun the same command")
        assert not (out / "config.json").exists()
        first = newest_complete_checkpoint(out)
        assert first is not None and first.name != "checkpoint-0", proc.stdout[-2000:]
        (epoch_1,) = (out / "epochs").iterdir()
        assert epoch_1.name == "epoch-1"

        remount(out, "114m")  # the second checkpoint fits (110 MB in all), the final model (14 MB) does not
        proc = launch_on(out)
        assert f"resuming from {first}" in proc.stdout, proc.stdout[-2000:]
        assert_one_line_error(proc, "out of disk space", "rerun the same command")
        assert not (out / "config.json").exists()
        last = newest_complete_checkpoint(out)
        assert int(last.name[11:]) == 2 * int(first.name[11:]), last
        kept = file_bytes(last)

        remount(out, "200m")
        proc = launch_on(out)
        assert proc.returncode == 0, tail(proc)
        assert f"resuming from {last}" in proc.stdout, proc.stdout[-2000:]
        assert (out / "config.json").is_file() and not (out / FINAL_TMP).exists()
        assert file_bytes(last) == kept  # the failed final save left the checkpoint as it was
        state = json.loads((last / "trainer_state.json").read_text())
        assert state["global_step"] == int(last.name[11:])

        # the saved model is the trained one; epochs/epoch-k holds the weights that ended epoch k
        final = weights(out)
        assert same_weights(final, weights(last))
        assert same_weights(weights(out / "epochs" / "epoch-2"), final)
        assert same_weights(weights(out / "epochs" / "epoch-1"), weights(first))
        assert not same_weights(weights(out / "epochs" / "epoch-1"), final)


def test_a_checkpoint_whose_state_the_full_disk_cut_short_is_not_resumed(tmp_path):
    """trainer_state.json is written last and in place: cut short, its checkpoint is incomplete
    and the run resumes from the one before."""
    for step in (2, 4):
        ckpt = tmp_path / "checkpoints" / f"checkpoint-{step}"
        (ckpt / f"global_step{step}").mkdir(parents=True)
        (ckpt / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"\1")
        (ckpt / "latest").write_text(f"global_step{step}")
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    assert newest_complete_checkpoint(tmp_path).name == "checkpoint-4"
    (ckpt / "trainer_state.json").write_text('{"global_step": 4, "log_hi')
    assert newest_complete_checkpoint(tmp_path).name == "checkpoint-2"


def train_cmd(out):
    return [sys.executable, str(REPO / "launch" / "train.py"), "+stage=cpt", *SMALL_BATCH, "training.max_steps=2",
            "training.save_steps=1", "training.max_seq_length=64", "data.cpt.max_samples=40", f"output_dir={out}"]


def start_paused(out):
    """A real training run that stops for 60 s with its final model in .final-tmp; it and what it
    printed until then."""
    proc = subprocess.Popen(train_cmd(out), cwd=REPO, env=offline_env(DOMAINFORGE_TRAIN_PAUSE_BEFORE_PUBLISH="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("final model written to"):
            return proc, "".join(printed)
    proc.wait()
    pytest.fail(f"the run ended (exit {proc.returncode}) before its final save")


@pytest.mark.integration
def test_kill_during_the_final_save_keeps_the_checkpoint_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    proc, _ = start_paused(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "config.json").exists()  # nothing looks finished
    assert (out / FINAL_TMP / "model.safetensors").is_file()
    ckpt = newest_complete_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    state_written = (ckpt / "trainer_state.json").stat().st_mtime_ns

    # SIGTERM during the save of the rerun: the stop signal waits for the save, which finishes
    proc, printed = start_paused(out)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = printed + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    assert f"resuming from {ckpt}" in rest, rest[-2000:]
    # nothing trained again: the checkpoint of the last step is the one the first run wrote
    assert (ckpt / "trainer_state.json").stat().st_mtime_ns == state_written
    assert (out / "config.json").is_file() and not (out / FINAL_TMP).exists()
    assert generates(out)
    assert not list(tmp_path.glob(".*.lock"))
