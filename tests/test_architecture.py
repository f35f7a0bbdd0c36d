"""The layout is the architecture: imports point one way, login-node commands stay light, and
nothing generic is installed into site-packages.

    core/                      the base: no torch, imports only itself
    train/  merge/  evaluation/    each on the base only, none imports another
    orchestration/             above all three
    launch/                    thin entry points on top

Inside a package, its parts (modules and subpackages) import each other one way only. Tests
share helpers through tests/support/, never by importing another test module, and only
launch/ puts the checkout on sys.path.
"""

from __future__ import annotations

import ast
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.support.env import HEAVY, REPO, offline_env, run_light
from tests.support.merge import write_config

PROJECT = ("core", "train", "merge", "evaluation", "orchestration", "launch")
ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "merge": {"core", "merge"},
    "evaluation": {"core", "evaluation"},
    "orchestration": {"core", "train", "merge", "evaluation", "orchestration"},
}


def project_imports(path: Path) -> set:
    """Top-level project packages a file imports, lazily inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PROJECT}
    return found


def test_imports_point_one_way():
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((REPO / layer).rglob("*.py")):
            for imported in project_imports(path) - allowed:
                bad.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not bad, "imports against the layering (see tests/test_architecture.py): " + "; ".join(bad)


def test_the_base_imports_no_heavy_library():
    for path in sorted((REPO / "core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [n for n in names if n.split(".")[0] in HEAVY], f"{path} imports {names}"


# ---------------------------------------------------------------------------------------------
# inside a package: its parts depend on each other one way
# ---------------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list:
    """Import nodes, lazy ones included, less those under `if TYPE_CHECKING:` (annotations only)."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def part_of(module: str) -> str:
    """The unit that must not be imported back: a package's module or its subpackage
    (`train.data.cpt` -> `train.data`, `merge.run` -> `merge.run`)."""
    return ".".join(module.split(".")[:2])


def part_graph(modules: dict) -> dict:
    graph = {part_of(name): set() for name in modules}
    for name, path in modules.items():
        for node in runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # an imported name -> its module
                    target = target.rpartition(".")[0]
                same_package = target.split(".")[0] == name.split(".")[0] and "." in target
                if target and same_package and part_of(target) != part_of(name):
                    graph[part_of(name)].add(part_of(target))
    return graph


def cycle_through(graph: dict, start: str) -> list:
    """A path start -> ... -> start, or []."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return []


def test_no_part_of_a_package_imports_back_up():
    """train/data must not import from train/stages, which imports it: one direction per pair."""
    modules = {module_name(p): p for top in PROJECT for p in (REPO / top).rglob("*.py")}
    graph = part_graph(modules)
    cycles = {" -> ".join(c) for c in (cycle_through(graph, part) for part in sorted(graph)) if c}
    assert not cycles, "import cycles between the parts of a package: " + "; ".join(sorted(cycles))


# ---------------------------------------------------------------------------------------------
# login-node commands, run with the heavy libraries poisoned: importing one fails
# ---------------------------------------------------------------------------------------------
def fake_slurm(bin_dir: Path) -> dict:
    """An sbatch that accepts every script (job ids 101, 102, ...) and a squeue that knows none:
    enough to run submit.py's submit and status modes without a cluster. The real daemons are
    exercised in test_slurm_cluster.py."""
    bin_dir.mkdir()
    counter = bin_dir / "next"
    counter.write_text("101")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nn=$(cat {counter}); echo $((n+1)) > {counter}; echo "$n"\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "squeue"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    return offline_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_submit_imports_no_heavy_library(tmp_path):
    root = tmp_path / "runs"
    dry = run_light("submit.py", "pipeline=tiny", f"root={root}", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "#SBATCH --dependency=afterok" in dry.stdout

    env = fake_slurm(tmp_path / "bin")
    sub = run_light("submit.py", "pipeline=tiny", f"root={root}", env=env)
    assert sub.returncode == 0, sub.stderr[-2000:]
    jobs = dict(re.findall(r"^step (\S+): job (\d+)", sub.stdout, flags=re.M))
    assert len(jobs) == 16 and f"step slerp: job {jobs['slerp']} (after {jobs['sft']}:{jobs['orpo']})" in sub.stdout

    status = run_light("submit.py", "status", "pipeline=tiny", f"root={root}", env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    listed = dict(line.split()[:2] for line in status.stdout.splitlines()[1:] if line.split()[:1] != ["scripts"])
    assert listed == jobs


def test_merge_imports_no_heavy_library(tmp_path, tiny_pair):  # noqa: F811
    config = write_config(tmp_path / "merge.yml", tiny_pair["base"], tiny_pair["other"])
    out = tmp_path / "merged"
    proc = run_light("merge.py", config, out, "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "config.json").is_file()
    hydra = run_light("merge.py", "merge=slerp_half", f"merge.model={tiny_pair['other']}",
                      f"merge.base_model={tiny_pair['base']}", f"output_dir={tmp_path / 'hydra'}", "workers=1",
                      "progress=false")
    assert hydra.returncode == 0, hydra.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "hydra" / "mergekit_config.yml").read_text())["parameters"] == {"t": 0.5}


def test_poisoning_would_catch_a_heavy_import(tmp_path):
    """The guard itself: a training command, which needs torch, fails under it."""
    proc = run_light("train.py", "+stage=cpt", f"output_dir={tmp_path / 'x'}")
    assert proc.returncode != 0 and "halted; None in sys.modules" in proc.stderr


# ---------------------------------------------------------------------------------------------
# packaging: a checkout-run application
# ---------------------------------------------------------------------------------------------
def test_the_wheel_installs_no_top_level_package(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("domainforge-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"domainforge-0.1.0.dist-info"}, tops


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "launch").glob("*.py")))
def test_entry_points_are_thin_and_documented(script):
    """Each entry point opens with the command lines that run it, and holds no logic of its own."""
    text = (REPO / "launch" / script).read_text()
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert f"launch/{script}" in doc, f"launch/{script}: the docstring should give its command lines"
    assert len(text.splitlines()) <= 60, f"launch/{script} has grown logic: move it into a package"


# ---------------------------------------------------------------------------------------------
# tests and tooling: helpers in tests/support/, sys.path left alone
# ---------------------------------------------------------------------------------------------
def python_files(*folders: str) -> list:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_no_test_imports_another_test_module_or_conftest():
    """Shared helpers live in tests/support/ and fixtures in conftest.py, which pytest loads;
    a test module is never a library (bench/ and data/ may not reach into tests/ either)."""
    bad = []
    for path in python_files("tests", "bench", "data"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                last = name.split(".")[-1]
                if last == "conftest" or last.startswith("test_") or (
                        path.parts[len(REPO.parts)] != "tests" and name.split(".")[0] == "tests"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not bad, "; ".join(bad)


SYS_PATH_EDIT = re.compile(r"sys\.path(\[[^\]]*\]\s*=|\s*=|\s*\+=|\.(insert|append|extend)\()")


def test_only_the_entry_points_edit_sys_path():
    """launch/*.py put the repository first (users type `deepspeed launch/train.py ...`); every
    other script runs as a module from the repository root (`python -m bench.merge_bench`), and
    child processes get the repository as their cwd. Code inside strings counts too."""
    bad = [f"{path.relative_to(REPO)}:{n}" for path in sorted(REPO.rglob("*.py"))
           if ".git" not in path.parts and path.parent != REPO / "launch"
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if SYS_PATH_EDIT.search(line) and "SYS_PATH_EDIT" not in line]
    assert not bad, "sys.path edited outside launch/: " + ", ".join(bad)
    for path in sorted((REPO / "launch").glob("*.py")):
        edits = [line for line in path.read_text().splitlines() if SYS_PATH_EDIT.search(line)]
        assert len(edits) <= 1, (path.name, edits)  # the one line that puts the repository first


def test_one_tiny_model_builder():
    """Tests make models with tests/support/models.py's tiny_llama, so that a seed and a shape
    name the same weights everywhere: no other test code builds a Llama config of its own."""
    bad = [f"{path.relative_to(REPO)}:{n}" for path in python_files("tests")
           if path != REPO / "tests" / "support" / "models.py"
           for n, line in enumerate(path.read_text().splitlines(), 1)
           if re.search(r"\bLlamaConfig\(|\bLlamaForCausalLM\(", line)]
    assert not bad, "build tiny models with tests.support.models.tiny_llama: " + ", ".join(bad)
