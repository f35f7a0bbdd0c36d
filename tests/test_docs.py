"""Every code name in README.md and docs/*.md points at something that exists, so a moved file
or a renamed function breaks this test before it misleads a reader.

What is checked, read statically (no imports, so no torch):
- a path ending in `.py` whose first folder is one of this repository's (`train/run.py`,
  `tests/test_eval_units.py`) exists; one marked ` at <commit>` is history and is skipped, and
  a path under a folder this repository does not have (`deepspeed/runtime/engine.py`) is
  another project's;
- a bare file name (`test_merge_e2e.py`) is some file's name in the repository, unless it is one
  of the other projects' files listed in OTHER_PROJECTS_FILES;
- the README's layout tree: each name it lists under a folder (`run.py` under `train/`) exists
  there;
- a `.md` file named (`docs/eval.md`, `BENCHMARKS.md`) exists beside the document or from the
  repository root, unless it is a file a run writes (RUN_OUTPUT_FILES); a Markdown link's target
  exists, and its `#anchor` is a heading of the target;
- `pkg/file.py:function` and dotted names of three or more parts that start with one of our
  packages (`train.run.train`, `core.errors.UserError`): the module exists and defines the
  rest (a function, class, assignment or import at its top level; `Class.method` inside the
  class). Two-part names are skipped: `merge.model` is also a recipe key.

Each test lists every missing name with the file and line that names it.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tests.support.env import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("core", "train", "merge", "evaluation", "orchestration")
SKIPPED_DIRS = {"build", "outputs", "__pycache__"}
# Files of the projects the docs compare with, named without their folder.
OTHER_PROJECTS_FILES = {
    "generalized_task_arithmetic.py",  # mergekit
}

# Files a run writes into its own directory, which the docs name without one.
RUN_OUTPUT_FILES = {"study.md"}

MD_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.md)(?![\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PY_PATH = re.compile(r"(?<![\w./<>-])((?:[\w.-]+/)*[\w-]+\.py)(?!\w)(?::([A-Za-z_][\w.]*))?")
DOTTED = re.compile(r"(?<![\w./$-])((?:%s)(?:\.[A-Za-z_]\w*){2,})(?![\w/=-])" % "|".join(PACKAGES))
HISTORY = re.compile(r"`? at [0-9a-f]{7,40}\b")


def doc_lines() -> Iterator[Tuple[Path, str, str]]:
    """(the document, `file:line`, the line) for every line of the docs."""
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            yield doc, f"{doc.relative_to(REPO)}:{number}", line


def repo_dirs() -> set:
    return {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in SKIPPED_DIRS and not p.name.endswith(".egg-info")}


@lru_cache(maxsize=1)
def repo_file_names() -> set:
    names = set()
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if not any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            names.add(path.name)
    return names


@lru_cache(maxsize=None)
def top_level_names(module_file: Path) -> dict:
    """{name: its ast node (or None)} for what a module defines or imports at its top level."""
    names: dict = {}
    for node in ast.parse(module_file.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = None
    return names


def module_file(parts: List[str]) -> Optional[Path]:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, attrs: List[str]) -> bool:
    """Whether `path` defines attrs[0] at its top level (and attrs[1] inside that class)."""
    names = top_level_names(path)
    if attrs[0] not in names:
        return False
    node = names[attrs[0]]
    if len(attrs) == 1:
        return True
    if isinstance(node, ast.ClassDef) and len(attrs) == 2:
        return any(getattr(n, "name", None) == attrs[1] for n in node.body) or any(
            isinstance(t, ast.Name) and t.id == attrs[1]
            for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]))
    return False


def resolves(dotted: str) -> bool:
    """`pkg.module[.name[.attr]]`: the longest module prefix exists and defines the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(parts[:cut])
        if path is not None:
            return cut == len(parts) or defines(path, parts[cut:])
    return False


def layout_paths() -> Iterator[Tuple[str, str]]:
    """(where, path) for each name the README's layout tree lists under a folder."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Layout")
    block_at = text.index("```\n", start) + 4
    block = text[block_at:text.index("```", block_at)]
    first_line = text[:block_at].count("\n") + 1
    folder = ""
    for offset, line in enumerate(block.splitlines()):
        names = re.split(r"\s{2,}", line.strip())[0]
        if not line.startswith(" "):
            folder = names.split(",")[0].strip()
            if not folder.endswith("/"):
                folder = ""
            continue
        if not folder or line.startswith("    "):
            continue
        for name in (n.strip() for n in names.split(",")):
            if name and "<" not in name:
                yield f"README.md:{first_line + offset} (layout)", folder + name


def test_python_paths_named_in_the_docs_exist():
    dirs, missing = repo_dirs(), []
    for _, where, line in doc_lines():
        for match in PY_PATH.finditer(line):
            path = match.group(1)
            if HISTORY.match(line, match.end(1)):
                continue
            if "/" in path:
                if path.split("/")[0] in dirs and not (REPO / path).is_file():
                    missing.append(f"{where}: {path}")
            elif path not in repo_file_names() and path not in OTHER_PROJECTS_FILES:
                missing.append(f"{where}: {path} (no file of that name)")
    for where, path in layout_paths():
        if not (REPO / path).exists():
            missing.append(f"{where}: {path}")
    assert not missing, "paths in the docs that do not exist:\n" + "\n".join(missing)


def test_code_names_in_the_docs_resolve():
    dirs, missing = repo_dirs(), []
    for _, where, line in doc_lines():
        for match in PY_PATH.finditer(line):
            path, name = match.groups()
            if name and path.split("/")[0] in dirs and (REPO / path).is_file() \
                    and not defines(REPO / path, name.split(".")):
                missing.append(f"{where}: {path}:{name}")
        for match in DOTTED.finditer(line):
            if not resolves(match.group(1)):
                missing.append(f"{where}: {match.group(1)}")
    assert not missing, "code names in the docs that do not resolve:\n" + "\n".join(missing)


def test_the_checks_catch_stale_names():
    """The rules above flag the kinds of drift they exist for."""
    assert resolves("core.errors.UserError") and resolves("core.config.REPO_ROOT") and resolves("core.errors")
    assert not resolves("core.errors.main") and not resolves("evaluation.benchmark.load_benchmark")
    assert [m.group(1) for m in PY_PATH.finditer("see `evaluation/benchmark.py`, not cluster.python")] == \
        ["evaluation/benchmark.py"]
    assert [m.group(1) for m in DOTTED.finditer("`merge.model` and `train.run.main` -> merge.run.run_merge")] == \
        ["train.run.main", "merge.run.run_merge"]


def anchors(doc: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in doc.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_documents_and_links_named_in_the_docs_exist():
    missing = []
    for doc, where, line in doc_lines():
        for match in MD_PATH.finditer(line):
            name = match.group(1)
            if name not in RUN_OUTPUT_FILES and not (doc.parent / name).is_file() and not (REPO / name).is_file():
                missing.append(f"{where}: {name}")
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            file = (doc.parent / path) if path else doc
            if not file.exists():
                missing.append(f"{where}: link to {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                missing.append(f"{where}: link to {target} (no such heading)")
    assert not missing, "documents and links in the docs that do not exist:\n" + "\n".join(missing)
