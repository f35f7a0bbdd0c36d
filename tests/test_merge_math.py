"""Unit tests of the merge math and planning: SLERP against a float64 reference, chunked equals
whole, per-layer t against hand-computed values, dtype rounding against torch, shard layout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.errors import UserError
from core.safetensors_header import read_header
from merge.io import ModelReader, decode, encode
from merge.methods.numeric import SlerpStats, combine, lerp, slerp, slerp_coefficients
from merge.params import evaluate_setting, resolve
from merge.plan import plan_merge
from merge.recipe import check_recipe
from merge.shards import parse_size, plan_output_shards


def ref_slerp64(t, v0, v1):
    """The issue's definition, in float64, written out independently."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    a_n = a / na if na > 1e-8 else a
    b_n = b / nb if nb > 1e-8 else b
    dot = float(np.clip(np.sum(a_n * b_n), -1, 1))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).reshape(v0.shape), dot
    th = math.acos(dot)
    return ((math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)).reshape(v0.shape), dot


def cases():
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal((64, 48)).astype(np.float32)
    yield "random", v0, rng.standard_normal((64, 48)).astype(np.float32), None
    yield "near-colinear", v0, (v0 * 1.7 + 1e-3 * rng.standard_normal(v0.shape)).astype(np.float32), "lerp"
    yield "just-below-threshold", v0, (v0 + 0.05 * np.linalg.norm(v0) / math.sqrt(v0.size)
                                        * rng.standard_normal(v0.shape)).astype(np.float32), "slerp"
    yield "opposite", v0, -v0, "lerp"
    yield "zero-norm", np.zeros_like(v0), v0, "slerp"
    yield "tiny-norm", np.full_like(v0, 1e-12), v0, "slerp"


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_slerp_matches_float64_reference(case, t):
    name, v0, v1, branch = case
    want, dot = ref_slerp64(t, v0, v1)
    if branch == "lerp":
        assert abs(dot) > 0.9995
    elif branch == "slerp":
        assert abs(dot) <= 0.9995
    got = slerp(t, v0, v1)
    assert got.dtype == np.float32 and got.shape == v0.shape
    scale = np.abs(v0).max() + np.abs(v1).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    # float64 inputs are computed in float64
    np.testing.assert_allclose(slerp(t, v0.astype(np.float64), v1.astype(np.float64)), want, rtol=1e-12,
                               atol=1e-13 * scale)


def test_slerp_endpoints_are_exact():
    rng = np.random.default_rng(1)
    v0, v1 = rng.standard_normal((2, 1000)).astype(np.float32)
    assert np.array_equal(slerp(0.0, v0, v1), v0)
    assert np.array_equal(slerp(1.0, v0, v1), v1)
    assert np.array_equal(lerp(0.0, v0, v1), v0) and np.array_equal(lerp(1.0, v0, v1), v1)


def test_chunked_slerp_equals_whole():
    rng = np.random.default_rng(2)
    v0 = rng.standard_normal(100_003).astype(np.float32)
    v1 = (0.6 * v0 + rng.standard_normal(100_003)).astype(np.float32)
    whole = slerp(0.37, v0, v1)
    stats = SlerpStats()
    for s in range(0, v0.size, 777):  # pass one over odd-sized chunks
        stats.add(v0[s : s + 777], v1[s : s + 777])
    c0, c1 = slerp_coefficients(0.37, stats.sq0, stats.sq1, stats.dot)
    chunked = np.concatenate([combine(c0, c1, v0[s : s + 777].copy(), v1[s : s + 777].copy())
                              for s in range(0, v0.size, 777)])
    np.testing.assert_array_equal(chunked, whole)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(50_000) * 10.0 ** rng.integers(-20, 20, 50_000)).astype(np.float32)
    # exact ties between two bf16 values round to even
    x[:4] = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000], np.uint32).view(np.float32)
    out = encode(x, "BF16", np.empty(x.size * 2, np.uint8), np.empty(x.size, np.uint32))
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    np.testing.assert_array_equal(out, want)
    back = decode(out, "BF16", np.empty(x.size, np.float32))
    np.testing.assert_array_equal(back, torch.from_numpy(x).to(torch.bfloat16).float().numpy())


# ---------------------------------------------------------------------------------------------
# per-layer t
# ---------------------------------------------------------------------------------------------
GRADIENT_ATTN = [0, 0.5, 0.3, 0.7, 1]
GRADIENT_MLP = [1, 0.5, 0.7, 0.3, 0]
PAPER = [{"filter": "self_attn", "value": GRADIENT_ATTN}, {"filter": "mlp", "value": GRADIENT_MLP}, {"value": 0.5}]


def fake_llama(path, layers, seed, vocab=16):
    """A safetensors-only Llama-shaped model with 2x2 weights (enough for planning)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        names += [f"model.layers.{i}.{n}.weight" for n in (
            "self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm")]
    tensors = {n: rng.standard_normal((vocab, 2) if "embed" in n or "lm_head" in n else (2, 2)).astype(np.float32)
               for n in names}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(f'{{"num_hidden_layers": {layers}}}')
    return path


def plan_for(tmp_path, layers, t, layer_range=None):
    a, b = fake_llama(tmp_path / "a", layers, 1), fake_llama(tmp_path / "b", layers, 2)
    lr = layer_range or [0, layers]
    spec = check_recipe({
        "slices": [{"sources": [{"model": str(b), "layer_range": lr}, {"model": str(a), "layer_range": lr}]}],
        "merge_method": "slerp", "base_model": str(a), "parameters": {"t": t}, "dtype": "bfloat16"})
    readers = {}
    return plan_merge(spec, lambda p: readers.setdefault(p, ModelReader(p))), a


def test_paper_gradient_t_per_layer_hand_computed(tmp_path):
    plan, base = plan_for(tmp_path, 32, PAPER)
    t = {p.name: p.params["t"] for p in plan.tensors}
    # d = i/31, s = 4d, linear between anchors floor(s) and floor(s)+1
    assert t["model.layers.0.self_attn.q_proj.weight"] == 0.0
    assert t["model.layers.0.mlp.up_proj.weight"] == 1.0
    assert t["model.layers.31.self_attn.o_proj.weight"] == 1.0
    assert t["model.layers.31.mlp.down_proj.weight"] == 0.0
    assert t["model.layers.8.self_attn.q_proj.weight"] == pytest.approx(0.5 + (0.3 - 0.5) * (32 / 31 - 1))
    assert t["model.layers.8.mlp.up_proj.weight"] == pytest.approx(0.5 + (0.7 - 0.5) * (32 / 31 - 1))
    assert t["model.layers.16.self_attn.q_proj.weight"] == pytest.approx(0.3 + (0.7 - 0.3) * (64 / 31 - 2))
    assert t["model.layers.24.mlp.down_proj.weight"] == pytest.approx(0.3 + (0.0 - 0.3) * (96 / 31 - 3))
    # layer norms match neither filter; tensors outside the layers use d = 0 -> the catch-all 0.5
    assert t["model.layers.5.input_layernorm.weight"] == 0.5
    assert t["model.embed_tokens.weight"] == t["model.norm.weight"] == t["lm_head.weight"] == 0.5
    # base model first (v0), so t=0 returns it
    assert all(p.sources[0][0] == str(base) for p in plan.tensors)


def test_gradient_on_non_layer_tensors_uses_depth_zero_and_single_layer_slices_depth_one(tmp_path):
    plan, _ = plan_for(tmp_path, 4, [0.2, 0.9])
    t = {p.name: p.params["t"] for p in plan.tensors}
    assert t["model.embed_tokens.weight"] == 0.2 and t["lm_head.weight"] == 0.2
    assert t["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.2 + 0.7 / 3)
    plan, _ = plan_for(tmp_path / "one", 4, [0.2, 0.9], layer_range=[2, 3])
    layer = [p for p in plan.tensors if ".layers." in p.name]
    assert {p.name.split(".")[2] for p in layer} == {"0"}  # output layers renumbered from 0
    assert all(p.params["t"] == 0.9 for p in layer)  # N = 1 -> d = 1
    assert all(src.endswith("layers.2.mlp.up_proj.weight") or "layers.2." in src
               for p in layer for _, src in p.sources)


def test_filter_semantics_first_match_wins():
    assert evaluate_setting("model.layers.3.mlp.up_proj", [{"filter": "mlp", "value": 0.1}, {"value": 0.7}], 0) == 0.1
    assert evaluate_setting("model.layers.3.self_attn.q", [{"filter": "mlp", "value": 0.1}, {"value": 0.7}], 0) == 0.7
    assert evaluate_setting("x.mlp", [{"value": 0.7}, {"filter": "mlp", "value": 0.1}], 0) == 0.7
    assert evaluate_setting("x", [{"filter": "*", "value": [0, 1]}], 0.25) == 0.25


def test_a_lone_filter_a_default_and_a_parameter_without_value():
    assert evaluate_setting("x.mlp", {"filter": "mlp", "value": 0.3}, 0) == 0.3  # one {filter, value}, no list
    scopes = [{"t": [{"filter": "mlp", "value": 0.1}]}, {"t": 0.6}]  # the slice's, then the top level
    assert resolve("t", "x.mlp", 0, scopes) == 0.1 and resolve("t", "x.attn", 0, scopes) == 0.6
    assert resolve("normalize", "x", 0, scopes, default=True) is True
    for setting in ([{"filter": "mlp", "value": 0.1}], "oops"):
        with pytest.raises(UserError, match=r"parameters\.t gives no value for tensor 'x\.attn'"):
            resolve("t", "x.attn", 0, [{"t": setting}])


def test_shard_layout_from_headers_respects_size_and_loads(tmp_path):
    from safetensors.torch import load_file

    plan, _ = plan_for(tmp_path, 6, 0.5)
    shards = plan_output_shards(plan.tensors, 100)
    assert len(shards) > 1 and all(s.size - len(s.head) <= 100 or len(s.tensors) == 1 for s in shards)
    assert [t.name for s in shards for t in s.tensors] == [t.name for t in plan.tensors]
    # a header laid out up front is a valid safetensors file once the data is written
    s = shards[0]
    path = tmp_path / s.filename
    path.write_bytes(s.head + bytes(s.size - len(s.head)))
    assert set(load_file(str(path))) == {t.name for t in s.tensors}
    assert {n: i.shape for n, i in read_header(path).tensors.items()} == {t.name: t.shape for t in s.tensors}


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1GiB", 2**30), ("5B", 5 * 10**9),
                                       ("12345", 12345)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("raw,needle", [
    ({"merge_method": "tie", "models": [{"model": "a"}]}, "unknown merge_method 'tie'"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}], "parameters": {"t": 1.5}},
     "outside [0, 1]"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}],
      "parameters": {"t": [{"filter": "mlp", "value": [0, -0.1]}]}}, "outside [0, 1]"),
    ({"merge_method": "slerp", "models": [{"model": "b"}]}, "needs base_model"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}], "parameters": {"weight": 1}},
     "not a parameter of slerp"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}], "dtype": "int8"}, "dtype 'int8'"),
    ({"merge_method": "slerp", "base_model": "a", "modles": []}, "unknown merge config key 'modles'"),
])
def test_bad_configs_fail_naming_the_problem(raw, needle):
    with pytest.raises(UserError) as err:
        check_recipe(raw)
    assert needle in str(err.value) and "\n" not in str(err.value)
