"""bench/gpu_throughput.py, kept runnable on the CPU: a smoke run at a tiny size."""

from __future__ import annotations

import json

import pytest

from tests.support.env import REPO, offline_env


@pytest.mark.integration
def test_gpu_throughput_benchmark_runs_at_a_tiny_size(tmp_path):
    """bench/gpu_throughput.py at a tiny size on 1 CPU rank: a row per option set asked for,
    each with positive tokens/s, MFU and peak memory, a step of batch x seq tokens (both pack
    full blocks), and the ratio against plain TRL; an option that cannot run here says so."""
    import subprocess
    import sys

    out = tmp_path / "tp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_throughput", "--hidden", "64", "--layers", "2", "--heads", "4",
         "--kv-heads", "2", "--ffn", "128", "--vocab", "2048", "--seq", "64", "--batch", "2", "--steps", "6",
         "--warmup", "2", "--rows", "plain,project+zero2,project+liger", "--json", str(out)],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["plain", "project+zero2", "project+liger"]
    for name in ("plain", "project+zero2"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["tokens_per_step"] == 2 * 64
        for key in ("tokens_per_s", "run_tokens_per_s", "mfu", "peak_mem_gib", "ratio"):
            assert row[key] > 0, (name, key, row)
        assert row["vs"] == "plain"
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[2:]] == list(rows)
    liger = rows["project+liger"]
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        assert liger["status"].startswith("skipped: liger-kernel is not installed"), liger
    else:  # installed, the row runs like the others
        assert liger["status"] == "ok" and liger["tokens_per_s"] > 0 and liger["ratio"] > 0, liger
