"""Our merge against mergekit 0.1.5 itself on the same tiny pair (bf16 and fp32 math).

mergekit lives in its own venv (bench/setup_mergekit.sh), never in the project's dependencies.
Without it these tests skip, or fail where CI or DOMAINFORGE_REQUIRE_REFERENCES is set.
"""

from __future__ import annotations

import json
import subprocess

import yaml

import pytest
from tests.support.env import offline_env
from tests.support.merge import MERGEKIT, require_mergekit, run_merge_cli, write_config
from tests.support.models import load_dir, tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def mergekit():
    return require_mergekit()


@pytest.mark.parametrize("inputs,dtype", [("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                                          ("float32", "bfloat16")])
def test_same_tensors_as_mergekit(tmp_path, tiny_pair, inputs, dtype):
    """bf16 pair merged in bf16 (the paper's case), upcast to fp32, and fp32 checkpoints (as
    CPU training writes them) merged with `dtype: bfloat16` (inputs rounded first)."""
    import torch

    pair = tiny_pair if inputs == "bfloat16" else {
        "base": tiny_llama(tmp_path / "base", 11, dtype="float32"),
        "other": tiny_llama(tmp_path / "other", 12, dtype="float32"),
    }
    cfg = write_config(tmp_path / "m.yml", pair["base"], pair["other"], dtype=dtype)
    proc = subprocess.run([str(MERGEKIT), str(cfg), str(tmp_path / "mk")], env=offline_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_merge_cli(cfg, tmp_path / "ours", "--quiet")
    assert proc.returncode == 0, proc.stderr
    ours, theirs = load_dir(tmp_path / "ours"), load_dir(tmp_path / "mk")
    assert set(ours) == set(theirs)
    differing = total = 0
    for name, want in theirs.items():
        got = ours[name]
        assert got.dtype == want.dtype == getattr(torch, dtype), name
        if dtype == "bfloat16":
            # float64 vs float32 norms/dot move a value across a bf16 rounding boundary rarely,
            # and then by one step
            step = want.float().abs() * 2**-7 + 1e-30
            assert ((got.float() - want.float()).abs() <= step).all(), name
        else:
            torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        differing += (got != want).sum().item()
        total += want.numel()
    if dtype == "bfloat16":
        assert differing / total < 1e-3, (differing, total)
    # float32 output: the last bits follow the coefficients' last bits, so only closeness counts


# ---------------------------------------------------------------------------------------------
# every deterministic method, several models, gradients and filters, chunks smaller than tensors
# ---------------------------------------------------------------------------------------------
# One Python process runs all of mergekit's merges (its start-up is most of each run's time).
MERGEKIT_BATCH = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    cfg = MergeConfiguration.model_validate(yaml.safe_load(open(config)))
    run_merge(cfg, out, MergeOptions(lazy_unpickle=False, copy_tokenizer=False, random_seed=0), config_source=open(config).read())
"""


RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def method_configs(bf16, fp32):
    """{name: (config, ...)}: bf16 models merged in bf16 (every op rounds to bf16, as in
    mergekit), and fp32 models for the magnitude-ranking methods (bf16 magnitudes tie often
    and torch's argsort orders ties arbitrarily, so only tie-free inputs can match exactly)."""
    b, m1, m2 = (str(bf16[k]) for k in ("base", "other", "third"))
    f, f1, f2 = (str(fp32[k]) for k in ("base", "other", "third"))
    gradient = [0.2, 0.9, 0.5]
    by_kind = [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]
    return {
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": gradient}},
                       {"model": m2, "parameters": {"weight": by_kind}}, {"model": b}],
            "parameters": {"lambda": [{"filter": "self_attn", "value": 0.8}, {"value": 1.0}],
                           "normalize": [{"filter": "norm", "value": True}, {"value": False}]},
        },
        "linear": {
            "merge_method": "linear", "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": gradient}}, {"model": m2, "parameters": {"weight": 0.5}},
                       {"model": b, "parameters": {"weight": by_kind}}],
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1}, {"model": m2}, {"model": b}],
            "parameters": {"filter_wise": [{"filter": "mlp", "value": True}, {"value": False}]},
        },
        "nuslerp": {  # with a base: SLERP of the task vectors; flatten, rows and columns by filter
            "merge_method": "nuslerp", "base_model": b, "dtype": "bfloat16",
            "slices": [{"sources": [{"model": m1, "layer_range": [0, 4], "parameters": {"weight": gradient}},
                                    {"model": m2, "layer_range": [0, 4], "parameters": {"weight": 0.6}},
                                    {"model": b, "layer_range": [0, 4]}]}],
            "parameters": {"nuslerp_flatten": [{"filter": "self_attn", "value": True}, {"value": False}],
                           "nuslerp_row_wise": [{"filter": "up_proj", "value": True}, {"value": False}]},
        },
        "nuslerp_no_base": {
            "merge_method": "nuslerp", "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": 0.3}}, {"model": m2, "parameters": {"weight": by_kind}}],
            "parameters": {"nuslerp_flatten": False},
        },
        "ties": {
            "merge_method": "ties", "base_model": f, "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": f1, "parameters": {"weight": gradient, "density": [0.3, 0.8]}},
                       {"model": f2, "parameters": {"weight": 0.6, "density": by_kind}}, {"model": f}],
            "parameters": {"lambda": 1.1, "int8_mask": True,
                           "rescale": [{"filter": "mlp", "value": True}, {"value": False}]},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": f, "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": f1, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                       {"model": f2, "parameters": {"weight": by_kind, "density": [0.5, 0.9], "gamma": 0.1}},
                       {"model": f}],
        },
        # random (RANDOM_METHODS): compared by distribution only (test below), rescale on
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": m2, "parameters": {"weight": 0.4, "density": [0.3, 0.7]}}, {"model": b}],
        },
        "dare_linear": {
            "merge_method": "dare_linear", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.6}},
                       {"model": m2, "parameters": {"weight": 0.3, "density": [0.4, 0.8]}}, {"model": b}],
            "parameters": {"rescale": True},
        },
        "della": {
            "merge_method": "della", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.2}},
                       {"model": m2, "parameters": {"weight": 0.4, "density": [0.4, 0.7], "epsilon": 0.1}},
                       {"model": b}],
            "parameters": {"rescale": True},
        },
        "della_linear": {
            "merge_method": "della_linear", "base_model": b, "dtype": "bfloat16",
            "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.15}},
                       {"model": m2, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.3}}, {"model": b}],
            "parameters": {"rescale": True, "lambda": 0.9},
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties", "base_model": f, "dtype": "float32", "out_dtype": "bfloat16",
            "models": [{"model": f1, "parameters": {"weight": 0.7, "density": 0.6}},
                       {"model": f2, "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.02}}, {"model": f}],
            "parameters": {"normalize": True},
        },
    }


@pytest.fixture(scope="session")
def tiny_trios(tmp_path_factory, tiny_pair):
    root = tmp_path_factory.mktemp("trios")
    bf16 = dict(tiny_pair, third=tiny_llama(root / "third", 3))
    fp32 = {k: tiny_llama(root / f"f32_{k}", seed, dtype="float32") for k, seed in
            (("base", 21), ("other", 22), ("third", 23))}
    return bf16, fp32


def assert_within_one_bf16_step(got, want, name):
    """|got - want| <= one bf16 step at the larger magnitude of the two. Where the result
    cancels to almost nothing, float32 rounding of the terms decides its last bits: steps below
    2^-20 of the tensor's largest value are not told apart."""
    import torch

    g, w = got.float(), want.float()
    floor = max(w.abs().max().item() * 2.0**-20, 2.0**-126)
    mag = torch.maximum(g.abs(), w.abs()).clamp(min=2.0**-126)
    step = torch.exp2(torch.floor(torch.log2(mag)) - 7).clamp(min=floor)
    bad = (g - w).abs() > step
    assert not bad.any(), f"{name}: {bad.sum().item()} elements differ by more than a bf16 step, e.g. " \
                          f"{g[bad][:3].tolist()} vs {w[bad][:3].tolist()}"


def test_every_deterministic_method_matches_mergekit(tmp_path, tiny_trios):
    """Each method's tensors equal mergekit 0.1.5's within one bf16 step, with per-model,
    gradient and filtered parameters, 3 models, and chunks (1000 elements) smaller than most
    tensors and not a multiple of a row, so every streaming pass and row split is exercised;
    the random methods (dare_*, della*, rescale on) by distribution."""
    configs = method_configs(*tiny_trios)
    args = []
    for name, cfg in configs.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        args += [str(path), str(tmp_path / "mk" / name)]
    proc = subprocess.run([str(MERGEKIT.parent / "python"), "-c", MERGEKIT_BATCH, *args], env=offline_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in configs:
        if name in RANDOM_METHODS:
            continue
        proc = run_merge_cli(tmp_path / f"{name}.yml", tmp_path / "ours" / name, "--quiet", "--workers", "1",
                             "--chunk-elements", "1000")
        assert proc.returncode == 0, (name, proc.stderr)
        ours, theirs = load_dir(tmp_path / "ours" / name), load_dir(tmp_path / "mk" / name)
        assert set(ours) == set(theirs), name
        for tensor, want in theirs.items():
            assert ours[tensor].dtype == want.dtype, (name, tensor)
            assert_within_one_bf16_step(ours[tensor], want, f"{name}: {tensor}")
    base = load_dir(tiny_trios[0]["base"])
    for name in RANDOM_METHODS:
        proc = run_merge_cli(tmp_path / f"{name}.yml", tmp_path / "ours" / name, "--quiet", "--workers", "1")
        assert proc.returncode == 0, (name, proc.stderr)
        assert_same_distribution(load_dir(tmp_path / "ours" / name), load_dir(tmp_path / "mk" / name), base, name)


def assert_same_distribution(ours, theirs, base, method):
    """The random methods draw their own numbers (not torch's): per tensor of >= 4096 elements,
    the share of elements moved off the base and the mean size of the move match mergekit's."""
    compared = 0
    for tensor, want in theirs.items():
        if want.numel() < 4096:
            continue
        b, got, want = base[tensor].float(), ours[tensor].float(), want.float()
        moved_ours, moved_theirs = (got != b).float().mean().item(), (want != b).float().mean().item()
        sigma = (2 * moved_theirs * (1 - moved_theirs) / want.numel()) ** 0.5  # of the difference of two shares
        assert abs(moved_ours - moved_theirs) < 5 * sigma, (method, tensor, moved_ours, moved_theirs)
        size_ours, size_theirs = (got - b).abs().mean().item(), (want - b).abs().mean().item()
        assert abs(size_ours / size_theirs - 1) < 0.1, (method, tensor, size_ours, size_theirs)
        compared += 1
    assert compared >= 10, method  # mlp weights, embeddings, lm_head


# ---------------------------------------------------------------------------------------------
# `launch/merge.py --help` lists each method's parameters, as mergekit declares them
# ---------------------------------------------------------------------------------------------
MERGEKIT_PARAMS = """
import json
from mergekit.merge_methods import registered_methods
from mergekit.merge_methods.base import MISSING, ParameterScope

def shown(value):
    return "required" if value is MISSING else str(value).lower() if isinstance(value, bool) else str(value)

print(json.dumps({m.spec.name: {p.name: [shown(p.default), p.scope != ParameterScope.SHARED]
                                for p in m.spec.parameters} for m in registered_methods()}))
"""


def help_methods(text: str) -> dict:
    """{method: {parameter: [default, per model]}} from --help's `merge methods` lines."""
    lines = text.split("merge methods (docs/merge.md):\n", 1)[1].split("\n\n", 1)[0].splitlines()
    methods = {}
    for line in lines:
        name, params = line.strip().split(" ", 1)
        methods[name] = {}
        for param in filter(None, params[1:-1].split(", ")):
            setting, per_model = param.removesuffix(" (per model)"), param.endswith(" (per model)")
            key, default = setting.split("=", 1)
            methods[name][key] = [default, per_model]
    return methods


def test_help_lists_each_methods_parameters_as_mergekit_declares_them():
    from merge import methods

    proc = run_merge_cli("--help")
    assert proc.returncode == 0, proc.stderr
    ours = help_methods(proc.stdout)
    assert list(ours) == methods.names()  # every method we run, once
    proc = subprocess.run([str(MERGEKIT.parent / "python"), "-c", MERGEKIT_PARAMS], env=offline_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout)
    for name, params in ours.items():
        assert params == theirs[name], name  # names, defaults ("required") and per-model scope
