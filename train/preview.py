"""Look before spending GPUs: the training samples a stage gets, with their loss masks, and a
per-GPU memory estimate for the model, ZeRO stage, offload and batch.

The samples come from the stage's own `prepare_data` (train/data/), on the resolved training
config, so they are exactly what the trainer gets; only the tokenizer is loaded (no weights, no
DeepSpeed, one CPU process). The memory estimate (train/memory.py) needs only config.json.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

from core.cli import ConfigCommand
from core.errors import UserError
from train.config import TrainJobConfig, compose_train_config
from train.data import IGNORE_INDEX

MASKED_OPEN, MASKED_CLOSE = "[-100: ", "]"
"""How a span without loss (labels -100: prompts, system and user turns, padding) is shown."""

PREVIEW_FLAGS = (
    ("--samples N", "how many prepared training rows to show (default 3; 0: the stats alone)"),
    ("--memory", "print the per-GPU memory estimate instead of samples (needs only config.json)"),
    ("--gpus N", "GPUs per node for the memory estimate (default 1)"),
    ("--nodes N", "nodes for the memory estimate (default 1)"),
    ("--gpu-memory GIB", "GPU memory in GiB to compare the estimate against (e.g. 80)"),
)
FLAG_DEFAULTS = {"--samples": 3, "--gpus": 1, "--nodes": 1, "--gpu-memory": None}


def parse_flags(argv: List[str]) -> Tuple[Dict[str, object], List[str]]:
    """Split the preview's own flags (`--samples 3` or `--samples=3`) from the overrides."""
    flags: Dict[str, object] = dict(FLAG_DEFAULTS, **{"--memory": False})
    rest, args = [], iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name == "--memory":
            flags[name] = True
        elif name in FLAG_DEFAULTS:
            value = value or next(args, "")
            flags[name] = _number(name, value)
        else:
            rest.append(arg)
    return flags, rest


def _number(flag: str, value: str):
    try:
        number = float(value) if flag == "--gpu-memory" else int(value)
    except ValueError:
        number = 0
    if number < 0 or (number == 0 and flag != "--samples"):  # --samples 0: the stats alone
        example = 80 if flag == "--gpu-memory" else 8
        raise UserError(f"{flag} needs a positive number (got '{value}'): e.g. {flag} {example}")
    return number


PREVIEW_COMMAND = ConfigCommand(
    "preview.py", "config", TrainJobConfig, compose_train_config,
    keys=("model.path", "data.cpt.path", "data.sft.path", "data.preference.path", "training.max_seq_length",
          "training.per_device_train_batch_size", "training.gradient_checkpointing"),
    example="+stage=sft data.sft.path=my_chats.jsonl",
    flags=PREVIEW_FLAGS,
)
"""launch/preview.py's command line: the training config (as launch/train.py composes it) plus
PREVIEW_FLAGS."""


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def prepared_data(cfg):
    """The stage's PreparedData and the tokenizer, as train/run.py prepares them."""
    from train.model import load_tokenizer
    from train.run import check_limits
    from train.stages import get_stage

    tokenizer = load_tokenizer(cfg.model)
    check_limits(cfg)
    return get_stage(cfg.stage.name).prepare_data(cfg, tokenizer), tokenizer


def loss_segments(input_ids: List[int], labels: List[int]) -> List[Tuple[bool, List[int]]]:
    """Runs of consecutive tokens that are trained (True) or masked (False)."""
    return [(trained, [t for t, _ in run]) for trained, run in
            itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)]


def render_masked(tokenizer, input_ids: List[int], labels: List[int]) -> str:
    """The row's text with every span the loss skips wrapped in MASKED_OPEN ... MASKED_CLOSE."""
    parts = []
    for trained, ids in loss_segments(input_ids, labels):
        text = tokenizer.decode(ids)
        parts.append(text if trained else f"{MASKED_OPEN}{text}{MASKED_CLOSE}")
    return "".join(parts)


def describe_row(row: dict, tokenizer) -> str:
    """One prepared row: a token-labelled row (CPT, SFT) or a preference pair."""
    if "prompt_ids" in row:
        prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        return (f"tokens: prompt {len(prompt)} (no loss), chosen {len(chosen)}, rejected {len(rejected)}\n"
                f"{MASKED_OPEN}{tokenizer.decode(prompt)}{MASKED_CLOSE}\n"
                f"--- chosen:\n{tokenizer.decode(chosen)}\n--- rejected:\n{tokenizer.decode(rejected)}")
    ids, labels = list(row["input_ids"]), list(row["labels"])
    trained = sum(label != IGNORE_INDEX for label in labels)
    examples = f", {len(row['seq_lengths'])} packed examples" if "seq_lengths" in row else ""
    if "loss_kind" in row:  # a mixed row (train/data/mixed.py): how many examples of each kind
        examples += f" ({example_kinds(row)})"
    return f"tokens: {len(ids)}, trained: {trained}{examples}\n{render_masked(tokenizer, ids, labels)}"


def example_kinds(row: dict) -> str:
    """`text 2, chat 1`: the kinds of the examples in a mixed row."""
    from train.data.mixed import KIND_NAMES

    starts = itertools.accumulate([0, *row.get("seq_lengths", [len(row["input_ids"])])[:-1]])
    kinds = [KIND_NAMES[row["loss_kind"][start]] for start in starts]
    return ", ".join(f"{name} {kinds.count(name)}" for name in KIND_NAMES.values() if name in kinds)


def format_stats(stats: Dict[str, float]) -> str:
    """One line per stat; a mix's token share also as tokens (of `dataset_tokens`, when counted)."""
    lines = []
    for key, value in stats.items():
        line = f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}"
        if key.startswith("mix/") and key.endswith("/tokens") and "dataset_tokens" in stats:
            line += f" ({round(value * stats['dataset_tokens'])} tokens)"
        lines.append(line)
    return "dataset stats (what training logs at its start):\n" + "\n".join(lines)


def preview_text(cfg, samples: int) -> str:
    """The first `samples` training rows of cfg's stage, rendered with their loss masks, and the
    prepared dataset's stats (block counts, packing efficiency, a mix's per-source tokens)."""
    data, tokenizer = prepared_data(cfg)
    rows = list(itertools.islice(iter(data.train_dataset), samples))
    where = f"stage {cfg.stage.name}, data {cfg.data.name}, max_seq_length {cfg.training.max_seq_length}"
    shown = [f"=== sample {i} ===\n{describe_row(row, tokenizer)}" for i, row in enumerate(rows)]
    legend = f"spans in {MASKED_OPEN}...{MASKED_CLOSE} get no loss (labels -100); the rest is trained"
    return "\n\n".join([f"preview of {where}; {legend}", *shown, format_stats(data.stats)]) + "\n"


def preview(argv: List[str], doc: str) -> str:
    """launch/preview.py: the samples, or with --memory the estimate."""
    flags, rest = parse_flags(argv)
    cfg = PREVIEW_COMMAND.config(rest, doc)
    if flags["--memory"]:
        from train.memory import estimate_for_config, format_estimate

        estimate = estimate_for_config(cfg, flags["--gpus"], flags["--nodes"])
        return format_estimate(estimate, flags["--gpu-memory"])
    return preview_text(cfg, flags["--samples"])
