"""A pipeline on the user's own corpus and eval set, given the documented way (README, "Pipelines
and SLURM"): `data.cpt.path=<file>` on the pipeline's command line reaches the training step,
which learns it, and `pipeline.eval.eval_sets=[<file>]` scores every model on that set, with no
bundled task beside it, and the study reports it."""

from __future__ import annotations

import json

import pytest
from tests.support.env import launch, loss_history, tail

pytestmark = pytest.mark.integration

SENTENCE = "The alloy zorbium melts at 1234 kelvin and is harder than steel. "


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_pipeline_trains_on_your_corpus_and_scores_your_eval_set(tmp_path):
    corpus, eval_set = tmp_path / "corpus.jsonl", tmp_path / "zorbium.jsonl"
    write_jsonl(corpus, [{"text": SENTENCE * 6} for _ in range(40)])
    write_jsonl(eval_set, [{"question": f"Zorbium fact {i}?", "options": ["a", "b", "c", "d"], "answer": "B"}
                           for i in range(5)])
    root = tmp_path / "runs"
    proc = launch("pipeline.py", [
        "pipeline=tiny", f"root={root}", "pipeline.steps=[{name: cpt, stage: cpt}]", "pipeline.eval.tasks=[]",
        "pipeline.eval.cpt_epochs=false", f"pipeline.eval.eval_sets=[{eval_set}]", f"data.cpt.path={corpus}",
        "cluster.gpus_per_node=1",
    ], timeout=900)
    assert proc.returncode == 0, tail(proc)
    cpt = root / "tiny" / "cpt"
    assert f"path: {corpus}" in (cpt / "domainforge.yaml").read_text()  # the step trained on the given file
    losses = loss_history(cpt)
    assert len(losses) == 4 and losses[-1] < losses[0] - 1.0, losses  # one repeated sentence: learnt fast
    for task, output_type in (("zorbium_loglik", "multiple_choice"), ("zorbium_gen", "generate_until")):
        record = json.loads((cpt / "eval" / f"{task}.json").read_text())
        assert record["n"] == 5 and record["output_type"] == output_type, record
    assert "zorbium_loglik" in (root / "tiny" / "study.md").read_text()
