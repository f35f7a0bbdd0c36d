"""Every way a user can get `launch/study.py` wrong, as one table: (arguments, the one `error:`
line's substrings). Each case runs the real command and asserts exit 2, no traceback and no
report written (study.json marks a finished study).

    python -m pytest -q tests/test_matrix_study.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from orchestration.study import run_study
from tests.support.env import assert_one_line_error, launch
from tests.support.study import SCORES, fake_run


def not_a_run(tmp: Path) -> list:
    (tmp / "some_dir").mkdir()
    return [str(tmp / "some_dir")]


def missing_dir(tmp: Path) -> list:
    return [str(tmp / "nope")]


def a_file(tmp: Path) -> list:
    (tmp / "a_file").write_text("x")
    return [str(tmp / "a_file")]


def corrupt_plan(tmp: Path) -> list:
    run = fake_run(tmp, SCORES)
    (run / "pipeline.json").write_text("{not json")
    return [str(run)]


def no_results_yet(tmp: Path) -> list:
    run = fake_run(tmp, {})
    return [str(run)]


def corrupt_result(tmp: Path) -> list:
    run = fake_run(tmp, SCORES)
    (run / "sft" / "eval" / "dom_loglik.json").write_text('{"task": "dom_loglik", "n": ')
    return [str(run)]


def read_only_run(tmp: Path) -> list:
    """A finished run on a file system mounted read-only since (we run as root: file modes do not stop us)."""
    mnt = tmp / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    run = fake_run(mnt, SCORES)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    return [str(run)]


def no_argument(tmp: Path) -> list:
    return []


def two_arguments(tmp: Path) -> list:
    return [str(tmp), str(tmp)]


def unknown_flag(tmp: Path) -> list:
    return [str(tmp), "--plots=no"]


# (id, how to make the arguments, needles)
CASES = [
    ("not-a-run", not_a_run, ["is not a pipeline run (no pipeline.json)", "<root>/<pipeline>"]),
    ("missing-dir", missing_dir, ["nope", "is not a pipeline run"]),
    ("a-file", a_file, ["a_file", "is not a pipeline run"]),
    ("corrupt-plan", corrupt_plan, ["pipeline.json is not valid JSON", "rerun the pipeline"]),
    ("no-results", no_results_yet, ["no evaluation results yet", "pipeline.eval.tasks"]),
    ("corrupt-result", corrupt_result, ["cannot read eval result", "dom_loglik.json"]),
    ("read-only-run", read_only_run, ["RUN_DIR=", "is not writable"]),
    ("no-argument", no_argument, ["the following arguments are required: run_dir", "usage"]),
    ("two-arguments", two_arguments, ["unrecognized arguments", "usage"]),
    ("unknown-flag", unknown_flag, ["unrecognized arguments: --plots=no"]),
]


@pytest.mark.parametrize("make_args, needles", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_study_rejects(make_args, needles, tmp_path):
    args = make_args(tmp_path)
    proc = launch("study.py", args, timeout=120)
    try:
        assert_one_line_error(proc, *needles)
        assert proc.returncode == 2
        assert not list(tmp_path.rglob("study.json")) and not list(tmp_path.rglob("study.md"))
    finally:
        if (tmp_path / "ro").is_mount():
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)


class PowerCut(Exception):
    """The machine stops between writing a report file and putting it in place."""


def test_a_partial_report_is_replaced_whole(tmp_path, monkeypatch):
    """A study written over an older one leaves no mix of the two: each file is replaced
    atomically. A second report cut off as it puts study.md, then study.json, in place leaves
    that file as it was, whole and readable; the rerun then replaces both and leaves no
    temporary file."""
    monkeypatch.delenv("DOMAINFORGE_WANDB", raising=False)
    run = fake_run(tmp_path, SCORES)
    assert launch("study.py", [str(run)], timeout=120).returncode == 0
    first = {name: (run / name).read_text() for name in ("study.md", "study.json")}
    (run / "sft" / "eval" / "dom_loglik.json").unlink()
    put_in_place = os.replace

    for name in first:
        def cut_off(src, dst, name=name):
            if Path(dst).name == name:
                raise PowerCut(dst)
            put_in_place(src, dst)

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", cut_off)
            with pytest.raises(PowerCut):
                run_study(str(run))
        assert (run / name).read_text() == first[name], name
        assert json.loads((run / "study.json").read_text())["missing"] == []

    run_study(str(run))
    second = json.loads((run / "study.json").read_text())
    assert second["missing"] == [{"step": "eval-sft", "model": "sft", "task": "dom_loglik"}]
    assert (run / "study.md").read_text() != first["study.md"]
    assert not list(run.glob("*.tmp"))
