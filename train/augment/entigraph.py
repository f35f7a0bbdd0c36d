"""Entity-pair synthesis (EntiGraph's idea: Yang et al. 2024, arXiv 2409.07431): list the entities of
each document, then have the model write about pairs of them in the context of that document, so
that the relations between a document's entities are stated in new text.

Entities are found by rule (text.entities, and the document's subject), not asked of the model as
EntiGraph does; the generation runs through the same sharded, resumable machinery as the WRAP
rewrite (rewrite.py, generation.py), with its settings (augment.rewrite.backend, batch_size,
max_new_tokens, ...).
A generated text is kept only if it names both entities and states no number with a unit that the
document does not (text.added_quantity): it may leave facts out, but not invent them.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import List, Optional, Tuple

from train.augment.rewrite import ModelTask
from train.augment.text import added_quantity, entities, sentences, subject_of

ENTITY_SLOTS = ("{entity_a}", "{entity_b}")


def document_entities(text: str) -> List[str]:
    """The subject and the named entities of a document, in order of first appearance."""
    found = set(entities(text))
    subject = subject_of(text, sentences(text))
    if subject:
        found.add(subject)
    return sorted(found, key=lambda e: (text.find(e) if e in text else len(text), e))


def entity_pairs(text: str, pairs: int, rng: random.Random) -> List[Tuple[str, str]]:
    """At most `pairs` pairs of the document's entities (a seeded sample when there are more)."""
    every = list(itertools.combinations(document_entities(text), 2))
    if len(every) > pairs:
        every = [every[i] for i in sorted(rng.sample(range(len(every)), pairs))]
    return every


def relation_check(source: str, text: str, pair: Tuple[str, str]) -> Optional[Tuple[str, str]]:
    if not text.strip():
        return "empty", ""
    for entity in pair:
        if not re.search(r"(?<![\w])" + re.escape(entity) + r"(?![\w])", text, flags=re.IGNORECASE):
            return "lost_entity", entity
    invented = added_quantity(source, text)
    return ("added_number", invented) if invented else None


def entigraph_task(entigraph, seed: int) -> ModelTask:
    pairs_of = {}

    def prompts(index: int, document: str) -> List[Tuple[str, str]]:
        pairs = entity_pairs(document, entigraph.pairs, random.Random(f"{seed}:{index}:pairs"))
        asked = []
        for a, b in pairs:
            label = f"{a} | {b}"
            pairs_of[label] = (a, b)
            asked.append((label, entigraph.prompt.replace("{document}", document).replace(
                ENTITY_SLOTS[0], a).replace(ENTITY_SLOTS[1], b)))
        return asked

    def check(source: str, text: str, label: str) -> Optional[Tuple[str, str]]:
        return relation_check(source, text, pairs_of[label])

    return ModelTask(prompts, check)
