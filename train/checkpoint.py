"""Run directories: where checkpoints go, which one to resume from, and how the final model
is published so that a half-written one never looks finished.

    <output_dir>/checkpoints/checkpoint-<step>/   DeepSpeed checkpoints (every save_steps)
    <output_dir>/config.json, model*.safetensors, tokenizer*, domainforge.yaml
                                                  the final model; config.json is moved in last
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from core.errors import UserError

CHECKPOINTS = "checkpoints"
FINAL_TMP = ".final-tmp"
RUN_CONFIG = "domainforge.yaml"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def is_complete_checkpoint(ckpt: Path) -> bool:
    """The HF Trainer writes trainer_state.json after the DeepSpeed shards and `latest`."""
    if not (ckpt / "trainer_state.json").is_file():
        return False
    latest = ckpt / "latest"
    if not latest.is_file():
        return False
    tag = latest.read_text().strip()
    return (ckpt / tag).is_dir() and any((ckpt / tag).iterdir())


def newest_complete_checkpoint(output_dir: str | Path) -> Optional[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return None
    found = []
    for ckpt in root.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", ckpt.name)
        if m and is_complete_checkpoint(ckpt):
            found.append((int(m.group(1)), ckpt))
    return max(found)[1] if found else None


def resume_checkpoint(output_dir: str, resume: str) -> Optional[str]:
    """What to pass to `trainer.train(resume_from_checkpoint=...)`."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpt = newest_complete_checkpoint(output_dir)
        return str(ckpt) if ckpt else None
    path = Path(resume)
    if not is_complete_checkpoint(path):
        raise UserError(
            f"resume={resume} is not a complete checkpoint (needs trainer_state.json and a DeepSpeed "
            "`latest` tag): use resume=auto, resume=never or a checkpoint-<step> directory"
        )
    return str(path)


def publish_final_model(output_dir: str | Path) -> None:
    """Move the final model from <output_dir>/.final-tmp into place, config.json last."""
    out = Path(output_dir)
    tmp = out / FINAL_TMP
    files = sorted(p for p in tmp.iterdir() if p.name != "config.json")
    for src in files:
        dst = out / src.name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    os.replace(tmp / "config.json", out / "config.json")
    tmp.rmdir()
