"""The mutation check's fast set (python -m tests.mutation --fast): each guarantee with an
in-process guard is broken in a temporary copy of the tree and its guard must fail; mutmut's
kill rate on the pure modules; and the check itself tells a failed assertion from an error.

    python -m pytest -q tests/test_mutation.py
"""

from __future__ import annotations

import pytest
from tests.support.env import REPO

from tests.support.mutation import (
    MUTATIONS,
    MUTMUT_MIN_KILL_RATE,
    Mutation,
    MutationDrift,
    check,
    main,
    mutated_text,
    run_guards,
    run_mutmut,
    table,
    tree_files,
)

FAST = [m for m in MUTATIONS if m.fast_guards]


@pytest.mark.parametrize("mutation", FAST, ids=[m.name for m in FAST])
def test_fast_mutation_fails_its_guards(mutation):
    ok, rows = check([mutation], fast=True, baseline=False, timeout=600)
    assert ok, table(rows)


def test_mutmut_kills_enough_mutants_of_the_pure_modules():
    score = run_mutmut(tree_files(REPO), timeout=600)
    assert score.total > 0 and score.rate >= MUTMUT_MIN_KILL_RATE, score.counts


def test_a_mutation_whose_text_moved_stops_naming_itself(capsys):
    moved = Mutation("moved", "x", "f.py", (("a = 1", "a = 2"),))
    for text, found in (("b = 1\n", 0), ("a = 1\na = 1\n", 2)):
        with pytest.raises(MutationDrift, match=rf"mutation moved: f.py holds {found} copies of 'a = 1'"):
            mutated_text(moved, text)
    assert mutated_text(moved, "a = 1\n") == "a = 2\n"
    assert main(["no-such-mutation"]) == 2
    assert "error: unknown mutation no-such-mutation" in capsys.readouterr().err


def test_only_a_failed_assertion_counts_as_caught(tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "__init__.py").write_text("")
    (tests / "test_guards.py").write_text(
        "import pytest\n"
        "def test_fails(): assert 1 == 2\n"
        "def test_passes(): pass\n"
        "def test_skips(): pytest.skip('no reference')\n"
        "@pytest.fixture\ndef broken(): raise RuntimeError('setup')\n"
        "def test_errors_in_setup(broken): pass\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_one_case_fails(x): assert x == 1\n")
    (tests / "test_broken_import.py").write_text("import no_such_module\ndef test_x(): pass\n")
    guards = ["tests/test_guards.py::test_fails", "tests/test_guards.py::test_passes", "tests/test_guards.py::test_skips",
              "tests/test_guards.py::test_errors_in_setup", "tests/test_guards.py::test_one_case_fails",
              "tests/test_broken_import.py", "tests/test_guards.py::test_absent", "tests/test_absent.py"]
    results = {r.guard.split("/")[-1]: r.result for r in run_guards(tmp_path, guards, timeout=120)}
    assert results == {
        "test_guards.py::test_fails": "killed", "test_guards.py::test_passes": "survived",
        "test_guards.py::test_skips": "skipped", "test_guards.py::test_errors_in_setup": "errored",
        "test_guards.py::test_one_case_fails": "killed", "test_broken_import.py": "errored",
        "test_guards.py::test_absent": "missing", "test_absent.py": "missing",
    }
