"""Schemas of launch/augment.py: conf/augment_job.yaml composes `augment=<preset>` (conf/augment/),
`data=<preset>` (its `cpt` corpus is read, as a CPT stage reads it) and `model=<preset>` (its
tokenizer counts tokens; method=rewrite generates with it) onto AugmentJobConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING, DictConfig

from core.cli import ConfigCommand
from core.config import compose_config
from core.validate import at_least, checked, non_negative, one_of, unit_interval, writable_dir
from train.augment.methods import augment_method, method_names
from train.config import DataConfig, ModelConfig


# WRAP (Maini et al. 2024, arXiv 2401.16380, Appendix): the assistant's system prompt and the
# four rephrasing styles it trained on, word for word; `{document}` is where the text goes.
WRAP_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the questions."
)
WRAP_PROMPTS = {
    "easy": "For the following paragraph give me a paraphrase of the same using a very small vocabulary and "
            "extremely simple sentences that a toddler will understand:\n\n{document}",
    "wikipedia": "For the following paragraph give me a diverse paraphrase of the same in high quality English "
                 "language as in sentences on Wikipedia:\n\n{document}",
    "hard": "For the following paragraph give me a paraphrase of the same using very terse and abstruse language "
            "that only an erudite scholar will understand. Replace simple words and phrases with rare and complex "
            "ones:\n\n{document}",
    "qa": "Convert the following paragraph into a conversational format with multiple tags of \"Question:\" "
          "followed by \"Answer:\":\n\n{document}",
}


@dataclass
class RulesConfig:
    """method=rules: no model, runs anywhere (train/augment/rules.py; docs/augment.md)."""

    tasks: List[str] = field(default_factory=lambda: ["fill_blank", "qa_of", "qa_has", "title", "completion"])
    """Reading-comprehension patterns (AdaptLLM) mined from each document and appended to it: names in
    rules.TASKS (add your own with `plugins`)."""
    max_tasks: int = checked(12, at_least(0))
    """At most this many tasks appended to one document (a seeded sample when more are found)."""
    copies: int = checked(2, non_negative)
    """Permuted copies of each document (Allen-Zhu & Li): each applies every `permutations` entry."""
    permutations: List[str] = field(default_factory=lambda: ["full_name", "shuffle_sentences"])
    """Names in rules.PERMUTATIONS, applied in this order to each copy."""
    plugins: List[str] = field(default_factory=list)
    """Python modules imported first, e.g. [mydomain.patterns]: they register tasks and permutations
    with rules.register_task / rules.register_permutation (docs/augment.md)."""


@dataclass
class RewriteConfig:
    """method=rewrite: `model` rewrites each document in every style (train/augment/rewrite.py)."""

    styles: List[str] = field(default_factory=lambda: ["wikipedia", "qa"])
    """Names in `prompts`: each document is rewritten once per style."""
    prompts: Dict[str, str] = field(default_factory=lambda: dict(WRAP_PROMPTS))
    """Style -> prompt template; each holds the `{document}` slot. Defaults: WRAP's four styles."""
    system_prompt: Optional[str] = WRAP_SYSTEM_PROMPT
    """System turn when the tokenizer has a chat template; null: none."""
    backend: str = checked("transformers", one_of("transformers", "vllm"))
    """transformers (`generate`, batched, left padding) or vllm (pip install vllm; GPUs)."""
    batch_size: int = checked(8, at_least(1))
    """Documents per `generate` call."""
    max_new_tokens: int = checked(512, at_least(1))
    temperature: float = checked(0.0, non_negative)
    """0: greedy; > 0 samples (seeded)."""
    top_p: float = checked(0.9, unit_interval)
    keep_source: bool = True
    """Also keep every source document in the output (WRAP trains on real and rewritten text)."""
    filter: bool = True
    """Fact-preservation filter: drop a rewrite that loses or changes a number (with its unit) or a named
    entity of its source; the manifest counts each drop by reason."""
    shards: Optional[int] = checked(None, at_least(1))
    """Shards of the documents, each written and marked done on its own (a rerun keeps them); the ranks of
    the job (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) take shards k, k+n, ... None: one per rank."""
    dtype: str = checked("auto", one_of("auto", "float32", "bfloat16", "float16"))
    """auto: training's rule (core/precision.py): bfloat16 where the GPU or CPU computes it natively,
    else float16 on GPUs and float32 on CPUs."""


ENTIGRAPH_PROMPT = (
    "Here is a document:\n\n{document}\n\nDiscuss how {entity_a} and {entity_b} are related in the context of "
    "this document. Use only facts that the document states, and name both of them."
)


@dataclass
class EntiGraphConfig:
    """method=entigraph: the model writes about pairs of each document's entities (train/augment/entigraph.py);
    generation settings (backend, batch_size, max_new_tokens, shards, keep_source) are augment.rewrite's."""

    pairs: int = checked(3, at_least(1))
    """At most this many entity pairs per document (a seeded sample)."""
    prompt: str = ENTIGRAPH_PROMPT
    """Holds {document}, {entity_a} and {entity_b}."""


@dataclass
class RepeatConfig:
    """method=repeat: the raw corpus repeated to another augmented corpus's token count (the fair control)."""

    match: Optional[str] = None
    """An augmented dataset (a launch/augment.py output_dir): repeat to its manifest's tokens_out."""
    tokens: Optional[int] = checked(None, at_least(1))
    """Or a token count; set one of `match` and `tokens`."""


@dataclass
class AugmentConfig:
    """One preset of conf/augment/ (augment=<name>)."""

    name: str = MISSING
    method: str = checked(MISSING, one_of(*method_names()))
    """rules, rewrite, entigraph or repeat."""
    rules: RulesConfig = field(default_factory=RulesConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    entigraph: EntiGraphConfig = field(default_factory=EntiGraphConfig)
    repeat: RepeatConfig = field(default_factory=RepeatConfig)


@dataclass
class AugmentJobConfig:
    """Root of launch/augment.py (conf/augment_job.yaml)."""

    augment: AugmentConfig = MISSING
    data: DataConfig = MISSING
    """Only data.cpt is read: a path or a mix of sources, in every format a CPT stage reads."""
    model: ModelConfig = MISSING
    """Its tokenizer counts tokens in and out; method=rewrite generates with the model (model.path, or a GGUF
    preset such as model=smollm2_135m)."""
    output_dir: str = checked(MISSING, writable_dir)
    """The augmented dataset (save_to_disk, column `text`: data.cpt.path=<output_dir>) and manifest.json."""
    seed: int = checked(42, non_negative)
    """Every random choice (task sample, sentence order, sampling) derives from it."""


def check_augment(cfg: DictConfig) -> None:
    """How the chosen method's fields relate (the field checks cannot say it): its `check`."""
    augment_method(cfg.augment.method).check(cfg.augment)


def compose_augment_config(argv: List[str]) -> DictConfig:
    """The augmentation job's config from `launch/augment.py` arguments."""
    return compose_config(argv, "augment_job", AugmentJobConfig, check=check_augment)


AUGMENT_COMMAND = ConfigCommand(
    "augment.py", "augment_job", AugmentJobConfig, compose_augment_config,
    keys=("output_dir", "data.cpt.path", "model.path", "augment.rewrite.styles", "augment.rewrite.backend", "seed"),
    example="augment=rules data.cpt.path=my_corpus.jsonl output_dir=outputs/augment/rules",
)
"""launch/augment.py's command line: --help, --cfg, or the config to augment with."""
