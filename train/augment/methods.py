"""The augment-method registry: every `augment.method` by name (shaped like merge/methods/).

To add a method: an `AugmentMethod` subclass below (its name, whether it generates with the
model, its `check`, `preflight`, and its `texts` or `task`), its settings block in config.py
(`AugmentConfig.<name>`) and a preset in conf/augment/. The config's method check, the job
(run.py) and the SLURM task count (orchestration/job_scripts.py) read these declarations; nothing
else changes. No heavy import here: login-node code composes augment configs.
"""

from __future__ import annotations

import random
from typing import ClassVar, Dict, List

from core.errors import UserError
from core.outputs import AUGMENT_MANIFEST, is_augmented_dataset, read_augment_manifest
from train.augment import generation
from train.augment import rewrite as rewriting
from train.augment.entigraph import ENTITY_SLOTS, entigraph_task
from train.augment.rewrite import DOCUMENT_SLOT, ModelTask
from train.augment.rules import augment_document, check_rules


class AugmentMethod:
    """One augment method. Rank-0 methods return their `texts`; model methods give each rank a
    `task` over its shards (run.run_rewrite), with augment.rewrite's generation settings."""

    name: ClassVar[str]
    uses_model: ClassVar[bool] = False
    """Generates with `model`, sharded over every rank of the job; otherwise rank 0 does it all."""

    def check(self, augment) -> None:
        """How the method's fields relate (at composition): UserError naming the field."""

    def preflight(self, augment) -> None:
        """What this machine must have (plugins, a backend), checked before the corpus is read."""

    def texts(self, cfg, documents: List[str], count) -> List[str]:
        """Rank-0 methods: the augmented corpus; `count` counts tokens with model's tokenizer."""
        raise NotImplementedError

    def task(self, cfg) -> ModelTask:
        """Model methods: what the model is asked for each document, and how its answer is judged."""
        raise NotImplementedError


class ModelMethod(AugmentMethod):
    uses_model = True

    def preflight(self, augment) -> None:
        generation.check_backend(augment.rewrite.backend)


class Rules(AugmentMethod):
    """Reading-comprehension tasks and permuted copies, no model (rules.py)."""

    name = "rules"

    def preflight(self, augment) -> None:
        check_rules(augment.rules)

    def texts(self, cfg, documents: List[str], count) -> List[str]:
        from tqdm import tqdm

        out = []
        for index, text in enumerate(tqdm(documents, desc="augment rules", unit="doc", mininterval=2)):
            out += augment_document(text, index, cfg.augment.rules, cfg.seed)
        return out


class Rewrite(ModelMethod):
    """WRAP: each document rewritten once per style, keeping its facts (rewrite.py)."""

    name = "rewrite"

    def check(self, augment) -> None:
        rewrite = augment.rewrite
        if not rewrite.styles:
            raise UserError("augment.rewrite.styles is empty: name at least one style of augment.rewrite.prompts")
        for style in rewrite.styles:
            if style not in rewrite.prompts:
                raise UserError(
                    f"augment.rewrite.styles names '{style}', which is not in augment.rewrite.prompts "
                    f"({', '.join(rewrite.prompts)}): add augment.rewrite.prompts.{style}='...{DOCUMENT_SLOT}...'"
                )
            if DOCUMENT_SLOT not in rewrite.prompts[style]:
                raise UserError(
                    f"augment.rewrite.prompts.{style} has no {DOCUMENT_SLOT} slot: put {DOCUMENT_SLOT} where the "
                    "document goes in the prompt"
                )

    def task(self, cfg) -> ModelTask:
        return rewriting.wrap_task(cfg.augment.rewrite)


class EntiGraph(ModelMethod):
    """The model writes about pairs of each document's entities (entigraph.py)."""

    name = "entigraph"

    def check(self, augment) -> None:
        for slot in (DOCUMENT_SLOT, *ENTITY_SLOTS):
            if slot not in augment.entigraph.prompt:
                raise UserError(f"augment.entigraph.prompt has no {slot} slot: put {slot} where it goes in the prompt")

    def task(self, cfg) -> ModelTask:
        return entigraph_task(cfg.augment.entigraph, cfg.seed)


class Repeat(AugmentMethod):
    """The raw corpus repeated to another augmented corpus's token count (the fair control)."""

    name = "repeat"

    def check(self, augment) -> None:
        if (augment.repeat.match is None) == (augment.repeat.tokens is None):
            raise UserError(
                "augment.method=repeat needs exactly one of augment.repeat.match=<augmented output_dir> or "
                "augment.repeat.tokens=<count>"
            )

    def texts(self, cfg, documents: List[str], count) -> List[str]:
        """Whole copies of the corpus, then a seeded sample of its documents, until the target token count."""
        repeat = cfg.augment.repeat
        target = repeat.tokens
        if repeat.match is not None:
            if not is_augmented_dataset(repeat.match):
                raise UserError(f"augment.repeat.match={repeat.match} is not a finished augmented dataset (no "
                                f"{AUGMENT_MANIFEST}): run that augmentation first")
            target = read_augment_manifest(repeat.match)["tokens_out"]
        lengths = [count([t]) for t in documents]
        copies, rest = divmod(target, sum(lengths))
        out = list(documents) * copies
        order = list(range(len(documents)))
        random.Random(cfg.seed).shuffle(order)
        for i in order:
            if rest <= 0:
                break
            out.append(documents[i])
            rest -= lengths[i]
        return out


_METHODS: Dict[str, AugmentMethod] = {method.name: method for method in (Rules(), Rewrite(), EntiGraph(), Repeat())}


def augment_method(name: str) -> AugmentMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise UserError(f"unknown augment.method '{name}': use one of {', '.join(_METHODS)}") from None


def method_names() -> List[str]:
    return list(_METHODS)
