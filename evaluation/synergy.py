"""Synergy: a merged model's score against its two parents' (Lu, Luu & Buehler 2024, Fig. 7).

E = (P1 + P2) / 2 is what a merge would score if it only averaged its parents; above
max(P1, P2) it beats both. Pure arithmetic on evaluation results, for any metric where
higher is better.
"""

from __future__ import annotations

from typing import Dict

VERDICTS = ("beats both parents", "above the parents' mean", "below the parents' mean")


def synergy(p1: float, p2: float, merged: float) -> Dict[str, object]:
    expected = (p1 + p2) / 2
    best = max(p1, p2)
    if merged > best:
        verdict = VERDICTS[0]
    elif merged > expected:
        verdict = VERDICTS[1]
    else:
        verdict = VERDICTS[2]
    return dict(p1=p1, p2=p2, merged=merged, expected=expected, best_parent=best,
                merged_minus_expected=merged - expected, merged_minus_best=merged - best, verdict=verdict)
