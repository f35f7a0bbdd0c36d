"""What a finished output looks like, shared by every step that writes one.

Training, merging and evaluation all publish so that a half-written result never looks
finished: a model directory counts as finished only once its `config.json` exists (it is moved
in last), and small files (markers, reports) are replaced atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Models converted once for reuse (GGUF files dequantized to safetensors); DOMAINFORGE_CACHE
# moves it, e.g. to a shared filesystem that every node sees.
EVAL_DIR = "eval"
"""Where a model's evaluation results live: <model dir>/eval/<task>.json."""
MODEL_CACHE_DIR = Path(os.environ.get("DOMAINFORGE_CACHE", Path.home() / ".cache" / "domainforge"))


AUGMENT_MANIFEST = "manifest.json"
"""Written last into an augmented dataset (launch/augment.py): its presence means finished."""


VALUE_LOSS_FILE = "value_loss.jsonl"
"""<training output_dir>/value_loss.jsonl: the loss on the value tokens of training.value_probe's
documents after each epoch (train/value_probe.py), which the study report reads."""


def is_augmented_dataset(path: str | Path) -> bool:
    """A finished augmentation output: a saved dataset whose manifest.json is published with it."""
    return (Path(path) / AUGMENT_MANIFEST).is_file()


def read_augment_manifest(path: str | Path) -> dict:
    return json.loads((Path(path) / AUGMENT_MANIFEST).read_text())


def is_model_dir(path: str | Path) -> bool:
    """A finished Hugging Face model directory: config.json is published last."""
    return (Path(path) / "config.json").is_file()


def epoch_model_dir(output_dir: str | Path, epoch: int) -> Path:
    """Where a training run keeps the model that ended epoch `epoch` (training.keep_epoch_models),
    and where a pipeline's evaluation of it looks."""
    return Path(output_dir) / "epochs" / f"epoch-{epoch}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
