"""Our merge against mergekit 0.1.5 itself on the same tiny pair (bf16 and fp32 math).

mergekit lives in its own venv (bench/setup_mergekit.sh), never in the project's dependencies.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import test_env as child_env
from test_merge_models import (  # noqa: F401
    build_llama,
    load_dir,
    run_merge_cli,
    tiny_pair,
    write_config,
)

MERGEKIT = Path("/opt/mergekit-venv/bin/mergekit-yaml")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MERGEKIT.exists(), reason="mergekit venv absent: run bench/setup_mergekit.sh"),
]


@pytest.mark.parametrize("inputs,dtype", [("bfloat16", "bfloat16"), ("bfloat16", "float32"),
                                          ("float32", "bfloat16")])
def test_same_tensors_as_mergekit(tmp_path, tiny_pair, inputs, dtype):
    """bf16 pair merged in bf16 (the paper's case), upcast to fp32, and fp32 checkpoints (as
    CPU training writes them) merged with `dtype: bfloat16` (inputs rounded first)."""
    import torch

    pair = tiny_pair if inputs == "bfloat16" else {
        "base": build_llama(tmp_path / "base", 11, dtype="float32"),
        "other": build_llama(tmp_path / "other", 12, dtype="float32"),
    }
    cfg = write_config(tmp_path / "m.yml", pair["base"], pair["other"], dtype=dtype)
    proc = subprocess.run([str(MERGEKIT), str(cfg), str(tmp_path / "mk")], env=child_env(),
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
