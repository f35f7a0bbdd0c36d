"""Every way a user can get `launch/eval.py` wrong, as one table: (arguments, the one `error:`
line's substrings). Each case runs the real command and asserts exit 2, no traceback and no
result written (an eval/<task>.json marks a finished evaluation). None loads a model: the
model directory is a config.json and one small safetensors shard, which is all the checks read.

    python -m pytest -q tests/test_matrix_eval.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.support.env import assert_one_line_error, launch

pytestmark = pytest.mark.integration

TASK = "tasks=[general_mc_loglik]"


def model_dir(tmp: Path) -> Path:
    """A directory that passes the model-directory checks (config.json, a valid shard)."""
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp / "model"
    d.mkdir()
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def ok(*extra):
    return lambda tmp: [str(model_dir(tmp)), *extra]


def missing_dir(tmp):
    return [str(tmp / "nope"), TASK]


def a_file(tmp):
    (tmp / "weights.bin").write_text("x")
    return [str(tmp / "weights.bin"), TASK]


def half_written(tmp):
    """A training run killed before it published: shards in .final-tmp, no config.json."""
    d = tmp / "run"
    (d / ".final-tmp").mkdir(parents=True)
    (d / ".final-tmp" / "model.safetensors").write_bytes(b"\0" * 64)
    return [str(d), TASK]


def truncated_shard(tmp):
    d = model_dir(tmp)
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-20])
    return [str(d), TASK]


def garbage_header(tmp):
    d = model_dir(tmp)
    (d / "model.safetensors").write_bytes(b"\xff" * 200)
    return [str(d), TASK]


def index_names_a_missing_shard(tmp):
    d = model_dir(tmp)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}}))
    return [str(d), TASK]


def include_path_a_file(tmp):
    (tmp / "tasks.yaml").write_text("task: x\n")
    return [str(model_dir(tmp)), TASK, f"include_path=[{tmp / 'tasks.yaml'}]"]


def eval_set_missing(tmp):
    return [str(model_dir(tmp)), "tasks=[]", f"eval_sets=[{tmp / 'mine.jsonl'}]"]


def eval_set_bad_letter(tmp):
    f = tmp / "mine.jsonl"
    f.write_text(json.dumps({"question": "Q?", "options": ["a", "b", "c", "d"], "answer": "F"}) + "\n")
    return [str(model_dir(tmp)), "tasks=[]", f"eval_sets=[{f}]"]


def eval_set_wrong_columns(tmp):
    f = tmp / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "Q?", "label": 1}) + "\n")
    return [str(model_dir(tmp)), "tasks=[]", f"eval_sets=[{f}]"]


def output_dir_a_file(tmp):
    (tmp / "results").write_text("x")
    return [str(model_dir(tmp)), TASK, f"output_dir={tmp / 'results'}"]


def gguf_missing(tmp):
    return [str(model_dir(tmp)), TASK, "+model_args.gguf_file=model.Q4.gguf"]


# (id, how to make the arguments, needles)
CASES = [
    ("no-arguments", lambda tmp: [], ["model_dir is not set", "launch/eval.py MODEL_DIR"]),
    ("missing-dir", missing_dir, ["nope", "is not a model directory (no config.json)"]),
    ("a-file", a_file, ["weights.bin", "is not a model directory"]),
    ("half-written-run", half_written, ["run is not a model directory (no config.json)"]),
    ("truncated-shard", truncated_shard, ["model.safetensors", "re-"]),
    ("garbage-header", garbage_header, ["model.safetensors: header length", "corrupt or truncated"]),
    ("index-missing-shard", index_names_a_missing_shard, ["model-00002-of-00002.safetensors", "missing"]),
    ("no-tasks", ok("tasks=[]"), ["no tasks", "eval=<name>"]),
    ("unknown-task", ok("tasks=[materials_mc_logliks]"), ["unknown task 'materials_mc_logliks'", "include_path"]),
    ("typo-key", ok(TASK, "limt=5"), ["unknown config key 'limt'", "evaluation/config.py"]),
    ("unknown-preset", ok("eval=domian"), ["unknown eval 'domian'", "domain"]),
    ("limit-zero", ok(TASK, "limit=0"), ["limit=0.0: must be > 0"]),
    ("limit-negative", ok(TASK, "limit=-5"), ["limit=-5.0: must be > 0"]),
    ("batch-zero", ok(TASK, "batch_size=0"), ["batch_size=0: must be a positive integer or auto"]),
    ("batch-word", ok(TASK, "batch_size=big"), ["batch_size=big: must be a positive integer or auto"]),
    ("dtype", ok(TASK, "dtype=fp8"), ["dtype=fp8: must be one of auto, float32, bfloat16, float16"]),
    ("backend", ok(TASK, "backend=onnx"), ["backend=onnx: must be one of hf, vllm"]),
    ("fewshot-negative", ok(TASK, "num_fewshot=-1"), ["num_fewshot=-1: must be >= 0"]),
    ("data-parallel-zero", ok(TASK, "backend=vllm", "data_parallel=0"), ["data_parallel=0: must be >= 1"]),
    ("tensor-parallel-zero", ok(TASK, "backend=vllm", "tensor_parallel=0"), ["tensor_parallel=0: must be >= 1"]),
    ("data-parallel-hf", ok(TASK, "data_parallel=2"), ["data_parallel is for backend=vllm", "torchrun --nproc_per_node"]),
    ("vllm-not-installed", ok(TASK, "backend=vllm"), ["backend=vllm but vllm is not installed", "pip install vllm"]),
    ("seed-negative", ok(TASK, "seed=-3"), ["seed=-3: must be >= 0"]),
    ("output-dir-a-file", output_dir_a_file, ["output_dir=", "is an existing file"]),
    ("include-path-a-file", include_path_a_file, ["include_path", "tasks.yaml is not a folder"]),
    ("eval-set-missing", eval_set_missing, ["mine.jsonl not found"]),
    ("eval-set-bad-letter", eval_set_bad_letter, ["mine.jsonl", "not one of the option"]),
    ("eval-set-wrong-columns", eval_set_wrong_columns, ["mine.jsonl line 1", "neither MC nor TF"]),
    ("gguf-missing", gguf_missing, ["model_args.gguf_file", "model.Q4.gguf not found"]),
]


@pytest.mark.parametrize("argv_of,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_eval_matrix(tmp_path, argv_of, needles):
    argv = argv_of(tmp_path)
    proc = launch("eval.py", argv, timeout=120)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2
    assert not list(tmp_path.rglob("eval/*.json")) and not list(tmp_path.rglob("results/*.json"))
