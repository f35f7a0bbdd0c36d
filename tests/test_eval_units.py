"""evaluation/: config presets, the paper-format checks, result files and the synergy arithmetic.
No model is loaded (a few seconds)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from tests.support.env import REPO, assert_one_line_error, offline_env
from tests.support.models import EVAL_SHAPE, tiny_llama

from core.config import CONF_DIR
from core.errors import UserError
from evaluation.eval_set import eval_set_task_yamls, load_eval_set
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

    from evaluation.eval_set import TASK_DIR

    cfg = compose_eval_config(["model_dir=m", f"eval={preset}"])
    known = TaskManager(include_defaults=False, include_path=str(TASK_DIR)).all_tasks
    assert cfg.tasks and set(cfg.tasks) <= set(known)


@pytest.mark.parametrize("overrides, needle", [
    (["model_dir=m", "batch_size=0"], "batch_size=0"),
    (["model_dir=m", "backend=onnx"], "backend=onnx"),
    (["model_dir=m", "limti=3"], "limti"),
    (["model_dir=m", "tasks=[]"], "no tasks"),
    (["tasks=[x]"], "model_dir is not set"),
    (["model_dir=m", "data_parallel=2"], "data_parallel is for backend=vllm"),
    (["model_dir=m", "tensor_parallel=2"], "tensor_parallel is for backend=vllm"),
    (["model_dir=m", "backend=vllm", "parallelize=true"], "parallelize is for backend=hf"),
    (["model_dir=m", "max_length=0"], "max_length=0"),
    (["model_dir=m", "gpu_memory_gb=-1"], "gpu_memory_gb=-1"),
])
def test_bad_settings_are_one_line(overrides, needle):
    with pytest.raises(UserError, match=needle) as err:
        compose_eval_config(overrides)
    assert "\n" not in str(err.value), str(err.value)


def test_batch_size_takes_auto_and_model_args_take_new_keys():
    cfg = compose_eval_config(["model_dir=m", "batch_size=auto", "+model_args.gguf_file=x.gguf"])
    assert cfg.batch_size == "auto" and cfg.model_args.gguf_file == "x.gguf"


# ---------------------------------------------------------------------------------------------
# where the model goes: one copy per process, split over the GPUs, or vLLM's parallelism
# ---------------------------------------------------------------------------------------------
GB = 10**9
H100 = 80 * GB


def layout(*overrides, weights=None, gpus=8, launched=8, max_length=4096):
    from evaluation.parallel import Launched, plan_layout

    cfg = compose_eval_config(["model_dir=m", *overrides])
    return plan_layout(cfg, weights, max_length, gpus, H100, Launched(0, launched))


def test_a_model_that_fits_one_gpu_runs_one_copy_per_process():
    # Llama-3.1-8B in bf16: 16 GB of an 80 GB GPU
    placed = layout(weights=16 * GB)
    assert placed.processes == 8 and placed.model_args == {"parallelize": False, "max_length": 4096}


def test_a_model_too_large_for_one_gpu_is_split_by_one_process():
    # Llama-3.1-70B in bf16: 141 GB, more than 80% of an 80 GB GPU
    placed = layout(weights=141 * GB)
    assert placed.processes == 1 and placed.model_args["parallelize"] is True
    assert layout(weights=63 * GB).processes == 8 and layout(weights=65 * GB).processes == 1  # the 80% line


def test_an_explicit_parallelize_overrides_the_size_rule():
    assert layout("parallelize=true", weights=16 * GB).processes == 1
    assert layout("parallelize=false", weights=141 * GB).model_args["parallelize"] is False
    assert layout(weights=141 * GB, gpus=1, launched=1).model_args["parallelize"] is False  # one GPU: nothing to split
    assert layout(weights=None).processes == 8  # a GGUF file (size unknown): a copy per process


def test_vllm_gets_tensor_and_data_parallel_sizes_in_one_process():
    from evaluation.run import model_arguments

    assert layout("backend=vllm", weights=16 * GB).model_args == {
        "tensor_parallel_size": 1, "data_parallel_size": 8, "max_length": 4096}
    # 141 GB needs 3 GPUs of 80 GB at 80%: a power of two, 4, and two replicas on 8 GPUs
    big = layout("backend=vllm", weights=141 * GB)
    assert big.processes == 1 and (big.model_args["tensor_parallel_size"], big.model_args["data_parallel_size"]) == (4, 2)
    chosen = layout("backend=vllm", "tensor_parallel=2", "data_parallel=3", weights=16 * GB)
    args = model_arguments(compose_eval_config(["model_dir=m", "backend=vllm", "+model_args.gpu_memory_utilization=0.8"]),
                           REPO, "bfloat16", chosen)
    assert ",".join(f"{k}={v}" for k, v in args.items() if k != "pretrained") == (
        "dtype=bfloat16,tensor_parallel_size=2,data_parallel_size=3,max_length=4096,gpu_memory_utilization=0.8")
    own = compose_eval_config(["model_dir=m", "backend=vllm", "+model_args.max_model_len=2048"])
    assert "max_length" not in model_arguments(own, REPO, "bfloat16", chosen)  # lm-eval takes one of the two


class ModelLoaded(Exception):
    """Raised by the stand-in for lm-eval's model class: what it was handed, and no model loaded."""


def handed_to_lm_eval(tmp_path, monkeypatch, overrides, gpus=4, world=1):
    """evaluate() on a tiny model directory up to lm-eval's model class, on `gpus` stand-in 80 GB
    GPUs with `world` launched processes (this one rank 0): (its output, the backend name, the
    model arguments, the extra arguments) lm-eval's registry was asked for."""
    import lm_eval.api.registry

    from evaluation import run

    model = tiny_llama(tmp_path / "model", **EVAL_SHAPE)  # max_position_embeddings=512
    handed = []

    class StandInModel:
        @classmethod
        def create_from_arg_obj(cls, args, extra):
            handed.extend([dict(args), dict(extra)])
            raise ModelLoaded()

    def get_model(name):
        handed.append(name)
        return StandInModel

    monkeypatch.setattr(lm_eval.api.registry, "get_model", get_model)
    monkeypatch.setattr(run, "visible_gpus", lambda: (gpus, H100))
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world)}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_eval_config([f"model_dir={model}", "tasks=[materials_cpt_mc_loglik]", "device=cuda",
                               "dtype=bfloat16", f"output_dir={tmp_path / 'out'}", *overrides])
    with pytest.raises(ModelLoaded):
        run.evaluate(cfg)
    return (model, *handed)


def test_parallelize_hands_lm_eval_one_hf_model_split_over_every_gpu(tmp_path, monkeypatch, capsys):
    """parallelize=true under a launcher of 4 processes (one per GPU): rank 0 alone loads one hf
    model with parallelize=True, its dtype and the bounded max_length."""
    model, backend, args, extra = handed_to_lm_eval(tmp_path, monkeypatch, ["parallelize=true"], world=4)
    assert backend == "hf"
    assert args == {"pretrained": str(model.resolve()), "dtype": "bfloat16", "parallelize": True, "max_length": 512}
    assert extra == {"batch_size": 16, "device": "cuda"}
    assert "evaluation layout: one process, the model split over 4 GPU(s)" in capsys.readouterr().out
    assert "WORLD_SIZE" not in os.environ  # accelerate sees one process and waits for no one


def test_vllm_hands_lm_eval_its_tensor_and_data_parallel_sizes(tmp_path, monkeypatch, capsys):
    """backend=vllm, tensor_parallel=2 on 4 GPUs: one vllm model, 2 replicas of 2 GPUs each,
    model_args passed on (vllm itself is a stand-in package: only its presence is checked here)."""
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model, backend, args, extra = handed_to_lm_eval(
        tmp_path, monkeypatch, ["backend=vllm", "tensor_parallel=2", "+model_args.gpu_memory_utilization=0.8"])
    assert backend == "vllm"
    assert args == {"pretrained": str(model.resolve()), "dtype": "bfloat16", "tensor_parallel_size": 2,
                    "data_parallel_size": 2, "max_length": 512, "gpu_memory_utilization": 0.8}
    assert extra == {"batch_size": 16, "device": "cuda"}
    assert "evaluation layout: vllm: 2 replica(s) x 2 GPU(s)" in capsys.readouterr().out


def test_vllm_not_installed_is_refused_before_any_task_is_built(tmp_path, monkeypatch):
    import importlib.util

    from evaluation import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    monkeypatch.setattr(run, "build_tasks", lambda *a: pytest.fail("tasks were built"))
    model = tiny_llama(tmp_path / "model", **EVAL_SHAPE)
    cfg = compose_eval_config([f"model_dir={model}", "tasks=[materials_cpt_mc_loglik]", "backend=vllm"])
    with pytest.raises(UserError, match=r"^backend=vllm but vllm is not installed: pip install vllm \(GPUs\), "
                                        r"or set backend=hf$"):
        run.evaluate(cfg)


@pytest.mark.parametrize("override, passed", [
    ("parallelize=true", ["parallelize=true"]),
    ("backend=vllm", ["backend=vllm"]),
])
def test_a_pipelines_split_or_vllm_evaluation_gets_every_gpu_of_one_node(tmp_path, monkeypatch, override, passed):
    """The job planned for an evaluation step with parallelize=true or backend=vllm: SLURM asks
    for one node with all its GPUs and a task per GPU (evaluation/parallel.py leaves rank 0
    working); locally, one process per visible GPU. Both pass the setting and skip_scored=true on."""
    import re
    import shlex

    from orchestration import local
    from orchestration.config import compose_pipeline_job
    from orchestration.job_scripts import render_step
    from orchestration.planner import plan_pipeline

    common = ["pipeline=tiny", f"root={tmp_path}", "pipeline.eval.tasks=[materials_cpt_mc_loglik]",
              f"pipeline.eval.overrides=['{override}']"]
    cfg = compose_pipeline_job([*common, "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8"])
    plan = plan_pipeline(cfg)
    step = next(s for s in plan.steps if s.kind == "eval")
    script = render_step(plan, step, cfg.cluster, None)[1]
    assert {"--nodes=1", "--ntasks=8", "--ntasks-per-node=8", "--gpus-per-node=8"} <= set(
        re.findall(r"^#SBATCH (\S+)", script, flags=re.M))
    command = script[script.index("launch/eval.py"):].split()
    assert {*passed, "skip_scored=true", f"output_dir={step.output_dir}"} <= set(command)

    cfg = compose_pipeline_job([*common, "cluster.gpus_per_node=8"])
    plan = plan_pipeline(cfg)
    step = next(s for s in plan.steps if s.kind == "eval")
    monkeypatch.setattr(local, "gpu_count", lambda: 4)
    command = local.local_command(plan, step, cfg.cluster)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert {*passed, "skip_scored=true"} <= set(command[5:]), shlex.join(command)


def test_max_length_bounds_a_131k_context_and_never_exceeds_the_models(tmp_path):
    from evaluation.parallel import Launched
    from evaluation.run import layout_for, model_arguments

    def args_for(context, *overrides):
        model = tmp_path / f"ctx-{context}"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": context}))
        cfg = compose_eval_config([f"model_dir={model}", "tasks=[x]", *overrides])
        return model_arguments(cfg, model, "float32", layout_for(cfg, model, 10**6, Launched(0, 1)))

    assert args_for(131072)["max_length"] == 4096  # Llama-3.1's config: auto batch sizing probes at 4096
    assert args_for(131072, "max_length=8192")["max_length"] == 8192
    assert args_for(512)["max_length"] == 512  # never past the model's own positions
    assert "max_length" not in args_for(131072, "max_length=null")  # lm-eval's choice, the full context
    assert args_for(131072, "+model_args.max_length=1024")["max_length"] == 1024  # model_args win


def test_launched_ranks_a_single_process_layout_does_not_need_exit_before_loading(tmp_path, monkeypatch):
    """parallelize=true under a one-per-GPU launcher: rank 1 returns at once and writes nothing;
    rank 0 drops the group's variables and goes on alone."""
    import numpy as np
    from safetensors.numpy import save_file

    from evaluation import run

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(model / "model.safetensors"))
    cfg = compose_eval_config([f"model_dir={model}", "tasks=[x]", "parallelize=true", f"output_dir={tmp_path / 'out'}"])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.evaluate(cfg) == [] and not (tmp_path / "out").exists()

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(run, "task_manager_for", lambda *a: (_ for _ in ()).throw(RuntimeError("went on")))
    with pytest.raises(RuntimeError, match="went on"):
        run.evaluate(cfg)
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE"} & set(os.environ)


def test_samples_are_written_in_document_order():
    from evaluation.run import in_document_order

    gathered = {"t": [{"doc_id": i, "x": i * 10} for i in (0, 2, 4, 1, 3)]}  # two ranks, rank after rank
    assert [row["x"] for row in in_document_order(gathered)["t"]] == [0, 10, 20, 30, 40]


# ---------------------------------------------------------------------------------------------
# the paper's format
# ---------------------------------------------------------------------------------------------
def test_mc_and_tf_rows_get_labels_and_letters(tmp_path):
    mc = load_eval_set(write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Q?", "options": ["w", "x", "y"], "answer": "c", "extra": 1}]))
    assert mc[0]["label"] == 2 and mc[0]["answer"] == "C" and mc[0]["lettered"] == "A. w\nB. x\nC. y"
    assert mc[0]["extra"] == 1
    tf = load_eval_set(write_jsonl(tmp_path / "tf.jsonl", [
        {"statement": "S.", "answer": True}, {"statement": "T.", "answer": "false"}]))
    assert [(r["answer"], r["label"]) for r in tf] == [("True", 0), ("False", 1)]
    tasks = eval_set_task_yamls(str(tmp_path / "tf.jsonl"), "tf")
    assert sorted(tasks) == ["tf_gen", "tf_loglik"] and "_tf_gen_template_yaml" in tasks["tf_gen"]


@pytest.mark.parametrize("rows, needle", [
    ([], "has no rows"),
    ([{"question": "Q?", "options": ["a", "b"], "answer": "C"}], "not one of the option letters A, B"),
    ([{"question": "Q?", "answer": "A"}], "missing field 'options'"),
    ([{"prompt": "Q?", "answer": "A"}], "neither MC nor TF"),
    ([{"statement": "S.", "answer": "maybe"}], "not True or False"),
    ([{"statement": "S.", "answer": "True"}, {"question": "Q?", "options": ["a", "b"], "answer": "A"}],
     "mixes MC and TF"),
    ([{"question": "Q?", "options": "a, b", "answer": "A"}], "'options' must be a list"),
])
def test_bad_eval_set_rows_name_file_row_and_field(tmp_path, rows, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=needle) as err:
        load_eval_set(path)
    assert "bad.jsonl" in str(err.value)


def test_bundled_eval_sets_pass_the_checks():
    for name in ("materials_sft_mc", "materials_sft_tf", "materials_cpt_mc", "materials_cpt_tf", "general_mc"):
        assert len(load_eval_set(f"${{repo:data/eval_sets/{name}.jsonl}}")) >= 300


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
                          env=offline_env(), capture_output=True, text=True, timeout=120)


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
