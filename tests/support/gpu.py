"""When tests/gpu/ is collected (tests/conftest.py's collection hook asks this)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from tests.support.env import REPO

GPU_SUITE = REPO / "tests" / "gpu"


def gpu_suite_requested(args: List[str], markexpr: str, cwd: Path) -> bool:
    """tests/gpu/ is collected only when asked for: a path inside it on the command line, or a
    `-m` expression that selects `gpu`. A CPU-only `python -m pytest` (CI) then neither runs
    nor skips it; `python -m pytest tests/gpu -m gpu` does, and skips each test without CUDA."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    if any(w == "gpu" and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words)):
        return True
    for arg in args:
        path = (cwd / arg.split("::")[0]).resolve()
        if path == GPU_SUITE or GPU_SUITE in path.parents:
            return True
    return False
