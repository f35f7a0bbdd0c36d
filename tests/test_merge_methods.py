"""The merge-method registry (merge/methods/): exact streaming rank selection against a sort,
chunk- and worker-independent random draws, DARE/DELLA keep rates and rescaling checked
statistically, and bad recipes failing in one line. Equality with mergekit itself is in
test_merge_vs_mergekit.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from tests.support.env import assert_one_line_error
from tests.support.merge import merge_arrays, run_merge_cli
from tests.support.models import load_dir, tiny_llama

from core.errors import UserError
from merge import methods
from merge.methods.numeric import RankWindow, Rounder, uniforms
from merge.recipe import check_recipe


# ---------------------------------------------------------------------------------------------
# the k-th magnitude, streamed
# ---------------------------------------------------------------------------------------------
def stable_window(mags, lo, hi, descending):
    order = np.argsort(-mags if descending else mags, kind="stable")
    keep = np.zeros(mags.shape[0], bool)
    keep[order[lo:hi]] = True
    return keep


@pytest.mark.parametrize("work", ["BF16", "F32", "F64"])
@pytest.mark.parametrize("block", [97, 4096, 100_000])
def test_rank_window_keeps_exactly_the_sorted_positions(work, block):
    """Radix select over the float bits + a counting scan keeps the same elements as a stable
    sort, with many ties (bf16 values, repeated values), whatever the block size."""
    rng = np.random.default_rng(0)
    compute = np.float64 if work == "F64" else np.float32
    mags = np.abs(rng.standard_normal(20_000)).astype(compute)
    mags[::7] = mags[3]  # a run of ties right in the middle
    mags[::11] = 0.0
    if work == "BF16":
        Rounder("BF16")(mags)
    n = mags.shape[0]
    for lo, hi, descending in [(0, 6000, True), (0, 1, True), (0, n, True), (4000, 19_000, False),
                               (n - 300, n, False), (5, 6, False), (100, 100, False)]:
        window = RankWindow(lo, hi, descending, compute, work, n)
        for p in range(window.passes):
            for start in range(0, n, block):
                window.reduce(p, mags[start : start + block])
            window.end_pass(p)
        for scan in range(2):  # a rescale pass and the writing pass scan the same way
            got = np.concatenate([window.keep(mags[s : s + block], s) for s in range(0, n, block)])
            want = stable_window(mags, lo, hi, descending)
            assert np.array_equal(got, want), (lo, hi, descending, scan)
    assert RankWindow(0, 5, True, np.float32, "BF16", 10).passes == 1
    assert RankWindow(0, 5, True, np.float32, "F32", 10).passes == 2
    assert RankWindow(0, 5, True, np.float64, "F64", 10).passes == 4
    assert RankWindow(0, 10, True, np.float32, "F32", 10).passes == 0  # everything kept: nothing to find


def test_ties_equals_whole_tensor_reference_for_any_block():
    """TIES (top-density magnitudes, rescale, sign election, normalise, lambda), streamed in
    blocks of 97, equals the whole-tensor formula written out with numpy sorts."""
    rng = np.random.default_rng(1)
    shape = (50, 40)
    base, a, b = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    params = {"weight": [0.7, 0.4], "density": [0.3, 0.6], "lambda": 0.9, "normalize": True, "rescale": True,
              "int8_mask": False}
    got = merge_arrays("ties", [base, a, b], params, shape, block=97)
    deltas = []
    for x, w, d in zip((a, b), params["weight"], params["density"]):
        delta = (x - base).reshape(-1)
        keep = stable_window(np.abs(delta), 0, int(d * delta.size), True)
        masked = delta * keep
        masked = masked * np.float32(np.abs(delta).sum() / np.abs(masked).sum())
        deltas.append(masked * np.float32(w))
    deltas = np.stack(deltas)
    sign = np.where(deltas.sum(0) >= 0, 1, -1)
    agree = np.sign(deltas) == sign
    mixed = (deltas * agree).sum(0)
    divisor = (np.array(params["weight"], np.float32)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    want = base.reshape(-1) + mixed / divisor * np.float32(0.9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,params", [
    ("model_stock", {"filter_wise": True}),
    ("model_stock", {"filter_wise": False}),
    ("nuslerp", {"weight": [0.3, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", {"weight": [0.3, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": False}),
    ("breadcrumbs_ties", {"weight": [0.5, 1.0, 0.3], "density": [0.5, 0.8, 0.9], "gamma": [0.1, 0.0, 0.05],
                          "lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False}),
])
@pytest.mark.parametrize("work", ["BF16", "F32"])
def test_block_size_does_not_change_the_result(method, params, work):
    """Row-wise reductions and rank windows split across blocks (37 elements, rows of 40) give
    the bytes of one block per tensor."""
    rng = np.random.default_rng(2)
    shape = (30, 40)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    whole = merge_arrays(method, arrays, params, shape, work=work, block=1200)
    split = merge_arrays(method, arrays, params, shape, work=work, block=37)
    assert np.array_equal(whole, split)


# ---------------------------------------------------------------------------------------------
# randomised methods
# ---------------------------------------------------------------------------------------------
def test_random_stream_does_not_depend_on_where_it_is_cut():
    key = [5, 6]
    whole = uniforms(key, 0, 1000)
    cut = np.concatenate([uniforms(key, s, min(37, 1000 - s)) for s in range(0, 1000, 37)])
    assert np.array_equal(whole, cut)
    assert 0 <= whole.min() and whole.max() < 1


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keep_rate_and_rescale(method, density):
    """Each element of a task vector survives with probability `density` (within 4 sigma of the
    binomial), and `rescale` scales the survivors by the l1 ratio, so the l1 norm is kept."""
    n = 200_000
    rng = np.random.default_rng(3)
    delta = rng.uniform(0.5, 1.5, n).astype(np.float32)
    base = np.zeros(n, np.float32)
    params = {"weight": [1.0], "density": [density], "lambda": 1.0, "normalize": False, "int8_mask": False}
    plain = merge_arrays(method, [base, delta], dict(params, rescale=False), block=4096)
    kept = plain != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.mean() - density) < 4 * sigma, kept.mean()
    assert np.array_equal(plain[kept], delta[kept])  # survivors unchanged without rescale
    scaled = merge_arrays(method, [base, delta], dict(params, rescale=True), block=4096)
    assert np.array_equal(scaled != 0, kept)  # the same draws
    ratio = np.float32(np.abs(delta).sum(dtype=np.float64) / np.abs(plain).sum(dtype=np.float64))
    np.testing.assert_allclose(scaled[kept], delta[kept] * ratio, rtol=1e-6)
    assert abs(np.abs(scaled).sum() / np.abs(delta).sum() - 1) < 1e-4


def test_della_keep_probability_grows_with_magnitude_rank():
    """della keeps with probability density - epsilon .. density + epsilon, linear in the
    element's magnitude rank within its row: overall rate = density, the top tenth of each
    row ~ density + 0.9·epsilon, the bottom tenth ~ density - 0.9·epsilon."""
    rows, cols, density, eps = 200, 1000, 0.5, 0.3
    rng = np.random.default_rng(4)
    delta = rng.standard_normal((rows, cols)).astype(np.float32)
    params = {"weight": [1.0], "density": [density], "epsilon": [eps], "lambda": 1.0, "normalize": False,
              "rescale": False, "int8_mask": False}
    out = merge_arrays("della_linear", [np.zeros_like(delta), delta], params, (rows, cols), block=3333)
    kept = (out != 0).reshape(rows, cols)
    rank = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1) / (cols - 1)
    n = rows * cols
    assert abs(kept.mean() - density) < 4 * math.sqrt(0.25 / n)
    top, bottom = kept[rank >= 0.9].mean(), kept[rank < 0.1].mean()
    sigma = math.sqrt(0.25 / (n / 10))
    assert abs(top - (density + 0.9 * eps)) < 4 * sigma + 0.01, top
    assert abs(bottom - (density - 0.9 * eps)) < 4 * sigma + 0.01, bottom


def test_same_seed_same_tensors_for_any_chunking_and_workers(tmp_path, tiny_pair):
    """dare_ties and della with one seed: identical bytes with 1 or 2 workers and chunks of
    1000 or 8M elements; another seed gives other tensors."""
    third = tiny_llama(tmp_path / "third", 3)
    outputs = {}
    for method in ("dare_ties", "della"):
        cfg = {"merge_method": method, "base_model": str(tiny_pair["base"]), "dtype": "bfloat16",
               "models": [{"model": str(tiny_pair["other"]), "parameters": {"weight": 0.6, "density": 0.4}},
                          {"model": str(third), "parameters": {"weight": [0.2, 0.8], "density": 0.7}},
                          {"model": str(tiny_pair["base"])}]}
        path = tmp_path / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg))
        for tag, flags in {"w1": ["--workers", "1", "--chunk-elements", "1000"], "w2": ["--workers", "2"],
                           "seed": ["--workers", "1", "--random-seed", "7"]}.items():
            out = tmp_path / f"{method}-{tag}"
            proc = run_merge_cli(path, out, "--quiet", *flags)
            assert proc.returncode == 0, proc.stderr
            outputs[method, tag] = load_dir(out)
        w1, w2, other = (outputs[method, t] for t in ("w1", "w2", "seed"))
        assert set(w1) == set(w2) and all(w1[k].equal(w2[k]) for k in w1), method  # 2 workers: other shards
        assert not all(w1[k].equal(other[k]) for k in w1), method


# ---------------------------------------------------------------------------------------------
# the registry's declarations and bad recipes
# ---------------------------------------------------------------------------------------------
def test_every_method_declares_mergekit_parameters():
    declared = {m: [p.name for p in methods.get(m).params] for m in methods.names()}
    assert declared["ties"] == ["int8_mask", "normalize", "rescale", "lambda", "weight", "density"]
    assert declared["breadcrumbs"][-1] == "gamma" and declared["della"][-1] == "epsilon"
    assert declared["nuslerp"] == ["weight", "nuslerp_row_wise", "nuslerp_flatten"]
    assert declared["model_stock"] == ["filter_wise"]
    defaults = {p.name: p.default for p in methods.get("dare_ties").params}
    assert defaults["rescale"] is True and defaults["normalize"] is False and defaults["density"] == 1.0
    assert {p.name: p.default for p in methods.get("breadcrumbs").params}["gamma"] == 0.01
    assert {p.name: p.default for p in methods.get("della").params}["epsilon"] == 0.15
    assert {m for m in methods.names() if methods.get(m).randomised} == {"dare_ties", "dare_linear", "della",
                                                                          "della_linear"}


def recipe(method, models=("a", "b"), base="base", **params):
    raw = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models]}
    if base:
        raw["base_model"] = base
    if params:
        raw["parameters"] = params
    return raw


@pytest.mark.parametrize("raw,needle", [
    (recipe("ties", gamma=0.1), "merge config.parameters.gamma is not a parameter of ties: it takes int8_mask"),
    (recipe("ties", density=1.5), "parameters.density has 1.5, outside (0, 1]: give density within (0, 1]"),
    (recipe("dare_ties", density=[{"filter": "mlp", "value": 0.0}, {"value": 0.5}]), "density has 0.0, outside (0, 1]"),
    (recipe("task_arithmetic", base=None), "merge_method task_arithmetic needs base_model: set it"),
    ({"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}]}, "model_stock needs at least 3 models (the base and at least two others)"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters": {"weight": -0.5}}]},
     "models[0].parameters.weight has -0.5: ties does not take negative weights; use weights >= 0"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}]}, "model a has no weight"),
    (recipe("nuslerp", models=("a", "b", "c")), "nuslerp merges exactly two models"),
    (recipe("ties", normalize=1), "normalize has 1: normalize is true or false"),
    (recipe("della", density=0.5, epsilon=1.5), "epsilon has 1.5, outside [0, 1]"),
])
def test_bad_method_recipes_fail_in_one_line(raw, needle):
    with pytest.raises(UserError) as err:
        check_recipe(raw)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bad_recipe_on_the_command_line_leaves_nothing(tmp_path, tiny_pair):
    """model_stock of two models: one error line before any output, and della's density ±
    epsilon (a per-tensor check) likewise."""
    for name, cfg, needle in [
        ("stock", {"merge_method": "model_stock", "base_model": str(tiny_pair["base"]),
                   "models": [{"model": str(tiny_pair["other"])}]}, "model_stock needs at least 3 models"),
        ("della", {"merge_method": "della", "base_model": str(tiny_pair["base"]),
                   "models": [{"model": str(tiny_pair["other"]), "parameters": {"weight": 1, "density": 0.9}}],
                   "parameters": {"epsilon": 0.2}}, "della needs density ± epsilon inside (0, 1)"),
    ]:
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump(cfg))
        proc = run_merge_cli(path, tmp_path / name, "--quiet")
        assert_one_line_error(proc, needle)
        assert not (tmp_path / name).exists() and not (tmp_path / f".{name}.partial").exists()


def test_docs_table_is_the_registry():
    from tests.support.env import REPO

    assert methods.methods_table() in (REPO / "docs" / "merge.md").read_text()
