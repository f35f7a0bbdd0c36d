"""The output shards: the planned tensors packed in order into safetensors files of at most a
given size, each file's header and tensor offsets known before any arithmetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

from core.errors import UserError
from merge.io import shard_header
from merge.plan import TensorPlan


@dataclass
class ShardPlan:
    filename: str
    tensors: List[TensorPlan]
    offsets: List[int]
    """Absolute byte offset of each tensor in the file."""
    head: bytes
    size: int


_SIZE_UNITS = {
    "": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
    "B": 10**9,  # mergekit's --out-shard-size 5B means five billion
    "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(text) -> int:
    """Bytes from '2GB', '500MB', '1.5GiB', '5B' (mergekit's 5 billion) or a plain number."""
    if isinstance(text, int) and text > 0:
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m[2].upper() if m else None
    if not m or unit not in _SIZE_UNITS or float(m[1]) <= 0:
        raise UserError(f"shard size '{text}' is not a size: write e.g. 2GB, 500MB or 1GiB")
    return int(float(m[1]) * _SIZE_UNITS[unit])


def plan_output_shards(tensors: List[TensorPlan], max_shard_bytes: int) -> List[ShardPlan]:
    """Pack tensors in order into shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own), named as transformers names them."""
    groups: List[List[TensorPlan]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    shards = []
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        head, offsets = shard_header([(t.name, t.out_dtype, t.shape, t.nbytes) for t in group], {"format": "pt"})
        shards.append(ShardPlan(name, group, offsets, head, len(head) + sum(t.nbytes for t in group)))
    return shards
