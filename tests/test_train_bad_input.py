"""Bad input to the real training launcher: one `error:` line naming the problem and the fix,
a non-zero exit, and no run directory that could pass for a finished one."""

from __future__ import annotations

import json

import pytest
from conftest import assert_one_line_error, launch

pytestmark = pytest.mark.integration


def run(tmp_path, *overrides, ranks=None):
    out = tmp_path / "run"
    proc = launch("train.py", [*overrides, f"output_dir={out}"], ranks=ranks, timeout=300)
    return proc, out


def assert_nothing_written(out):
    assert not out.exists(), list(out.rglob("*"))


def test_missing_data_file(tmp_path):
    proc, out = run(tmp_path, "+stage=cpt", f"data.cpt.path={tmp_path}/nope.jsonl")
    assert_one_line_error(proc, "nope.jsonl", "data.cpt.path")
    assert_nothing_written(out)


def test_dataset_without_the_text_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "Iron is a metal."}) + "\n")
    proc, out = run(tmp_path, "+stage=cpt", f"data.cpt.path={bad}")
    line = assert_one_line_error(proc, "text")
    assert "body" in line  # says which columns it found
    assert_nothing_written(out)


def test_dataset_without_messages(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    proc, out = run(tmp_path, "+stage=sft", f"data.sft.path={bad}")
    assert_one_line_error(proc, "messages")
    assert_nothing_written(out)


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc, out = run(tmp_path, "+stage=cpt", f"data.cpt.path={empty}")
    assert_one_line_error(proc, "empty")
    assert_nothing_written(out)


def test_unknown_stage(tmp_path):
    proc, out = run(tmp_path, "+stage=rlhf")
    assert_one_line_error(proc, "unknown stage 'rlhf'", "cpt", "sft")
    assert_nothing_written(out)


def test_max_seq_length_above_the_model_limit(tmp_path):
    proc, out = run(tmp_path, "+stage=cpt", "training.max_seq_length=100000")
    assert_one_line_error(proc, "training.max_seq_length=100000", "4096")
    assert_nothing_written(out)


def test_unknown_config_key(tmp_path):
    proc, out = run(tmp_path, "+stage=cpt", "training.lerning_rate=1e-4")
    assert_one_line_error(proc, "training.lerning_rate")
    assert_nothing_written(out)


def test_model_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    proc, out = run(tmp_path, "+stage=sft", f"model.path={tmp_path}/notamodel")
    assert_one_line_error(proc, "model.path", "config.json")
    assert_nothing_written(out)


def test_one_line_under_the_deepspeed_launcher(tmp_path):
    # Both ranks fail the same way; the user sees the error once.
    proc, out = run(tmp_path, "+stage=cpt", "training.lerning_rate=1e-4", ranks=2)
    assert_one_line_error(proc, "training.lerning_rate")
    assert_nothing_written(out)
