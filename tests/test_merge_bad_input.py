"""Bad input to the real merge entry point: one `error:` line naming the problem and the fix,
a non-zero exit, and no output directory."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import assert_one_line_error
from test_merge_models import build_llama, run_merge_cli, tiny_pair, write_config  # noqa: F401

pytestmark = pytest.mark.integration


def fails(tmp_path, cfg, *needles, args=(), midway=False):
    """`midway`: the problem shows only while merging, so the hidden partial directory of the
    shards already done may stay (a rerun resumes from it); the output itself must not exist."""
    out = tmp_path / "out"
    line = assert_one_line_error(run_merge_cli(cfg, out, "--quiet", *args), *needles)
    assert not out.exists()
    assert midway or not (tmp_path / ".out.partial").exists()
    return line


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_model_path_does_not_exist(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tmp_path / "nope")
    fails(tmp_path, cfg, f"model path '{tmp_path / 'nope'}' does not exist", "safetensors")


def test_model_path_without_safetensors(tmp_path, tiny_pair):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"x")
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], empty)
    fails(tmp_path, cfg, "holds no .safetensors files", "safe_serialization=True")


def test_truncated_shard(tmp_path, tiny_pair):
    bad = copy_model(tiny_pair["other"], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], bad)
    fails(tmp_path, cfg, str(shard), "truncated", "re-download")


def test_corrupt_shard_header(tmp_path, tiny_pair):
    bad = copy_model(tiny_pair["other"], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], bad)
    fails(tmp_path, cfg, str(shard), "corrupt")


def test_tensor_missing_from_one_model(tmp_path, tiny_pair):
    from safetensors.torch import load_file, save_file

    bad = copy_model(tiny_pair["other"], tmp_path / "bad")
    index_path = bad / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.2.mlp.up_proj.weight"
    shard = bad / index["weight_map"].pop(name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], bad)
    fails(tmp_path, cfg, "model.layers.2.mlp.up_proj.weight", str(bad), "share one architecture")


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


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_input_weights(tmp_path, tiny_pair, value):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = patch_element(tiny_pair["other"], tmp_path / "bad", name, value)
    fails(tmp_path, write_config(tmp_path / "m.yml", tiny_pair["base"], bad), name, "inf/nan", str(bad), midway=True)


def test_finite_inputs_that_overflow_when_combined(tmp_path, tiny_pair):
    """The per-block inf check is skipped only when the norms prove the result finite. Here the
    tensors are ~orthogonal ([B, B, ...] and [B, -B, ...]), so SLERP at t=0.5 gives 0.71·B + 0.71·B
    in the first element: above float32's max for B = 3.3e38, though every input is finite."""
    name, big = "model.layers.1.mlp.down_proj.weight", 3.3e38
    base = patch_element(tiny_pair["base"], tmp_path / "base", name, big, big)
    other = patch_element(tiny_pair["other"], tmp_path / "other", name, big, -big)
    fails(tmp_path, write_config(tmp_path / "m.yml", base, other, t=0.5), name, "inf/nan", midway=True)


def test_mismatched_shapes(tmp_path, tiny_pair):
    wide = build_llama(tmp_path / "wide", 7, intermediate=160)
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], wide)
    fails(tmp_path, cfg, "shape mismatch", "mlp", "[32, 128]", "[32, 160]", "one architecture")


def test_layer_range_outside_the_model(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"], layers=40)
    fails(tmp_path, cfg, "layer_range [0, 40]", "has 4 layers", "[0, 4]")


def test_t_outside_unit_interval(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"],
                       t=[{"filter": "mlp", "value": [0, 1.5]}, {"value": 0.5}])
    fails(tmp_path, cfg, "parameters.t", "1.5", "outside [0, 1]")


def test_unknown_merge_method(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"], merge_method="ties")
    fails(tmp_path, cfg, "unknown merge_method 'ties'", "slerp", "linear")


def test_missing_config_file_and_bad_yaml(tmp_path):
    fails(tmp_path, tmp_path / "nope.yml", "nope.yml", "does not exist")
    bad = tmp_path / "bad.yml"
    bad.write_text("slices: [\n")
    fails(tmp_path, bad, "not valid YAML", "line")


def test_bad_cli_arguments(tmp_path, tiny_pair):
    cfg = write_config(tmp_path / "m.yml", tiny_pair["base"], tiny_pair["other"])
    fails(tmp_path, cfg, "shard size 'lots'", args=("--shard-size", "lots"))
    fails(tmp_path, cfg, "worker rank 5", "W-1", args=("--num-workers", "2", "--worker-rank", "5"))
    fails(tmp_path, cfg, "unrecognized arguments", "usage", args=("--bogus",))
    fails(tmp_path, cfg, "workers=0", "at least 1", args=("--workers", "0"))


def test_hydra_form_typo_and_missing_model(tmp_path, tiny_pair):
    out = tmp_path / "out"
    line = assert_one_line_error(run_merge_cli("merge=paper_slerp", f"merge.base_model={tiny_pair['base']}",
                                               f"merge.modle={tiny_pair['other']}", f"output_dir={out}"), "merge.modle")
    assert "unknown config key" in line
    assert_one_line_error(run_merge_cli("merge=paper_slerp", f"merge.base_model={tiny_pair['base']}",
                                        f"output_dir={out}"), "merge.model")
    assert_one_line_error(run_merge_cli("merge=dare", f"output_dir={out}"), "unknown merge 'dare'", "paper_slerp")
    assert_one_line_error(run_merge_cli("merge=paper_slerp", f"merge.base_model={tiny_pair['base']}",
                                        f"merge.model={tiny_pair['other']}", f"output_dir={out}", "workers=0"),
                          "workers=0", "at least 1")
    assert not out.exists()


def test_linear_merge_weights(tmp_path, tiny_pair):
    """Not bad input: the linear method with per-model weights matches its formula."""
    import torch
    from test_merge_models import load_dir

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
