"""The paper's merge-versus-parents score (merge/synergy.py, launch/synergy.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error
from conftest import test_env as child_env
from test_merge_models import run_merge_cli, tiny_pair, write_config  # noqa: F401


def test_synergy_is_the_papers_comparison():
    from merge.synergy import synergy, verdict

    s = synergy([0.60, 0.70], 0.72)
    assert s["expected"] == pytest.approx(0.65) and s["best_parent"] == 0.70
    assert s["over_expected"] == pytest.approx(0.07) and s["over_best"] == pytest.approx(0.02)
    assert verdict(s) == "beats both parents"
    assert verdict(synergy([0.60, 0.70], 0.66)) == "beats the parents' mean, not the best parent"
    assert verdict(synergy([0.60, 0.70], 0.70)) == "ties the best parent"
    assert verdict(synergy([0.60, 0.70], 0.64)) == "at or below the parents' mean"


def test_score_pairs_counts_ties_half():
    from merge.synergy import score_pairs

    chosen = [(-1.0, 2), (-5.0, 3), (-2.0, 5)]
    rejected = [(-3.0, 2), (-4.0, 3), (-2.0, 1)]
    s = score_pairs(chosen, rejected)
    assert s.accuracy == pytest.approx(1.5 / 3)
    assert s.answer_logprob == pytest.approx(-8.0 / 10)


def test_batched_logprobs_equal_one_sequence_at_a_time():
    """Right padding and the mask change nothing: every pair, batched 5 at a time over mixed
    lengths, gets the log-prob of a plain unpadded forward pass computed here by hand."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge.synergy import completion_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(1, 300, (int(p),), generator=g).tolist(), torch.randint(1, 300, (int(c),), generator=g).tolist())
             for p, c in torch.randint(1, 20, (11, 2), generator=g)]
    got = completion_logprobs(model, pairs, pad_id=0, batch_size=5)
    for (prompt, completion), (lp, n) in zip(pairs, got):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = model(ids).logits[0].double().log_softmax(-1)
        want = sum(logp[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(completion))
        assert n == len(completion)
        assert lp == pytest.approx(want, abs=1e-4)


def synergy_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "synergy.py"), *map(str, args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_a_t0_merge_scores_exactly_as_its_base(tmp_path, tiny_pair):
    """t=0 returns the base model, so its scores equal the base's; parents come from the merge's
    own mergekit_config.yml, and the report is written as JSON."""
    cfg = write_config(tmp_path / "t0.yml", tiny_pair["base"], tiny_pair["other"], t=0)
    merged = tmp_path / "merged"
    assert run_merge_cli(cfg, merged, "--quiet").returncode == 0
    proc = synergy_cli(merged, "--max-samples", "40", "--json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "s.json").read_text())
    models = report["models"]
    assert [models[r]["path"] for r in ("parent 1", "parent 2")] == [str(tiny_pair["other"]), str(tiny_pair["base"])]
    assert report["pairs"] == 40 and models["merged"]["pairs"] == 40
    for name in ("accuracy", "answer_logprob"):
        assert models["merged"][name] == models["parent 2"][name]
        s = report["synergy"][name]
        assert s["best_parent"] == max(models["parent 1"][name], models["parent 2"][name])
        assert s["expected"] == pytest.approx((models["parent 1"][name] + models["parent 2"][name]) / 2)
    assert "E=mean(parents)" in proc.stdout


@pytest.mark.integration
def test_bad_input_is_one_line(tmp_path, tiny_pair):
    assert_one_line_error(synergy_cli(tmp_path / "nope"), "nope", "not a model directory")
    assert_one_line_error(synergy_cli(tiny_pair["base"]), "mergekit_config.yml", "--parents")
    assert_one_line_error(synergy_cli(tiny_pair["base"], "--parents", tiny_pair["other"], tmp_path / "gone"),
                          "gone", "not a model directory")
    assert_one_line_error(synergy_cli(tiny_pair["base"], "--parents", tiny_pair["other"], "--data", tmp_path / "x.jsonl"),
                          "--data", "x.jsonl")
    bad = tmp_path / "cols.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    assert_one_line_error(synergy_cli(tiny_pair["base"], "--parents", tiny_pair["other"], "--data", bad),
                          "--data", "chosen")
