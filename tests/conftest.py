"""Hooks and fixtures only; the helpers the tests share are in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

import pytest

from tests.support.env import REPO
from tests.support.merge import SHARD, run_merge_cli, write_config
from tests.support.gpu import GPU_SUITE, gpu_suite_requested
from tests.support.models import tiny_llama
from tests.support.selection import outside_the_ci_subset
from tests.support.slurm_cluster import LocalSlurm, TwoNodeSlurm, ensure_installed


def pytest_ignore_collect(collection_path: Path, config):
    inside = collection_path == GPU_SUITE or GPU_SUITE in collection_path.parents
    if inside and not gpu_suite_requested(config.args, config.option.markexpr or "", config.invocation_params.dir):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    """The plain suite runs the fault matrix's CI subset; `-m faults` runs every cell."""
    left_out = outside_the_ci_subset(items, config.args, config.option.markexpr or "")
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        dropped = set(map(id, left_out))
        items[:] = [item for item in items if id(item) not in dropped]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _allreduce_buffers() -> set:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


@pytest.fixture(scope="module", autouse=True)
def no_leaked_shared_memory():
    """Every DeepSpeed run, killed ones included, must leave /dev/shm as it found it:
    leaked all-reduce buffers (66 MB a rank) are RAM that later runs go without.
    Module scope, so that runs made by module-scoped fixtures are watched too."""
    before = _allreduce_buffers()
    yield
    leaked = sorted(_allreduce_buffers() - before)
    for name in leaked:
        (Path("/dev/shm") / name).unlink(missing_ok=True)  # do not let the next test pay for it
    assert not leaked, f"runs left DeepSpeed shared-memory buffers behind: {leaked}"


@pytest.fixture
def fake_flash_attn(tmp_path) -> Path:
    """A flash_attn package that fails if anything imports it: finding it must be enough."""
    site = tmp_path / "site"
    (site / "flash_attn").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text("raise ImportError('flash_attn was imported, not just found')\n")
    return site


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> Dict[str, Path]:
    """base (the 'Instruct' model) and other (the 'fine-tuned' one): bf16, several shards."""
    root = tmp_path_factory.mktemp("merge_models")
    pair = {"base": tiny_llama(root / "base", 1), "other": tiny_llama(root / "other", 2)}
    assert len(list(pair["base"].glob("*.safetensors"))) >= 3  # the merge tests read and damage single shards
    return pair


@pytest.fixture(scope="session")
def paper_merge(tiny_pair, tmp_path_factory):
    """The paper's gradient SLERP of the tiny pair, one worker: the reference output."""
    root = tmp_path_factory.mktemp("paper_merge")
    cfg = write_config(root / "merge.yml", tiny_pair["base"], tiny_pair["other"])
    out = root / "out"
    proc = run_merge_cli(cfg, out, "--shard-size", SHARD, "--workers", "1", "--verify")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM on localhost (tests/support/slurm_cluster.py), for the `slurm` tests."""
    ensure_installed()
    cluster = LocalSlurm(cpus=os.cpu_count() or 2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_slurm_nodes():
    """Two SLURM nodes, each slurmd in a network namespace of its own (tests/support/slurm_cluster.py)."""
    ensure_installed()
    cluster = TwoNodeSlurm()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
