"""Read an offline W&B run (`run-<id>.wandb`) back into history rows.

wandb 0.31 no longer ships a Python reader for its transaction log, so this follows the
format it writes: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log blocks of
32 KiB holding records (crc32, length, type) whose payloads are `Record` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer: padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            break  # zero padding at the end of a file still being written
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(pending)
        yield rec


def history(path: Path) -> List[Dict[str, object]]:
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path: Path) -> Dict[str, object]:
    """The run record: project, entity, group, job type, name and config of an offline run."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            run = rec.run
            config = {item.key: json.loads(item.value_json) for item in run.config.update}
            return {"project": run.project, "entity": run.entity, "group": run.run_group, "job_type": run.job_type, "name": run.display_name, "config": config}
    raise AssertionError(f"{path} has no run record")


def find_offline_runs(root: Path) -> List[Path]:
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))
