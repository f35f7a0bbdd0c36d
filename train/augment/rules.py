"""Rule-based augmentation, no model: reading-comprehension tasks mined from each document with
patterns and appended to it (AdaptLLM: Cheng et al., ICLR 2024, arXiv 2309.09530), and permuted
copies of it (Allen-Zhu & Li, "Physics of Language Models 3.1", arXiv 2309.14316: sentence order
shuffled, pronouns replaced by the full name, so a fact is seen in several wordings).

Both are registries: a task is `fn(document) -> [task text]`, a permutation is
`fn(document, rng) -> [sentences]`; register your own with `@register_task("name")` /
`@register_permutation("name")` in a module named in `augment.rules.plugins` (docs/augment.md).
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from core.errors import UserError
from train.augment.text import entities, quantities, sentences, subject_of

TASKS_HEADER = "Reading comprehension on the text above."
BLANK = "____"


@dataclass
class Document:
    """One source document, split once for every pattern."""

    text: str
    sentences: List[str]
    subject: Optional[str]

    @classmethod
    def of(cls, text: str) -> "Document":
        split = sentences(text)
        return cls(text, split, subject_of(text, split))


Task = Callable[[Document], List[str]]
Permutation = Callable[[Document, random.Random], List[str]]
TASKS: Dict[str, Task] = {}
PERMUTATIONS: Dict[str, Permutation] = {}


def register_task(name: str) -> Callable[[Task], Task]:
    """Decorator: `@register_task("my_pattern")` makes `augment.rules.tasks=[..., my_pattern]` valid."""
    def add(fn: Task) -> Task:
        TASKS[name] = fn
        return fn
    return add


def register_permutation(name: str) -> Callable[[Permutation], Permutation]:
    def add(fn: Permutation) -> Permutation:
        PERMUTATIONS[name] = fn
        return fn
    return add


# ---------------------------------------------------------------------------------------------
# reading-comprehension tasks
# ---------------------------------------------------------------------------------------------
@register_task("fill_blank")
def fill_blank(doc: Document) -> List[str]:
    """A sentence that carries a number (with its unit) or a name, that value blanked out."""
    tasks = []
    for sentence in doc.sentences:
        with_unit = [q for q in quantities(sentence) if q.unit]
        names = sorted(entities(sentence), key=sentence.find)
        answer = with_unit[0].text if with_unit else (names[0] if names else None)
        if answer is None:
            continue
        blanked = sentence.replace(answer, BLANK, 1)
        tasks.append(f"Fill in the blank: {blanked}\nAnswer: {answer}")
    return tasks


QA_OF = re.compile(r"^The (?P<attr>[a-z][\w -]{2,60}?) of (?P<subject>[\w() -]{2,40}?) is (?P<value>.+?)\.$")
QA_HAS = re.compile(r"^(?P<subject>[A-Z][\w-]{1,40}(?: [\w-]+)?) has an? (?P<attr>[a-z][\w -]{2,60}?) of "
                    r"(?P<value>(?:(?! and ).)+?)\.$")


@register_task("qa_of")
def qa_of(doc: Document) -> List[str]:
    """"The X of Y is Z." -> "Question: What is the X of Y? Answer: Z." """
    tasks = []
    for sentence in doc.sentences:
        m = QA_OF.match(sentence)
        if m:
            tasks.append(f"Question: What is the {m['attr']} of {m['subject']}?\nAnswer: {m['value']}.")
    return tasks


@register_task("qa_has")
def qa_has(doc: Document) -> List[str]:
    """"Y has a X of Z." -> "Question: Which X does Y have? Answer: Z." """
    tasks = []
    for sentence in doc.sentences:
        m = QA_HAS.match(sentence)
        if m:
            subject = m["subject"] if m["subject"].split()[0] in entities(sentence) else m["subject"].lower()
            tasks.append(f"Question: Which {m['attr']} does {subject} have?\nAnswer: {m['value']}.")
    return tasks


@register_task("title")
def title(doc: Document) -> List[str]:
    """The first sentence as the one-line summary of a document of several sentences."""
    if len(doc.sentences) < 2:
        return []
    return [f"Question: Summarize the text above in one sentence.\nAnswer: {doc.sentences[0]}"]


@register_task("completion")
def completion(doc: Document) -> List[str]:
    """A sentence of 8 words or more cut in half: complete it."""
    tasks = []
    for sentence in doc.sentences[1:]:  # the first one is the title task's answer
        words = sentence.split()
        if len(words) >= 8:
            half = len(words) // 2
            tasks.append(f"Complete the sentence: {' '.join(words[:half])} ...\nAnswer: {' '.join(words[half:])}")
    return tasks


# ---------------------------------------------------------------------------------------------
# permutations
# ---------------------------------------------------------------------------------------------
PRONOUN = re.compile(r"\b(It|it|Its|its)\b")


@register_permutation("full_name")
def full_name(doc: Document, rng: random.Random) -> List[str]:
    """"It"/"its" -> the document's subject ("barium", "barium's"), so a sentence stands on its own."""
    if not doc.subject:
        return list(doc.sentences)

    def name(match: re.Match) -> str:
        word = match.group(0)
        subject = doc.subject
        if match.start() == 0:
            subject = subject[0].upper() + subject[1:]
        return subject + ("'s" if word.lower() == "its" else "")

    return [PRONOUN.sub(name, s) for s in doc.sentences]


@register_permutation("shuffle_sentences")
def shuffle_sentences(doc: Document, rng: random.Random) -> List[str]:
    shuffled = list(doc.sentences)
    rng.shuffle(shuffled)
    return shuffled


# ---------------------------------------------------------------------------------------------
# one document -> its augmented documents
# ---------------------------------------------------------------------------------------------
def load_plugins(modules: List[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"augment.rules.plugins: cannot import '{module}' ({err}): fix the module name or "
                            "PYTHONPATH") from err


def check_rules(rules) -> None:
    """Every named task and permutation is registered (after the plugins are imported)."""
    load_plugins(list(rules.plugins))
    for key, names, registry in (("tasks", rules.tasks, TASKS), ("permutations", rules.permutations, PERMUTATIONS)):
        for name in names:
            if name not in registry:
                raise UserError(f"augment.rules.{key} names '{name}', which is not registered: choose from "
                                f"{', '.join(sorted(registry))} or register it in a plugin (docs/augment.md)")


def with_tasks(doc: Document, rules, rng: random.Random) -> str:
    """The document with its reading-comprehension tasks appended (at most rules.max_tasks, a seeded sample)."""
    found = [task for name in rules.tasks for task in TASKS[name](doc)]
    if len(found) > rules.max_tasks:
        keep = sorted(rng.sample(range(len(found)), rules.max_tasks))
        found = [found[i] for i in keep]
    if not found:
        return doc.text
    return doc.text.rstrip() + "\n\n" + TASKS_HEADER + "\n\n" + "\n\n".join(found)


def augment_document(text: str, index: int, rules, seed: int) -> List[str]:
    """The documents that stand for source document `index`: itself with its tasks, then
    `rules.copies` permuted copies. Deterministic: each draws from its own seeded generator."""
    doc = Document.of(text)
    out = [with_tasks(doc, rules, random.Random(f"{seed}:{index}:tasks"))]
    for copy in range(rules.copies):
        rng = random.Random(f"{seed}:{index}:copy{copy}")
        permuted = doc
        for name in rules.permutations:
            permuted = Document(doc.text, PERMUTATIONS[name](permuted, rng), doc.subject)
        out.append(" ".join(permuted.sentences))
    return out
