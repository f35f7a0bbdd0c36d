"""Merge recipes and the merge command for the merge tests, an independent in-memory
reference merge (torch, float64) to hold the merger's tensors to, and one tensor through a
method's job in memory (`merge_arrays`)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tests.support.env import REPO, offline_env, require_reference

SHARD = "100KB"
"""The merge tests' output shard size: ~5 shards for the tiny pair, so resumes keep some."""

MERGEKIT = Path("/opt/mergekit-venv/bin/mergekit-yaml")
"""mergekit 0.1.5's command in its own venv (bench/setup_mergekit.sh): the merger's reference."""

PAPER_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def write_config(path: Path, base: Path, other: Path, t=None, layers=4, **extra) -> Path:
    """The paper's gradient SLERP config in mergekit's slices form."""
    cfg = {
        "slices": [{"sources": [{"model": str(other), "layer_range": [0, layers]},
                                {"model": str(base), "layer_range": [0, layers]}]}],
        "merge_method": "slerp",
        "base_model": str(base),
        "parameters": {"t": PAPER_T if t is None else t},
        "dtype": "bfloat16",
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def require_mergekit() -> Path:
    require_reference(MERGEKIT.exists(), f"{MERGEKIT} is absent: run bash bench/setup_mergekit.sh")
    return MERGEKIT


def run_merge_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "merge.py"), *map(str, args)],
                          cwd=REPO, env=env or offline_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# an independent reference: the SLERP in float64 torch on whole tensors
# ---------------------------------------------------------------------------------------------
def reference_slerp(t: float, v0, v1):
    import torch

    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm().item(), b.norm().item()
    dot = float(((a / (na if na > 1e-8 else 1.0)) * (b / (nb if nb > 1e-8 else 1.0))).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.reshape(v0.shape).to(torch.float64)


def paper_t(name: str, layers: int) -> float:
    """t for the paper's gradients, written out by hand from the rule in the issue."""
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    d = (int(m.group(1)) / (layers - 1) if layers > 1 else 1.0) if m else 0.0
    for flt, anchors in (("self_attn", [0, 0.5, 0.3, 0.7, 1]), ("mlp", [1, 0.5, 0.7, 0.3, 0])):
        if m and flt in name:
            s = d * (len(anchors) - 1)
            i = int(s)
            j = min(i + 1, len(anchors) - 1)
            return anchors[i] + (s - i) * (anchors[j] - anchors[i])
    return 0.5


def assert_bf16_close(ours, ref, name=""):
    """ours (bf16) equals ref (float64) rounded to bf16, up to one bf16 step where float32
    arithmetic lands on the other side of a rounding boundary (rare)."""
    import torch

    assert ours.dtype == torch.bfloat16, (name, ours.dtype)
    want = ref.to(torch.bfloat16)
    differ = (ours != want)
    assert differ.float().mean().item() < 1e-3, (name, differ.sum().item())
    step = want.float().abs() * 2**-7 + 1e-30
    assert ((ours.float() - want.float()).abs() <= step).all(), name


# ---------------------------------------------------------------------------------------------
# one tensor through a method's job, in memory
# ---------------------------------------------------------------------------------------------
def merge_arrays(method, arrays, params, shape=None, work="F32", block=1000, seed=0, has_base=True):
    """One tensor through a method's job as merge/stream.py streams it: `passes` reductions over
    blocks of `block` elements, then the combine pass; arrays[0] is the base when has_base."""
    return run_job(method, arrays, params, shape, work, block, seed, has_base)[1]


def run_job(method, arrays, params, shape=None, work="F32", block=1000, seed=0, has_base=True):
    """merge_arrays' (job after the passes, merged elements): the job holds its reductions."""
    from merge import methods
    from merge.methods.numeric import Rounder, TensorContext
    from merge.plan import TensorPlan

    flat = [np.asarray(a, np.float32).reshape(-1) for a in arrays]
    n = flat[0].shape[0]
    plan = TensorPlan("model.layers.0.mlp.up_proj.weight", tuple(shape or (n,)), work, work,
                      [(f"m{i}", "w") for i in range(len(flat))], method, dict(params), has_base)
    rnd = Rounder(work)

    def read(start, count):
        return [rnd(f[start : start + count].copy()) for f in flat]

    job = methods.get(method).job(plan, TensorContext(np.float32, rnd, read, block, seed))
    for p in range(job.passes):
        for lo in range(0, n, block):
            job.reduce(p, read(lo, min(block, n - lo)), lo)
        job.end_pass(p)
    return job, np.concatenate([job.combine(read(lo, min(block, n - lo)), lo).copy() for lo in range(0, n, block)])
