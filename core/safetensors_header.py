"""The safetensors header check that every reader of model weights runs first (the merger's
lazy reader, training's model load): a damaged or truncated shard is one line naming the file,
not a traceback from deep inside a loader.

The format is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets: [begin, end]}}, offsets relative to the data area), then the raw tensor bytes.
Standard library only: reading a header costs two small reads, whatever the model size.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from core.errors import UserError

# bytes per element of every safetensors dtype
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors crate's own limit
_FIX = "the file is corrupt or truncated: re-download or re-save that model"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    """Absolute byte offset of the first element in the file."""
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    path: Path
    tensors: Dict[str, TensorInfo]
    metadata: Dict[str, str]


def read_header(path: Path) -> ShardHeader:
    """Parse and check a safetensors header against the file size; UserError if corrupt."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: {size} bytes, too short for a safetensors header; {_FIX}")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise UserError(f"{path}: header length {length} exceeds the file ({size} bytes); {_FIX}")
            raw = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: unreadable safetensors header ({err.__class__.__name__}); {_FIX}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: safetensors header is not a JSON object; {_FIX}")
    data_start = 8 + length
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: malformed header entry for '{name}'; {_FIX}") from err
        info = TensorInfo(dtype, shape, data_start + int(begin), int(end) - int(begin))
        if dtype in DTYPE_SIZES and info.nbytes != info.numel * DTYPE_SIZES[dtype]:
            raise UserError(f"{path}: tensor '{name}' has {info.nbytes} bytes for shape {list(shape)} {dtype}; {_FIX}")
        if data_start + int(end) > size:
            raise UserError(
                f"{path}: tensor '{name}' ends at byte {data_start + int(end)} but the file has {size} bytes; {_FIX}"
            )
        tensors[name] = info
    return ShardHeader(path, tensors, metadata)


def weight_files(model_dir: Path) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """(shard file names, the index's weight_map or None) of a model directory; the names come
    from the index when there is one."""
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return sorted(p.name for p in model_dir.glob("*.safetensors")), None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{index}: not a valid safetensors index (no weight_map); re-save the model") from err
    return sorted(set(weight_map.values())), weight_map


def read_model_headers(model_dir: Path) -> Dict[Path, ShardHeader]:
    """Every shard's header, checked against its file and the index; {} when the directory has
    no safetensors weights (the caller decides whether that is an error)."""
    model_dir = Path(model_dir)
    files, weight_map = weight_files(model_dir)
    headers = {}
    for name in files:
        shard = model_dir / name
        if not shard.is_file():
            raise UserError(f"{model_dir / INDEX_FILE}: lists shard '{name}', which is missing from {model_dir}; "
                            "re-download the model")
        headers[shard] = read_header(shard)
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in headers[model_dir / name].tensors:
                raise UserError(f"{model_dir / INDEX_FILE}: lists '{tensor}' in {name}, whose header lacks it; "
                                "re-download the model")
    return headers
