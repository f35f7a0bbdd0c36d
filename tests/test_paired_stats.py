"""Clustered intervals and paired tests (evaluation/paired.py): two questions about one fact
count as one fact's worth of evidence, McNemar's exact p matches the binomial by hand, and the
margin is the distance from the best wrong option."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.paired import (clustered_interval, fact_majority, margins, mcnemar_exact, paired_difference)


def facts_asked_twice(n_facts=150, p=0.4, seed=1):
    """Each fact known or not, asked by two wordings that agree: (outcomes, fact labels)."""
    known = np.random.default_rng(seed).random(n_facts) < p
    return np.repeat(known, 2).astype(float), np.repeat(np.arange(n_facts), 2)


def test_two_wordings_of_one_fact_are_one_facts_evidence():
    correct, facts = facts_asked_twice()
    clustered = clustered_interval(correct, facts)
    per_fact = clustered_interval(correct[::2], facts[::2])
    as_if_independent = clustered_interval(correct, np.arange(len(correct)))
    width = lambda ci: ci[1] - ci[0]
    assert width(clustered) == pytest.approx(width(per_fact), rel=0.1)
    assert width(clustered) > 1.25 * width(as_if_independent)  # ~sqrt(2) wider than the naive interval


def test_paired_difference_and_its_interval():
    correct, facts = facts_asked_twice()
    better = correct.copy()
    better[:40] = 1.0  # the first 20 facts learned
    diff, lo, hi = paired_difference(better, correct, facts)
    assert diff == pytest.approx((better - correct).mean())
    assert 0 < lo < diff < hi
    assert hi - lo > 1.25 * (paired_difference(better, correct, np.arange(len(correct)))[2] - paired_difference(better, correct, np.arange(len(correct)))[1])
    same, lo, hi = paired_difference(correct, correct, facts)
    assert same == lo == hi == 0.0


def test_mcnemar_exact_matches_the_binomial():
    a = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 8   # 10 only a, 2 only b, 38 concordant
    b = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 8
    only_a, only_b, p = mcnemar_exact(a, b)
    assert (only_a, only_b) == (10, 2)
    assert p == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert mcnemar_exact(a, a)[2] == 1.0
    assert mcnemar_exact([True] * 3, [False] * 3)[2] == pytest.approx(2 / 8)


def test_fact_majority_and_margins():
    assert fact_majority([1, 1, 1, 0, 0, 0], ["x", "x", "y", "y", "z", "z"]) == [True, False, False]
    got = margins([[-1.0, -2.0, -3.0, -0.5], [-0.2, -2.0, -3.0, -4.0]], [0, 0])
    assert got.tolist() == [-0.5, 1.8]
    with pytest.raises(ValueError, match="one label per item"):
        clustered_interval([1, 0], ["a"])
