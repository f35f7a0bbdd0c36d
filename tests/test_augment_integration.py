"""launch/augment.py's two methods on the bundled corpus, each followed by a real CPT stage on its
output (`deepspeed --num_gpus 2 launch/train.py`, ZeRO-3, tiny model), through the local pipeline
runner: conf/pipeline/tiny_augment.yaml with the tiny test model as the start model and rewriter."""

from __future__ import annotations

import json
import math

import datasets
import pytest
from tests.support.env import launch, loss_history, tail
from tests.support.eval_sets import assert_held_out
from tests.support.models import EVAL_SHAPE, tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def augment_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augment")
    start = tiny_llama(tmp / "start", **EVAL_SHAPE)
    proc = launch("pipeline.py", ["pipeline=tiny_augment", f"pipeline.start={start}", f"root={tmp / 'runs'}",
                                  "cluster.gpus_per_node=2"], timeout=1200)
    assert proc.returncode == 0, tail(proc)
    return tmp / "runs" / "tiny_augment", proc


def test_rules_and_rewrite_outputs_are_published_with_manifests(augment_run):
    run, _ = augment_run
    rules = json.loads((run / "rules" / "manifest.json").read_text())
    assert rules["method"] == "rules" and rules["rows_in"] == 24 and rules["rows_out"] == 24 * 3
    assert rules["tokens_out"] > 3 * rules["tokens_in"]
    wrap = json.loads((run / "wrap" / "manifest.json").read_text())
    assert wrap["method"] == "rewrite" and wrap["rows_in"] == 4 and wrap["shards"] == 2
    assert wrap["rewrites"]["generated"] == 4 * 2
    assert wrap["rewrites"]["kept"] + sum(wrap["rejected"].values()) == 8
    assert wrap["rows_out"] == 4 + wrap["rewrites"]["kept"]  # the sources are kept beside the rewrites
    # The eval set questions stay held out of whatever the model wrote, too.
    texts = [t for name in ("rules", "wrap") for t in datasets.load_from_disk(str(run / name))["text"]]
    assert_held_out(texts)


@pytest.mark.parametrize("step, corpus", [("cpt-rules", "rules"), ("cpt-wrap", "wrap")])
def test_cpt_trains_on_each_augmented_corpus(augment_run, step, corpus):
    run, proc = augment_run
    out = run / step
    assert (out / "config.json").is_file()  # published
    losses = loss_history(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    resolved = (out / "domainforge.yaml").read_text()
    assert f"path: {run / corpus}" in resolved
