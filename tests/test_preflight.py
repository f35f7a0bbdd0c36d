"""Dry runs are a real pre-flight: `launch/pipeline.py --dry-run` and `launch/submit.py --dry-run`
make every check a run makes before its first step (models, data files and their columns), fail
in one line, print the plan (data sizes, global batch, checkpoint-disk bound) and write nothing.
Run with the heavy libraries poisoned: the pre-flight is login-node code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from orchestration.preflight import CHECKPOINT_BYTES_PER_PARAM
from train.memory import params_in_model_dir, shape_of
from tests.support.env import REPO, assert_one_line_error, run_light
from tests.support.models import tiny_llama

LAUNCHERS = ["pipeline.py", "submit.py"]


def dry_run(script: str, root: Path, *overrides: str):
    return run_light(script, "pipeline=tiny", f"root={root}", *overrides, "--dry-run")


@pytest.mark.parametrize("script", LAUNCHERS)
def test_a_missing_start_model_fails_the_dry_run(script, tmp_path):
    proc = dry_run(script, tmp_path / "runs", f"pipeline.start={tmp_path / 'no-such-model'}")
    assert_one_line_error(proc, "step 'cpt'", str(tmp_path / "no-such-model"), "pipeline.start=")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", LAUNCHERS)
def test_a_missing_data_file_fails_the_dry_run(script, tmp_path):
    missing = tmp_path / "sft.jsonl"
    proc = dry_run(script, tmp_path / "runs", f"pipeline.overrides=['data.sft.path={missing}']")
    assert_one_line_error(proc, "step 'sft'", f"data.sft.path={missing} does not exist")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", LAUNCHERS)
def test_data_with_the_wrong_columns_fails_the_dry_run(script, tmp_path):
    wrong = tmp_path / "pairs.jsonl"
    wrong.write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    proc = dry_run(script, tmp_path / "runs", f"pipeline.overrides=['data.preference.path={wrong}']")
    assert_one_line_error(proc, "step 'dpo'", "has columns [prompt, answer]", "`prompt`, `chosen` and `rejected`")


def test_bad_rows_fail_as_the_training_run_would(tmp_path):
    rows = tmp_path / "cpt.jsonl"
    rows.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 7}) + "\n")
    proc = dry_run("pipeline.py", tmp_path / "runs", f"pipeline.overrides=['data.cpt.path={rows}']")
    assert_one_line_error(proc, f"data.cpt.path={rows}: row 1, field 'text' is a int")


@pytest.mark.parametrize("script", LAUNCHERS)
def test_the_plan_shows_data_sizes_batch_and_the_disk_bound(script, tmp_path):
    proc = dry_run(script, tmp_path / "runs", "cluster.gpus_per_node=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    corpus = REPO / "data" / "materials" / "cpt.jsonl"
    rows = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    assert f"cpt: data.cpt.path={corpus}  {corpus.stat().st_size / 1000:.1f} KB, {rows:,} rows" in proc.stdout
    # tiny: 3.4M params, bf16 model + save_total_limit (2) DeepSpeed checkpoints of 16 B/param
    params = shape_of(dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), "tiny").params
    bound = params * 2 + 2 * params * CHECKPOINT_BYTES_PER_PARAM
    assert re.search(rf"#   sft: batch 1 x 1 x 2 = 2; 3\.4M params; disk <= {bound / 1e6:.1f} MB", proc.stdout), \
        proc.stdout[-3000:]
    assert "checkpoint disk of the training steps: at most" in proc.stdout
    assert "sft (sft) after cpt" in proc.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing, runs nothing


def test_params_from_safetensors_headers_and_from_config_agree_with_torch(tmp_path):
    model = tiny_llama(None)
    saved = tiny_llama(tmp_path / "m")
    assert params_in_model_dir(saved) == model.num_parameters()
    for weights in saved.glob("*.safetensors"):
        weights.unlink()
    assert params_in_model_dir(saved) == model.num_parameters()  # from config.json's architecture
