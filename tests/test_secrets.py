"""Credentials stay in the environment: a pipeline run with fake HF and W&B credentials set,
W&B logging on (offline), writes them into no file (resolved config, model card, W&B run files,
job logs), and a batch script that would carry one has it redacted.

    flock /tmp/df-heavy.lock python -m pytest -q tests/test_secrets.py
"""

from __future__ import annotations

import pytest
from tests.support.env import launch, offline_env

SECRETS = {
    "HF_TOKEN": "hf_fakeTOKENfakeTOKENfake01",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHUBtokenFAKEhubTOKEN2",
    "WANDB_API_KEY": "f" * 24 + "0123456789abcdef",
}


def files_holding_a_secret(root):
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10, files  # the run did write things
    return [f"{name} in {p}" for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]


@pytest.mark.integration
def test_pipeline_step_with_wandb_writes_no_secret(tmp_path):
    root = tmp_path / "runs"
    proc = launch("pipeline.py", ["pipeline=tiny", "step=cpt", f"root={root}",
                                  "pipeline.steps.0.overrides=['logging=wandb','data.cpt.max_samples=40',"
                                  "'training.max_steps=-1','training.num_train_epochs=1']"],
                  env=offline_env(**SECRETS), timeout=600)
    (tmp_path / "pipeline.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "tiny" / "cpt"
    assert (run / "config.json").is_file() and list(run.rglob("wandb/offline-run-*"))
    assert not files_holding_a_secret(tmp_path)


def test_batch_scripts_never_carry_a_secret(tmp_path):
    # A setup line that expands a credential when the config is composed (a user's mistake):
    # the rendered script shows <redacted>, never the value.
    proc = launch("submit.py", ["pipeline=tiny", "cluster=slurm", f"root={tmp_path}", "--dry-run",
                                "cluster.setup=['export HF_TOKEN=${oc.env:HF_TOKEN}']"], env=offline_env(**SECRETS))
    assert proc.returncode == 0, proc.stderr
    assert "export HF_TOKEN=<redacted>" in proc.stdout
    assert not [name for name, value in SECRETS.items() if value in proc.stdout + proc.stderr]
