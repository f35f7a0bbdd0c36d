"""The merger's memory does not grow with the tensor size (docs/merge.md, "How it streams"):
two models whose one large tensor is 16x the merger's 8M-element chunk, merged by the real
command with one worker, peak well below the size of one tensor.

    python -m pytest -q tests/test_merge_memory.py
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import yaml
from tests.support.env import REPO, offline_env

pytestmark = pytest.mark.integration

BIG = "model.embed_tokens.weight"
ROWS, COLS = 16384, 8192  # 128M fp32 elements: 512 MB per input
BIG_BYTES = ROWS * COLS * 4

# The merge's own process, started by a small Python parent: a process's ru_maxrss carries the
# RSS it had before exec, so a child forked by pytest (hundreds of MB) would report pytest's.
PEAK_RSS = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(code)
"""


def write_sparse_model(path, seed: int):
    """A one-layer model directory whose safetensors file is mostly holes: a 4 KB run of values
    every MB of the big tensor, so writing it is instant and takes no disk, while reading it
    through the page cache costs what a dense file does."""
    path.mkdir()
    shapes = {BIG: (ROWS, COLS), "model.layers.0.input_layernorm.weight": (COLS,)}
    header, end = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    rng = np.random.default_rng(seed)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(data_start + end)
        for offset in range(0, end, 1 << 20):
            f.seek(data_start + offset)
            f.write(rng.standard_normal(1024).astype(np.float32).tobytes())
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return path


def test_merge_memory_is_flat_in_tensor_size(tmp_path):
    """Bound: half of one input tensor (256 MB). Streaming needs the interpreter (~45 MB), one
    8M-element chunk of each input mapped (2 x 32 MB) and ~35 MB of buffers: ~112 MB measured.
    A merger that holds any input tensor whole needs >= 512 MB (the whole-tensor chunk,
    `--chunk-elements 134217728`, peaks at ~1070 MB)."""
    import subprocess

    a, b = write_sparse_model(tmp_path / "a", 1), write_sparse_model(tmp_path / "b", 2)
    cfg = tmp_path / "m.yml"
    cfg.write_text(yaml.safe_dump({"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "slerp",
                                   "base_model": str(a), "parameters": {"t": 0.5}, "dtype": "float32",
                                   "out_dtype": "bfloat16"}))
    out, rss_file = tmp_path / "out", tmp_path / "peak_rss"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(rss_file), sys.executable,
                           str(REPO / "launch" / "merge.py"), str(cfg), str(out), "--workers", "1", "--quiet"],
                          cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from core.safetensors_header import read_header

    (shard,) = out.glob("*.safetensors")
    info = read_header(shard).tensors[BIG]
    assert (info.shape, info.dtype) == ((ROWS, COLS), "BF16")
    first = np.fromfile(shard, np.uint16, 1024, offset=info.begin)  # the inputs' first run of values
    assert np.count_nonzero(first) > 1000  # the big tensor was merged, not skipped
    peak = int(rss_file.read_text())
    assert peak < BIG_BYTES / 2, f"peak RSS {peak / 2**20:.0f} MB merging {BIG_BYTES / 2**20:.0f} MB tensors"
    shard.unlink()  # 256 MB that pytest's kept temporary directories need not hold
