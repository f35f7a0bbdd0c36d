"""An evaluation killed between two tasks' result files (docs/failure-modes.md): each task has its
complete result or none, and a rerun with skip_scored=true (as pipeline evaluation steps run)
scores only the task that is missing. Real `launch/eval.py` processes, a real SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.support.env import REPO, offline_env, run_main
from tests.support.models import EVAL_SHAPE, tiny_llama

TASKS = ["materials_cpt_mc_loglik", "materials_cpt_mc_gen"]
LIMIT = 4


def eval_args(model, out):
    return [str(model), f"tasks=[{','.join(TASKS)}]", f"limit={LIMIT}", f"output_dir={out}", "skip_scored=true"]


def eval_main(argv):
    """What launch/eval.py does, in this process."""
    from evaluation.config import compose_eval_config, eval_overrides
    from evaluation.run import evaluate

    evaluate(compose_eval_config(eval_overrides(argv)))


def kill_after_the_first_result(model, out) -> None:
    """launch/eval.py, paused after each result file (evaluation/run.py's PUBLISH_PAUSE_ENV) and
    killed in the pause after the first."""
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "eval.py"), *eval_args(model, out)], cwd=REPO,
                            env=offline_env(DOMAINFORGE_EVAL_PAUSE_AFTER_TASK="60"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("wrote "):
            proc.kill()
            proc.wait()
            return
    proc.wait()
    pytest.fail(f"the evaluation ended (exit {proc.returncode}) before its first result file:\n{''.join(seen[-30:])}")


@pytest.mark.integration
def test_killed_evaluation_keeps_whole_results_and_the_rerun_scores_only_the_rest(tmp_path, capsys):
    model = tiny_llama(tmp_path / "model", **EVAL_SHAPE)
    out = tmp_path / "eval"
    kill_after_the_first_result(model, out)

    # one task complete (result after its samples), the other with nothing at all; no temp files
    (done,) = [t for t in TASKS if (out / f"{t}.json").exists()]
    (missing,) = [t for t in TASKS if t != done]
    written = [f"{done}.json", f"{done}.samples.jsonl"] + ([f"{done}.items.jsonl"] if done.endswith("_loglik") else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    kept = (out / f"{done}.json").read_bytes()
    assert json.loads(kept)["n"] == LIMIT
    assert len((out / f"{done}.samples.jsonl").read_text().splitlines()) == LIMIT

    rerun = subprocess.run([sys.executable, str(REPO / "launch" / "eval.py"), *eval_args(model, out)], cwd=REPO,
                           env=offline_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"skip_scored: keeping the results of {done} in {out}" in rerun.stdout
    assert f" on {missing} (" in rerun.stdout  # the only task evaluated
    assert (out / f"{done}.json").read_bytes() == kept
    assert json.loads((out / f"{missing}.json").read_text())["n"] == LIMIT
    assert len((out / f"{missing}.samples.jsonl").read_text().splitlines()) == LIMIT

    # every task scored: a third run loads no model and writes nothing
    again = run_main(eval_main, eval_args(model, out), capsys)
    assert again.returncode == 0, again.stderr
    assert f"every task has its result in {out}: nothing to evaluate" in again.stdout
    assert (out / f"{done}.json").read_bytes() == kept
