"""Training checkpoints as files, readable without torch (the planner checks a resume on the
login node): which checkpoint a run resumes from, and the DeepSpeed topology it was written on.

    <output_dir>/checkpoints/checkpoint-<step>/
        trainer_state.json, rng_state*.pth          the HF Trainer's state (written last)
        batch.json                                  world size, per-device batch, accumulation, epochs, max_steps
        latest                                      the DeepSpeed tag, e.g. global_step8
        global_step8/                               DeepSpeed's files; their names give the topology:
            zero_pp_rank_<r>_mp_rank_00_model_states.pt       ZeRO-3, one per data-parallel rank
            [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt  every partitioned optimizer, one per rank
            mp_rank_00_model_states.pt                        ZeRO-0/1/2, one for all ranks
        latest_universal, global_step8_universal/   the same state, any world size (made on demand
                                                    by train/reshard.py when the world size changed)
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.errors import UserError

CHECKPOINTS = "checkpoints"
BATCH_RECORD = "batch.json"  # beside trainer_state.json: the world size, batch and plan that wrote it (train/reshard.py)
UNIVERSAL_LATEST = "latest_universal"  # DeepSpeed's name (engine.load_checkpoint with load_universal)
CONVERSION_FAILED = "universal-conversion-failed"  # rank 0's note to the ranks waiting for it


def recorded_global_batch(ckpt: str | Path) -> Optional[int]:
    """The global batch the run that wrote `ckpt` trained with (its batch.json: per-device batch
    x accumulation x ranks); None for a checkpoint without one."""
    record = Path(ckpt) / BATCH_RECORD
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    return saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"] * saved["world_size"]


def planned_max_steps(ckpt: str | Path, num_train_epochs: float, max_steps: int) -> Optional[int]:
    """The optimizer steps the run that wrote `ckpt` planned (its trainer_state.json), for a
    resume that plans the same: by epochs (max_steps=-1), as many. The Trainer recomputes
    max_steps and the epochs already trained from the new dataloader; pinned, they cannot
    follow a new world size. None: this run sets its own plan (max_steps, other epochs)."""
    if max_steps > 0:
        return None
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    record = Path(ckpt) / BATCH_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if "num_train_epochs" in saved:
        same_plan = saved["max_steps"] <= 0 and saved["num_train_epochs"] == num_train_epochs
    else:  # written before batch.json held the plan: the Trainer's rounded-up epoch count
        same_plan = state.get("num_train_epochs") == math.ceil(num_train_epochs)
    return state.get("max_steps") if same_plan and state.get("max_steps", 0) > 0 else None


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def is_complete_checkpoint(ckpt: Path) -> bool:
    """The HF Trainer writes trainer_state.json after the DeepSpeed shards and `latest`, in
    place: a disk that filled while it was written leaves it cut short, not valid JSON."""
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, ValueError):
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


@dataclass(frozen=True)
class CheckpointTopology:
    """What DeepSpeed's file names say about the run that wrote a checkpoint."""

    world_size: Optional[int]
    """Data-parallel ranks whose partitions it holds; None: not partitioned (ZeRO-0 in fp32/fp16),
    any world size loads it."""
    zero3: bool
    """Parameters partitioned too (ZeRO-3): per-rank model_states files instead of one."""


def checkpoint_topology(ckpt: str | Path) -> CheckpointTopology:
    """Read from the names of DeepSpeed's files under the `latest` tag, not from a record of our
    own: checkpoints written by earlier versions of this project are read too."""
    tag_dir = Path(ckpt) / (Path(ckpt) / "latest").read_text().strip()
    # mp_rank_00: tensor parallelism is not used here; each data-parallel rank writes one file.
    model_states = list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))
    optim_states = list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    world_size = len(model_states) or len(optim_states) or None
    return CheckpointTopology(world_size=world_size, zero3=bool(model_states))


def check_resume_topology(
    ckpt: str | Path, zero_stage: int, world_size: int, nvme_offload: bool = False
) -> CheckpointTopology:
    """Refuse, in one line, a resume DeepSpeed cannot make, or whose conversion the disk cannot
    hold; a changed world size alone is converted at start-up (train/reshard.py). DeepSpeed 0.19.8 cannot:
    - load a ZeRO-3 checkpoint into ZeRO-0/1/2 or the other way round, universal checkpoint or
      not (engine._get_all_ckpt_names looks for the other family's model_states files);
    - re-partition an optimizer offloaded to NVMe (load_checkpoint copies each rank's swap
      folder, offloaded_tensors/rank<r>, and skips the universal path)."""
    topology = checkpoint_topology(ckpt)
    if topology.zero3 != (zero_stage == 3):
        written = "deepspeed.zero_stage=3" if topology.zero3 else "deepspeed.zero_stage 0, 1 or 2"
        raise UserError(
            f"resume: {ckpt} was written with {written} and this run sets deepspeed.zero_stage={zero_stage}; "
            f"DeepSpeed cannot load it into another ZeRO stage family: set {written} again, or resume=never to "
            "start over (resume=auto resumes from the newest checkpoint)"
        )
    if nvme_offload and topology.world_size not in (None, world_size):
        raise UserError(
            f"resume: {ckpt} was written on {topology.world_size} ranks and this run has {world_size}; DeepSpeed "
            "cannot re-partition an optimizer offloaded to NVMe: run on "
            f"{topology.world_size} ranks, or resume=never to start over"
        )
    if topology.world_size not in (None, world_size) and not has_universal_checkpoint(ckpt):
        check_conversion_space(ckpt)
    return topology


def has_universal_checkpoint(ckpt: str | Path) -> bool:
    """Whether `ckpt` holds a finished universal copy (train/reshard.py writes `latest_universal` last)."""
    latest = Path(ckpt) / UNIVERSAL_LATEST
    return latest.is_file() and (Path(ckpt) / latest.read_text().strip() / "zero").is_dir()


def conversion_disk_need(ckpt: str | Path) -> int:
    """Bytes to have free before converting `ckpt` into a universal checkpoint: DeepSpeed's
    converter writes every partition's fragments into a temporary folder, then the whole
    tensors beside them (each as large as the optimizer files: fp32 weights and two Adam
    moments, 12 bytes per parameter), then one old rank's optimizer file as it is (slimmed
    afterwards): 24 + 12 / old ranks bytes per parameter at its peak. Measured on the tiny model
    saved on 2 ranks (tests/test_reshard.py): 101.6 MB at the peak for 41.1 MB of optimizer
    files, 2.47 times; this gives 2.5."""
    tag_dir = Path(ckpt) / (Path(ckpt) / "latest").read_text().strip()
    sizes = [f.stat().st_size for f in tag_dir.glob("*_optim_states.pt")]
    return 2 * sum(sizes) + max(sizes, default=0)


def check_conversion_space(ckpt: str | Path) -> None:
    """Refuse, in one line, a conversion the disk under `ckpt` cannot hold: DeepSpeed's converter
    would fail part way, after minutes, with its temporary folder filling the disk."""
    need, free = conversion_disk_need(ckpt), shutil.disk_usage(ckpt).free
    if free < need:
        raise UserError(
            f"resume: converting {ckpt} for another world size needs {need / 1e9:.2f} GB free under {ckpt} "
            f"(about 24 bytes per parameter while DeepSpeed's converter runs) and {free / 1e9:.2f} GB are: free "
            "space there, or resume on the world size that wrote it"
        )
