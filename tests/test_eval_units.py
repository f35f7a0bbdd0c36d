"""evaluation/: config presets, the paper-format checks, result files and the synergy arithmetic.
No model is loaded (a few seconds)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, assert_one_line_error
from conftest import test_env as child_env

from core.config import CONF_DIR
from core.errors import UserError
from evaluation.benchmark import benchmark_task_yamls, load_benchmark
from evaluation.config import compose_eval_config
from evaluation.results import load_results, wilson_interval
from evaluation.synergy import compare, parents_of, synergy_table


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")))
def test_every_eval_preset_composes_and_names_known_tasks(preset):
    from lm_eval.tasks import TaskManager

    from evaluation.benchmark import TASK_DIR

    cfg = compose_eval_config(["model_dir=m", f"eval={preset}"])
    known = TaskManager(include_defaults=False, include_path=str(TASK_DIR)).all_tasks
    assert cfg.tasks and set(cfg.tasks) <= set(known)


@pytest.mark.parametrize("overrides, needle", [
    (["model_dir=m", "batch_size=0"], "batch_size=0"),
    (["model_dir=m", "backend=onnx"], "backend=onnx"),
    (["model_dir=m", "limti=3"], "limti"),
    (["model_dir=m", "tasks=[]"], "no tasks"),
    (["tasks=[x]"], "model_dir is not set"),
    (["model_dir=m", "data_parallel=2"], "accelerate launch"),
])
def test_bad_settings_are_one_line(overrides, needle):
    with pytest.raises(UserError, match=needle):
        compose_eval_config(overrides)


def test_batch_size_takes_auto_and_model_args_take_new_keys():
    cfg = compose_eval_config(["model_dir=m", "batch_size=auto", "+model_args.gguf_file=x.gguf"])
    assert cfg.batch_size == "auto" and cfg.model_args.gguf_file == "x.gguf"


# ---------------------------------------------------------------------------------------------
# the paper's format
# ---------------------------------------------------------------------------------------------
def test_mc_and_tf_rows_get_labels_and_letters(tmp_path):
    mc = load_benchmark(write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Q?", "options": ["w", "x", "y"], "answer": "c", "extra": 1}]))
    assert mc[0]["label"] == 2 and mc[0]["answer"] == "C" and mc[0]["lettered"] == "A. w\nB. x\nC. y"
    assert mc[0]["extra"] == 1
    tf = load_benchmark(write_jsonl(tmp_path / "tf.jsonl", [
        {"statement": "S.", "answer": True}, {"statement": "T.", "answer": "false"}]))
    assert [(r["answer"], r["label"]) for r in tf] == [("True", 0), ("False", 1)]
    tasks = benchmark_task_yamls(str(tmp_path / "tf.jsonl"), "tf")
    assert sorted(tasks) == ["tf_gen", "tf_loglik"] and "_tf_gen_template_yaml" in tasks["tf_gen"]


@pytest.mark.parametrize("rows, needle", [
    ([], "is empty"),
    ([{"question": "Q?", "options": ["a", "b"], "answer": "C"}], "not one of the option letters A, B"),
    ([{"question": "Q?", "answer": "A"}], "missing field 'options'"),
    ([{"prompt": "Q?", "answer": "A"}], "neither MC nor TF"),
    ([{"statement": "S.", "answer": "maybe"}], "not True or False"),
    ([{"statement": "S.", "answer": "True"}, {"question": "Q?", "options": ["a", "b"], "answer": "A"}],
     "mixes MC and TF"),
    ([{"question": "Q?", "options": "a, b", "answer": "A"}], "'options' must be a list"),
])
def test_bad_benchmark_rows_name_file_row_and_field(tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=needle) as err:
        load_benchmark(path)
    assert "bad.jsonl" in str(err.value)


def test_bundled_benchmarks_pass_the_checks():
    for name in ("materials_sft_mc", "materials_sft_tf", "materials_cpt_mc", "materials_cpt_tf", "general_mc"):
        assert len(load_benchmark(f"${{repo:data/benchmarks/{name}.jsonl}}")) >= 300


# ---------------------------------------------------------------------------------------------
# result files and intervals
# ---------------------------------------------------------------------------------------------
def test_wilson_interval():
    lo, hi = wilson_interval(0.5, 400)
    assert (round(lo, 3), round(hi, 3)) == (0.451, 0.549)  # ±4.9 points at n=400
    assert wilson_interval(1.0, 8)[1] == 1.0 and wilson_interval(0.0, 8)[0] == 0.0


def fake_result(folder, task, n=400, **metrics):
    """A result file as launch/eval.py writes it, reduced to what the readers use."""
    results = {"alias": task}
    for key, (value, stderr) in metrics.items():
        metric, _, filt = key.partition("__")
        results[f"{metric},{filt or 'none'}"] = value
        results[f"{metric}_stderr,{filt or 'none'}"] = stderr
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "eval").mkdir(exist_ok=True)
    (folder / "eval" / f"{task}.json").write_text(json.dumps({"task": task, "n": n, "results": results}))


def test_load_results_reads_every_task(tmp_path):
    fake_result(tmp_path / "m", "t_loglik", acc=(0.6, 0.02), acc_norm=(0.55, 0.02))
    fake_result(tmp_path / "m", "t_gen", exact_match__letter=(0.3, 0.02))
    (tmp_path / "m" / "eval" / "t_gen.json.tmp").write_text("{half")  # an unfinished write: ignored
    assert load_results(tmp_path / "m") == {
        "t_loglik": {"acc": (0.6, 0.02, 400), "acc_norm": (0.55, 0.02, 400)},
        "t_gen": {"exact_match": (0.3, 0.02, 400)},
    }


# ---------------------------------------------------------------------------------------------
# synergy
# ---------------------------------------------------------------------------------------------
def test_synergy_arithmetic_and_verdicts():
    c = compare([(0.60, 0.01, 400), (0.70, 0.01, 400)], (0.76, 0.01, 400))
    assert c["E"] == pytest.approx(0.65) and c["max"] == 0.70
    assert c["merged-E"] == pytest.approx(0.11) and c["merged-max"] == pytest.approx(0.06)
    assert c["margin_max"] == pytest.approx(1.96 * math.sqrt(2) * 0.01, rel=1e-3)
    assert c["verdict"] == "beats both parents"
    verdict = lambda merged: compare([(0.60, 0.01, 400), (0.70, 0.01, 400)], (merged, 0.01, 400))["verdict"]
    assert verdict(0.71) == "above the best parent, within noise"
    assert verdict(0.68) == "beats the parents' mean, not the best parent"
    assert verdict(0.65) == "at the parents' mean, within noise"
    assert verdict(0.55) == "below the parents' mean"
    # lower-is-better metrics flip the sign
    assert compare([(10.0, 0.1, 9), (12.0, 0.1, 9)], (9.0, 0.1, 9), higher_is_better=False)["verdict"] == \
        "beats both parents"


def test_synergy_table_covers_shared_tasks_and_metrics():
    p1 = {"a": {"acc": (0.5, 0.02, 400), "acc_norm": (0.4, 0.02, 400)}, "only_p1": {"acc": (0.1, 0.0, 4)}}
    p2 = {"a": {"acc": (0.7, 0.02, 400)}}
    merged = {"a": {"acc": (0.8, 0.02, 400), "acc_norm": (0.9, 0.02, 400)}}
    table = synergy_table([p1, p2], merged)
    assert list(table) == ["a"] and list(table["a"]) == ["acc"]
    with pytest.raises(UserError, match="no result for task 'b' from parent 1"):
        synergy_table([p1, p2], {**merged, "b": {"acc": (0.1, 0.1, 4)}}, ["a", "b"])


def test_parents_come_from_the_merge_config(tmp_path):
    (tmp_path / "mergekit_config.yml").write_text(
        "merge_method: slerp\nbase_model: /m/base\nmodels:\n  - model: /m/tuned\n  - model: /m/base\n")
    assert parents_of(tmp_path) == ["/m/tuned", "/m/base"]
    (tmp_path / "mergekit_config.yml").write_text(
        "merge_method: slerp\nslices:\n  - sources:\n    - {model: /m/a, layer_range: [0, 2]}\n"
        "    - {model: /m/b, layer_range: [0, 2]}\n")
    assert parents_of(tmp_path) == ["/m/a", "/m/b"]


def synergy_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "launch" / "synergy.py"), *map(str, args)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=120)


def test_synergy_cli_on_hand_made_results(tmp_path):
    """Parents from the merge's mergekit_config.yml, the table printed, the JSON written; no
    evaluation runs because every model has its results."""
    for name, acc, em in (("p1", 0.60, 0.30), ("p2", 0.70, 0.20), ("merged", 0.80, 0.24)):
        fake_result(tmp_path / name, "x_loglik", acc=(acc, 0.01))
        fake_result(tmp_path / name, "x_gen", exact_match__letter=(em, 0.01))
    (tmp_path / "merged" / "mergekit_config.yml").write_text(
        f"merge_method: slerp\nbase_model: {tmp_path / 'p2'}\nmodels:\n  - model: {tmp_path / 'p1'}\n"
        f"  - model: {tmp_path / 'p2'}\n")
    proc = synergy_cli(tmp_path / "merged", "--json", tmp_path / "s.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["parents"] == [str(tmp_path / "p1"), str(tmp_path / "p2")]
    acc = report["tasks"]["x_loglik"]["acc"]
    assert (acc["E"], acc["max"], acc["verdict"]) == (pytest.approx(0.65), 0.70, "beats both parents")
    em = report["tasks"]["x_gen"]["exact_match"]
    assert em["verdict"] == "at the parents' mean, within noise" and em["merged-max"] == pytest.approx(-0.06)
    assert "beats both parents" in proc.stdout and "merged-E" in proc.stdout

    assert_one_line_error(synergy_cli(tmp_path / "nope"), "nope", "not a model directory")
    assert_one_line_error(synergy_cli(tmp_path / "p1"), "mergekit_config.yml", "--parents")
    assert_one_line_error(synergy_cli(tmp_path / "merged", "--tasks", "x_gen", "--parents", tmp_path / "p1",
                                      tmp_path / "gone"), "gone", "not a model directory")
