"""bench/merge_methods.py runs end to end at a tiny size, both contenders, so that the script
behind docs/BENCHMARKS.md's merge-method table cannot rot (integration: it needs mergekit's venv,
and skips without it unless CI or DOMAINFORGE_REQUIRE_REFERENCES is set); and each of its recipes
passes our merger's own recipe checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bench.merge_methods import METHODS, MODELS, recipe
from merge.recipe import check_recipe
from tests.support.env import REPO
from tests.support.merge import require_mergekit


def test_every_bench_recipe_is_a_valid_recipe_of_ours():
    for method in METHODS:
        config = recipe(method, {name: f"/models/{name}" for name in MODELS})
        check_recipe(config)  # a UserError names the method's problem
        assert config["merge_method"] == method


@pytest.mark.integration
def test_merge_methods_bench_measures_both_contenders_at_two_sizes(tmp_path):
    require_mergekit()
    out = tmp_path / "bench.json"
    methods = ("slerp", "ties")  # two models, and three with a whole-tensor rank pass
    proc = subprocess.run(
        [sys.executable, "-m", "bench.merge_methods", "--shape", "tiny", "--params", "200K",
         "--scales", "1,2", "--repeat", "1", "--workers", "2", "--methods", ",".join(methods),
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 1.9 < result["sizes"]["x2"]["params"] / result["sizes"]["x1"]["params"] < 2.1
    runs = {(r["contender"], r["method"], r["scale"]): r for r in result["runs"]}
    assert set(runs) == {("ours", m, s) for m in methods for s in (1.0, 2.0)} | {("mergekit", m, 1.0) for m in methods}
    for r in runs.values():
        assert len(r["walls"]) == len(r["cpu_seconds"]) == 1 and r["walls"][0] > 0 and r["cpu_seconds"][0] > 0
        assert 0 < r["peak_rss_largest"] <= r["peak_rss_tree"] < 4 << 30
    # the table pairs the two contenders: both ratios and both memories on each method's row
    for m in methods:
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours, theirs = runs[("ours", m, 1.0)], runs[("mergekit", m, 1.0)]
        assert cells[3] == f"{theirs['walls'][0] / ours['walls'][0]:.1f}x"
        assert cells[6] == f"{theirs['cpu_seconds'][0] / ours['cpu_seconds'][0]:.1f}x"
        assert cells[8] == f"{theirs['peak_rss_largest'] / 2**20:.0f}"
    # the synthetic models are gone unless --keep
    assert not (tmp_path / "work" / "x1").exists()
