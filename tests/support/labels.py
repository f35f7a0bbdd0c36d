"""What a prepared row trains on, read back from its labels."""

from __future__ import annotations

from train.data import IGNORE_INDEX


def trained_spans(ids, labels):
    """The runs of consecutive tokens that carry a loss (each label the token itself)."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token, "a trained label must be the token itself"
            current.append(token)
    return spans + ([current] if current else [])
