"""Which tests a command line asks for, beyond pytest's own selection: tests/conftest.py's
collection hooks ask this for the GPU suite (tests/support/gpu.py) and the fault matrix."""

from __future__ import annotations

from typing import List


def marker_requested(markexpr: str, marker: str) -> bool:
    """Whether a `-m` expression selects `marker` (names it, not as `not <marker>`)."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    return any(w == marker and (i == 0 or words[i - 1] != "not") for i, w in enumerate(words))


def outside_the_ci_subset(items: List, args: List[str], markexpr: str) -> List:
    """The fault-matrix cells (`@pytest.mark.faults`) that the plain suite leaves out: those not
    marked `faults(ci=True)`, unless `-m` selects faults or the command line names the test
    itself (a node id)."""
    if marker_requested(markexpr, "faults"):
        return []
    named = [a[a.find("tests/"):] if "tests/" in a else a for a in args if "::" in a]
    left_out = []
    for item in items:
        marker = item.get_closest_marker("faults")
        if marker is None or marker.kwargs.get("ci"):
            continue
        if any(item.nodeid == a or item.nodeid.startswith(a + "[") for a in named):
            continue
        left_out.append(item)
    return left_out
