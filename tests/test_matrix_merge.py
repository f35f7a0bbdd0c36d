"""Every way a user can get `launch/merge.py` wrong, as one table: (arguments, the one `error:`
line's substrings). Each case runs the real command (it starts in ~0.5 s: no torch), and
asserts exit 2, no traceback, no output directory, and no partial directory unless the problem
shows only mid-merge (then complete shards stay for the rerun, as designed). Faults (a full
disk, a second merge on the same output) follow the table.

    python -m pytest -q tests/test_matrix_merge.py
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from tests.support.env import REPO, assert_one_line_error, tmpfs
from tests.support.merge import SHARD, run_merge_cli, write_config
from tests.support.models import shard_bytes, tiny_llama

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------
# broken inputs the cases point at
# ---------------------------------------------------------------------------------------------
def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def truncated(pair, d):
    bad = copy_model(pair["other"], d / "bad")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return bad


def corrupt_header(pair, d):
    bad = copy_model(pair["other"], d / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard.write_bytes(bytes(data))
    return bad


def missing_tensor(pair, d):
    from safetensors.torch import load_file, save_file

    bad = copy_model(pair["other"], d / "bad")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.2.mlp.up_proj.weight"
    shard = bad / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return bad


def patch_element(model, dst, name, *values):
    """A copy of `model` whose tensor `name` starts with `values`."""
    import torch
    from safetensors.torch import load_file, save_file

    out = copy_model(model, dst)
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name].view(-1)[: len(values)] = torch.tensor(values)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


def no_safetensors(pair, d):
    (d / "empty").mkdir()
    (d / "empty" / "pytorch_model.bin").write_bytes(b"x")
    return d / "empty"


BIG = "model.layers.1.mlp.down_proj.weight"


def recipe(d, pair, other=None, base=None, **kw):
    return write_config(d / "m.yml", base or pair["base"], other or pair["other"], **kw)


def a_file(d):
    (d / "a_file").write_text("x")
    return d / "a_file"


def foreign_out(d):
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")
    return d / "out"


# (id, argv builder (d, pair) -> [args], needles, midway)
OUT = "{out}"
CASES = [
    # inputs
    ("model-missing", lambda d, p: [recipe(d, p, other=d / "nope"), OUT],
     ["does not exist", "safetensors"], False),
    ("model-without-safetensors", lambda d, p: [recipe(d, p, other=no_safetensors(p, d)), OUT],
     ["holds no .safetensors files", "safe_serialization=True"], False),
    ("model-is-a-file", lambda d, p: [recipe(d, p, other=a_file(d)), OUT], ["is a file, not a model directory"], False),
    ("shard-truncated", lambda d, p: [recipe(d, p, other=truncated(p, d)), OUT], ["bad/model-", "truncated",
                                                                                 "re-download"], False),
    ("shard-header-corrupt", lambda d, p: [recipe(d, p, other=corrupt_header(p, d)), OUT],
     ["bad/model-", "corrupt"], False),
    ("tensor-missing", lambda d, p: [recipe(d, p, other=missing_tensor(p, d)), OUT],
     ["model.layers.2.mlp.up_proj.weight", "share one architecture"], False),
    ("input-inf", lambda d, p: [recipe(d, p, other=patch_element(p["other"], d / "bad", BIG, float("inf"))), OUT],
     [BIG, "inf/nan"], True),
    ("input-nan", lambda d, p: [recipe(d, p, other=patch_element(p["other"], d / "bad", BIG, float("nan"))), OUT],
     [BIG, "inf/nan"], True),
    # ~orthogonal [B, B, ...] and [B, -B, ...]: SLERP at t=0.5 overflows float32 from finite inputs
    ("combined-overflow", lambda d, p: [recipe(d, p, base=patch_element(p["base"], d / "b", BIG, 3.3e38, 3.3e38),
                                               other=patch_element(p["other"], d / "o", BIG, 3.3e38, -3.3e38),
                                               t=0.5), OUT], [BIG, "inf/nan"], True),
    ("shape-mismatch", lambda d, p: [recipe(d, p, other=tiny_llama(d / "wide", 7, intermediate=160)), OUT],
     ["shape mismatch", "[32, 128]", "[32, 160]", "one architecture"], False),
    # recipe
    ("layer-range", lambda d, p: [recipe(d, p, layers=40), OUT], ["layer_range [0, 40]", "has 4 layers"], False),
    ("t-above-1", lambda d, p: [recipe(d, p, t=[{"filter": "mlp", "value": [0, 1.5]}, {"value": 0.5}]), OUT],
     ["parameters.t", "1.5", "outside [0, 1]"], False),
    ("unknown-method", lambda d, p: [recipe(d, p, merge_method="tie"), OUT],
     ["unknown merge_method 'tie'", "slerp", "linear"], False),
    ("method-parameter", lambda d, p: [recipe(d, p, merge_method="ties", parameters={"t": 0.5}), OUT],
     ["parameters.t is not a parameter of ties", "density"], False),
    ("density-above-1", lambda d, p: [recipe(d, p, merge_method="ties", parameters={"weight": 1, "density": 1.5}), OUT],
     ["parameters.density has 1.5, outside (0, 1]"], False),
    ("base-model-missing", lambda d, p: [recipe(d, p, merge_method="task_arithmetic", base_model=None,
                                                parameters={"weight": 1}), OUT],
     ["task_arithmetic needs base_model"], False),
    ("model-stock-two", lambda d, p: [recipe(d, p, merge_method="model_stock", parameters={}), OUT],
     ["model_stock needs at least 3 models"], False),
    ("negative-weight", lambda d, p: [recipe(d, p, merge_method="ties", parameters={"weight": [0.5, -0.2]}), OUT],
     ["weight has -0.2", "ties does not take negative weights"], False),
    ("config-missing", lambda d, p: [d / "nope.yml", OUT], ["nope.yml", "does not exist"], False),
    ("config-bad-yaml", lambda d, p: [(d / "bad.yml").write_text("slices: [\n") and d / "bad.yml", OUT],
     ["not valid YAML", "line"], False),
    # options
    ("shard-size", lambda d, p: [recipe(d, p), OUT, "--shard-size", "lots"], ["shard size 'lots'"], False),
    ("workers-zero", lambda d, p: [recipe(d, p), OUT, "--workers", "0"], ["workers=0: must be >= 1"], False),
    ("num-workers-zero", lambda d, p: [recipe(d, p), OUT, "--num-workers", "0", "--worker-rank", "0"],
     ["num_workers=0: must be >= 1"], False),
    ("worker-rank-negative", lambda d, p: [recipe(d, p), OUT, "--num-workers", "2", "--worker-rank", "-1"],
     ["worker_rank=-1: must be >= 0"], False),
    ("worker-rank-outside", lambda d, p: [recipe(d, p), OUT, "--num-workers", "2", "--worker-rank", "5"],
     ["worker rank 5", "W-1"], False),
    ("rank-without-world", lambda d, p: [recipe(d, p), OUT, "--worker-rank", "1"], ["--num-workers W"], False),
    ("wait-timeout", lambda d, p: [recipe(d, p), OUT, "--wait-timeout", "0"], ["wait_timeout=0.0: must be > 0"], False),
    ("chunk-elements", lambda d, p: [recipe(d, p), OUT, "--chunk-elements", "0"],
     ["chunk_elements=0: must be >= 1"], False),
    ("flag-typo", lambda d, p: [recipe(d, p), OUT, "--bogus"], ["unrecognized arguments", "usage"], False),
    ("flag-not-a-number", lambda d, p: [recipe(d, p), OUT, "--workers", "two"], ["invalid int value", "usage"], False),
    # the output
    ("out-is-a-file", lambda d, p: [recipe(d, p), a_file(d)], ["OUT_DIR=", "is an existing file"], False),
    ("out-under-a-file", lambda d, p: [recipe(d, p), a_file(d) / "out"], ["OUT_DIR=", "cannot be created"], False),
    ("out-holds-something-else", lambda d, p: [recipe(d, p), foreign_out(d)], ["already exists", "not this merge"],
     False),
    # the Hydra form
    ("hydra-typo", lambda d, p: ["merge=paper_slerp", f"merge.base_model={p['base']}", f"merge.modle={p['other']}",
                                 "output_dir={out}"], ["unknown config key", "merge.modle"], False),
    ("hydra-model-unset", lambda d, p: ["merge=paper_slerp", f"merge.base_model={p['base']}", "output_dir={out}"],
     ["merge.model is not set"], False),
    ("hydra-unknown-preset", lambda d, p: ["merge=dare", "output_dir={out}"], ["unknown merge 'dare'", "paper_slerp"],
     False),
    ("hydra-workers-zero", lambda d, p: ["merge=paper_slerp", f"merge.base_model={p['base']}",
                                         f"merge.model={p['other']}", "output_dir={out}", "workers=0"],
     ["workers=0: must be >= 1"], False),
    ("hydra-timeout-negative", lambda d, p: ["merge=paper_slerp", f"merge.base_model={p['base']}",
                                             f"merge.model={p['other']}", "output_dir={out}", "wait_timeout=-1"],
     ["wait_timeout=-1.0: must be > 0"], False),
    ("hydra-output-is-a-file", lambda d, p: ["merge=paper_slerp", f"merge.base_model={p['base']}",
                                             f"merge.model={p['other']}", f"output_dir={a_file(d)}"],
     ["output_dir=", "is an existing file"], False),
]


@pytest.mark.parametrize("case, build, needles, midway", CASES, ids=[c[0] for c in CASES])
def test_merge_rejects(case, build, needles, midway, tmp_path, tiny_pair):
    out = tmp_path / "out"
    args = [str(a).replace("{out}", str(out)) for a in build(tmp_path, tiny_pair)]
    existing = out.exists()
    proc = run_merge_cli(*args, "--quiet" if "=" not in args[0] else "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, *needles)
    assert existing or not out.exists()
    assert not (out / "config.json").exists()
    assert midway or not (tmp_path / ".out.partial").exists()
    assert not (tmp_path / ".out.lock").exists()


# ---------------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------------
def file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as a full disk fails with ENOSPC."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("workers", ["1", "2"])
def test_full_disk_fails_with_one_line_and_the_rerun_finishes(tmp_path, tiny_pair, paper_merge, workers):
    from tests.support.env import offline_env

    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch" / "merge.py"), str(cfg), str(out), "--shard-size", SHARD,
           "--workers", workers, "--quiet"]
    # 60 kB: below every 100 kB output shard, above the configs and markers
    proc = subprocess.run(cmd, cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(60_000))
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc, "out of disk space", ".out.partial/model-", "rerun the same command")
    assert not out.exists()
    assert not list((tmp_path / ".out.partial").glob("*.done"))  # nothing looks complete
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--workers", workers, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert shard_bytes(out) == shard_bytes(paper_merge)  # the bytes of an uninterrupted merge


def test_two_merges_on_one_output_the_second_is_refused(tmp_path, tiny_pair):
    from tests.support.env import offline_env

    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    out = tmp_path / "out"
    env = offline_env(DOMAINFORGE_MERGE_PAUSE_AFTER_SHARD="30")
    first = subprocess.Popen([sys.executable, str(REPO / "launch" / "merge.py"), str(cfg), str(out),
                              "--shard-size", SHARD, "--workers", "2", "--quiet"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / ".out.lock"
        for _ in range(300):
            if lock.exists() and lock.read_text().strip():
                break
            subprocess.run(["sleep", "0.1"])
        assert lock.read_text().startswith(f"pid {first.pid} on host")
        proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--quiet")
        assert_one_line_error(proc, f"output_dir={out} is being written by another run", f"pid {first.pid}")
    finally:
        first.kill()  # SIGKILL: its workers die with it (PR_SET_PDEATHSIG), its lock with them
        first.wait()
    assert not out.exists()
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "taking over a stale lock" in proc.stderr
    assert shard_bytes(out) and not lock.exists()


def test_linear_merge_weights(tmp_path, tiny_pair):
    """Not bad input: the linear method with per-model weights matches its formula."""
    import torch
    import yaml
    from tests.support.models import load_dir

    cfg = tmp_path / "lin.yml"
    cfg.write_text(yaml.safe_dump({
        "models": [{"model": str(tiny_pair["base"]), "parameters": {"weight": 3.0}},
                   {"model": str(tiny_pair["other"]), "parameters": {"weight": 1.0}}],
        "merge_method": "linear", "dtype": "float32"}))
    proc = run_merge_cli(cfg, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    got = load_dir(tmp_path / "out")
    a, b = load_dir(tiny_pair["base"]), load_dir(tiny_pair["other"])
    for name in a:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], (3 * a[name].float() + b[name].float()) / 4, rtol=1e-6, atol=1e-7)


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB tmpfs: a real ENOSPC (the tiny merge writes ~0.5 MB)."""
    with tmpfs(tmp_path / "disk", "size=256k") as mnt:
        yield mnt


def test_real_enospc_then_more_space_resumes(tmp_path, tiny_pair, paper_merge, small_disk):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    out = small_disk / "out"
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--workers", "1", "--quiet")
    assert_one_line_error(proc, "out of disk space", "No space left on device", ".out.partial/model-")
    assert not out.exists()
    kept = sorted(p.name for p in (small_disk / ".out.partial").glob("*.done"))
    assert kept  # the shards that fitted are complete and stay
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"({len(kept)} already complete)" in proc.stderr
    assert shard_bytes(out) == shard_bytes(paper_merge)  # the kept shards and the rest: an uninterrupted merge's
