"""Faults during training's final save, against real files and processes: a full disk, SIGKILL
and SIGTERM while the final model is being written. The previous checkpoint stays usable and a
rerun finishes.

    flock /tmp/df-heavy.lock python -m pytest -q tests/test_faults_train.py
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from tests.support.env import REPO, SMALL_BATCH, assert_one_line_error, generates, offline_env

from train.checkpoint import FINAL_TMP, RUN_CONFIG, newest_complete_checkpoint

# train.run.save_final_model on a real (small) model with a stand-in for the HF Trainer, whose
# save_model is what the Trainer's does without DeepSpeed: save_pretrained. Run with cwd=REPO.
SAVE = """
import sys
from transformers import AutoTokenizer
from core.errors import exit_on_user_error
from train.config import compose_train_config
from train.run import save_final_model
from tests.support.models import TOKENIZER, tiny_llama

class Trainer:
    def __init__(self, model): self.model = model
    def save_model(self, path): self.model.save_pretrained(path)
    def is_world_process_zero(self): return True
    class accelerator:
        @staticmethod
        def wait_for_everyone(): pass

model = tiny_llama(None, layers=2, hidden=64, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
cfg = compose_train_config(["+stage=cpt", "output_dir=" + sys.argv[1]])
exit_on_user_error(save_final_model, Trainer(model), tokenizer, cfg)
"""


def fake_checkpoint(out):
    ckpt = out / "checkpoints" / "checkpoint-4"
    (ckpt / "global_step4").mkdir(parents=True)
    (ckpt / "global_step4" / "mp_rank_00_model_states.pt").write_bytes(b"\1" * 4096)
    (ckpt / "latest").write_text("global_step4")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    return {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG (an OSError) instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_the_final_save_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    before = fake_checkpoint(out)
    cmd = [sys.executable, "-c", SAVE, str(out)]
    # ~1.2 MB of weights in one file; 256 kB is enough for the tokenizer and configs only
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size(256 * 1024))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, "out of disk space", "rerun the same command")
    assert not (out / "config.json").exists()
    assert {p: p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before
    assert newest_complete_checkpoint(out).name == "checkpoint-4"
    # with space again, the same save publishes (the half-written .final-tmp is replaced)
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and (out / RUN_CONFIG).is_file() and not (out / FINAL_TMP).exists()


def train_cmd(out):
    return [sys.executable, str(REPO / "launch" / "train.py"), "+stage=cpt", *SMALL_BATCH, "training.max_steps=2",
            "training.save_steps=1", "training.max_seq_length=64", "data.cpt.max_samples=40", f"output_dir={out}"]


def start_paused(out):
    """A real training run that stops for 60 s with its final model in .final-tmp."""
    proc = subprocess.Popen(train_cmd(out), cwd=REPO, env=offline_env(DOMAINFORGE_TRAIN_PAUSE_BEFORE_PUBLISH="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("final model written to"):
            return proc
    proc.wait()
    pytest.fail(f"the run ended (exit {proc.returncode}) before its final save")


@pytest.mark.integration
def test_kill_during_the_final_save_keeps_the_checkpoint_and_the_rerun_finishes(tmp_path):
    out = tmp_path / "run"
    proc = start_paused(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "config.json").exists()  # nothing looks finished
    assert (out / FINAL_TMP / "model.safetensors").is_file()
    ckpt = newest_complete_checkpoint(out)
    assert ckpt is not None and ckpt.name == "checkpoint-2"

    # SIGTERM during the save of the rerun: the stop signal waits for the save, which finishes
    proc = start_paused(out)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    assert f"resuming from {ckpt}" in rest or "saved final model" in rest
    assert (out / "config.json").is_file() and not (out / FINAL_TMP).exists()
    assert generates(out)
    assert not list(tmp_path.glob(".*.lock"))
