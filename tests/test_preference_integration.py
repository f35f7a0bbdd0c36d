"""The real launcher for the preference stages, ZeRO-3 across 2 CPU ranks on the tiny model:
on a learnable set the DPO reward margin and the ORPO log-odds ratio rise, the DPO reference
is partitioned like the policy, metrics reach W&B, cached reference log-probs are reused by a
rerun, and both stages continue from an SFT output and save a model that loads and generates. Bad
preference rows are tested in-process: tests/test_preference_data.py, tests/test_matrix_train.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.support.env import SMALL_BATCH, generates, launch, offline_env, tail
from tests.support.wandb_offline import find_offline_runs, history

from core.config import REPO_ROOT

pytestmark = pytest.mark.integration

FAST = [
    *SMALL_BATCH,
    "training.learning_rate=1e-3",
    "training.warmup_steps=0",
    "training.lr_scheduler_type=constant",
    "training.per_device_train_batch_size=2",
    "stage.max_length=256",
    "stage.max_prompt_length=192",
]
BUNDLED = REPO_ROOT / "data" / "materials" / "preference.jsonl"


def log_rows(output_dir: Path):
    """Per-step log rows from the newest trainer_state.json."""
    states = sorted((output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                    key=lambda p: int(p.parent.name.split("-")[1]))
    assert states, f"no trainer_state.json under {output_dir}/checkpoints"
    return [r for r in json.loads(states[-1].read_text())["log_history"] if "loss" in r]


def rises(values, n=4):
    return sum(values[-n:]) / n > sum(values[:n]) / n


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # reference log-probs cache of this module only
    return offline_env(DOMAINFORGE_CACHE=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def learnable_set(tmp_path_factory):
    """Bundled prompts and correct answers against one evasive non-answer: clearly distinct."""
    path = tmp_path_factory.mktemp("data") / "learnable.jsonl"
    rows = [json.loads(l) for l in BUNDLED.read_text().splitlines()[:64]]
    path.write_text("".join(
        json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": "I cannot say, maybe ask someone."}) + "\n"
        for r in rows))
    return path


@pytest.fixture(scope="module")
def learnable_eval_set(tmp_path_factory):
    """8 held-out pairs of the same kind (bundled rows 64-71)."""
    path = tmp_path_factory.mktemp("data") / "learnable_eval.jsonl"
    rows = [json.loads(l) for l in BUNDLED.read_text().splitlines()[64:72]]
    path.write_text("".join(
        json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": "I cannot say, maybe ask someone."}) + "\n"
        for r in rows))
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, env):
    """A model saved by the SFT stage (2 steps of it, under the same launcher)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = launch("train.py", ["+stage=sft", f"output_dir={out}", *SMALL_BATCH, "training.max_steps=2",
                               "training.max_seq_length=256"], ranks=2, env=env)
    assert proc.returncode == 0, tail(proc)
    return out


def train(stage, out, env, *overrides, steps):
    proc = launch(
        "train.py",
        [f"+stage={stage}", f"output_dir={out}", *FAST, f"training.max_steps={steps}",
         f"training.save_steps={steps}", *overrides],
        ranks=2, env=env,
    )
    assert proc.returncode == 0, tail(proc)
    return proc


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, learnable_set, learnable_eval_set, env):
    out = tmp_path_factory.mktemp("dpo") / "run"
    proc = train("dpo", out, env, f"data.preference.path={learnable_set}", "stage.beta=0.5",
                 "logging=wandb", "logging.mode=offline", f"data.preference.eval_path={learnable_eval_set}",
                 "training.eval_steps=8", steps=16)
    return out, proc


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, learnable_set, learnable_eval_set, env):
    out = tmp_path_factory.mktemp("orpo") / "run"
    proc = train("orpo", out, env, f"data.preference.path={learnable_set}",
                 "logging=wandb", "logging.mode=offline", f"data.preference.eval_path={learnable_eval_set}",
                 "training.eval_steps=8", steps=16)
    return out, proc


def test_dpo_reward_margin_rises(dpo_run):
    rows = log_rows(dpo_run[0])
    assert len(rows) == 16
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    margins = [r["rewards/margins"] for r in rows]
    assert rises(margins) and margins[-1] > 0, margins
    assert sum(r["rewards/accuracies"] for r in rows[-4:]) / 4 > 0.5


def test_dpo_reference_is_partitioned_under_zero3(dpo_run):
    _, proc = dpo_run
    shares = re.findall(r"\[rank (\d)/2\] reference model holds (\d+) of (\d+) parameters", proc.stdout)
    assert sorted(r for r, _, _ in shares) == ["0", "1"], proc.stdout[-2000:]
    for _, local, total in shares:
        assert abs(int(local) - int(total) / 2) <= 0.01 * int(total)  # ~1/N each, not a replica
        assert int(total) > 3_000_000


def test_orpo_log_odds_ratio_rises(orpo_run):
    rows = log_rows(orpo_run[0])
    assert len(rows) == 16
    ratio = [r["log_odds_ratio"] for r in rows]
    assert rises(ratio), ratio
    assert rises([-r["nll_loss"] for r in rows])  # the SFT term falls too


@pytest.mark.parametrize("run, keys", [
    ("dpo_run", ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]),
    ("orpo_run", ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                  "log_odds_ratio", "nll_loss"]),
])
def test_preference_metrics_reach_wandb(run, keys, request):
    out, _ = request.getfixturevalue(run)
    (wandb_run,) = find_offline_runs(out)
    rows = [r for r in history(wandb_run) if "train/loss" in r]
    assert len(rows) == 16
    for key in keys:
        assert all(f"train/{key}" in r for r in rows), (key, sorted(rows[0]))
    assert rows[0]["train/preference_rows"] == 64
    assert all(r["train/tokens_per_second"] > 0 for r in rows[1:])  # input tokens are counted


@pytest.mark.parametrize("run, rising", [("dpo_run", "rewards/margins"), ("orpo_run", "log_odds_ratio")])
def test_preference_eval_metrics_reach_wandb(run, rising, request):
    """TRL's eval metrics on the 8 held-out pairs, every training.eval_steps: DPO's eval rewards
    and margins, ORPO's eval log-odds ratio; the held-out preference is learned too."""
    out, _ = request.getfixturevalue(run)
    (wandb_run,) = find_offline_runs(out)
    rows = [r for r in history(wandb_run) if "eval/loss" in r]
    assert [r["train/global_step"] for r in rows] == [8, 16]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", rising):
        assert all(f"eval/{key}" in r for r in rows), (key, sorted(rows[0]))
    assert rows[1][f"eval/{rising}"] > rows[0][f"eval/{rising}"]
    assert rows[1]["eval/loss"] < rows[0]["eval/loss"]


@pytest.mark.parametrize("run", ["dpo_run", "orpo_run"])
def test_saved_model_loads_and_generates(run, request):
    out, _ = request.getfixturevalue(run)
    assert (out / "domainforge.yaml").is_file()
    generates(out)


def test_dpo_from_an_sft_output_reuses_cached_reference_log_probs(tmp_path, saved_model, env):
    args = [f"model.path={saved_model}", "stage.precompute_ref_log_probs=true", "data.preference.max_samples=64"]
    first = train("dpo", tmp_path / "first", env, *args, steps=4)
    match = re.search(r"reference log-probs for 64 pairs computed and cached in (\S+)", first.stdout)
    assert match, first.stdout[-2000:]
    cache = Path(match.group(1))
    written = cache.stat().st_mtime_ns
    # reference == starting model: log 2 at step 0 only if the log-probs gathered from both
    # ranks landed on the right rows
    assert log_rows(tmp_path / "first")[0]["loss"] == pytest.approx(0.6931, abs=1e-4)

    rerun = train("dpo", tmp_path / "rerun", env, *args, steps=4)
    assert f"reference log-probs for 64 pairs loaded from {cache}" in rerun.stdout, rerun.stdout[-2000:]
    assert cache.stat().st_mtime_ns == written
    assert "reference model holds" not in rerun.stdout  # nothing to load: the log-probs are cached
    assert log_rows(tmp_path / "rerun")[0]["loss"] == pytest.approx(log_rows(tmp_path / "first")[0]["loss"], abs=1e-6)
    generates(tmp_path / "rerun")
