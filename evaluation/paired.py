"""Intervals and paired tests for items that come in clusters: several questions about one fact
(two wordings of each CPT-only fact) are not independent, so an interval that resamples items
is too narrow. These resample facts (a clustered bootstrap), compare two models on the same
items (the paired difference, and McNemar's exact test on the discordant items), and give the
per-item margin log p(correct) - max log p(distractor), a finer readout than 0/1 accuracy.

    from evaluation.paired import clustered_interval, paired_difference, mcnemar_exact
    lo, hi = clustered_interval(correct, facts)                 # 95%, 10,000 resamples of facts
    diff, lo, hi = paired_difference(arm, start, facts)         # the same items, two models
    discordant_for_a, discordant_for_b, p = mcnemar_exact(arm, start)
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def cluster_sums(values: Sequence[float], clusters: Sequence) -> Tuple[np.ndarray, np.ndarray]:
    """(sum of the values, number of items) per cluster, clusters in order of first appearance."""
    if len(values) != len(clusters) or not len(values):
        raise ValueError(f"{len(values)} values for {len(clusters)} cluster labels: give one label per item")
    _, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=np.asarray(values, dtype=float))
    return sums, np.bincount(index).astype(float)


def clustered_bootstrap(values: Sequence[float], clusters: Sequence, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0) -> np.ndarray:
    """The mean over items of `resamples` resamples that draw whole clusters with replacement."""
    sums, counts = cluster_sums(values, clusters)
    draws = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    return sums[draws].sum(axis=1) / counts[draws].sum(axis=1)


def clustered_interval(values: Sequence[float], clusters: Sequence, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Tuple[float, float]:
    """Percentile interval of the item mean (an accuracy, a mean margin), resampling clusters."""
    means = clustered_bootstrap(values, clusters, resamples, seed)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence, level: float = 0.95,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Tuple[float, float, float]:
    """mean(a) - mean(b) of two models scored on the same items, with its clustered interval."""
    if len(a) != len(b):
        raise ValueError(f"paired items: {len(a)} against {len(b)} scores; score both models on the same items")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    lo, hi = clustered_interval(diff, clusters, level, resamples, seed)
    return float(diff.mean()), lo, hi


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> Tuple[int, int, float]:
    """McNemar's exact test of two models on the same items: (items only `a` gets right, items
    only `b` gets right, two-sided p), the p from Binomial(discordant, 1/2)."""
    if len(a) != len(b):
        raise ValueError(f"paired items: {len(a)} against {len(b)} outcomes")
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)


def fact_majority(correct: Sequence[bool], clusters: Sequence) -> List[bool]:
    """One outcome per fact: right on more than half of its questions (McNemar on facts)."""
    sums, counts = cluster_sums([float(c) for c in correct], clusters)
    return list(sums > counts / 2)


def margins(log_probs: Sequence[Sequence[float]], answers: Sequence[int]) -> np.ndarray:
    """Per item, log p(correct option) - the largest log p of a wrong option: > 0 where the item
    is answered right, and how far from flipping it is."""
    out = []
    for options, answer in zip(log_probs, answers):
        wrong = [lp for i, lp in enumerate(options) if i != answer]
        out.append(options[answer] - max(wrong))
    return np.asarray(out, dtype=float)
