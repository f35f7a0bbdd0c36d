"""The streaming kernel: each output tensor, chunk by chunk, from the inputs' mapped bytes
through its method's job (merge/methods/) to its offset in the open output shard; a worker's
shards one after another, each marked complete with the merge's fingerprint once it is
fsynced and its header re-read.

Memory stays flat whatever the tensor or model size: one `Buffers` per worker, an I/O chunk of
each input mapped at a time, compute blocks that stay in CPU cache (docs/merge.md, "How it
streams").
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List

import numpy as np

from core.errors import UserError
from core.outputs import write_atomic
from core.safetensors_header import read_header
from merge import methods
from merge.io import ITEMSIZE, ShardWriter, decode, encode, round_through
from merge.methods.numeric import Rounder, TensorContext
from merge.plan import TensorPlan
from merge.shards import ShardPlan

if TYPE_CHECKING:
    from merge.run import Merge

# Test hook: seconds to sleep after each completed shard, so a test can kill a merge mid-way.
PAUSE_ENV = "DOMAINFORGE_MERGE_PAUSE_AFTER_SHARD"


class Buffers:
    """Reused per-worker scratch: memory stays flat whatever the tensor or model size.

    Two levels: an I/O chunk (`chunk` elements of each input, mapped from the page cache) and
    compute blocks (`BLOCK` elements) that stay in CPU cache while they are decoded, reduced,
    interpolated, encoded and written.
    """

    BLOCK = 256 * 1024

    def __init__(self, chunk: int, inputs: int):
        self.chunk = chunk
        self.inputs = inputs
        block = min(self.BLOCK, chunk)
        self.out = np.empty(block * 8, np.uint8)
        self.block = block
        self.tmp = np.empty(block * 8, np.uint8)
        self.scratch = np.empty(block, np.uint32)
        self.finite = np.empty(block, np.bool_)
        self._compute: Dict[type, List[np.ndarray]] = {}

    def compute(self, dtype) -> List[np.ndarray]:
        if dtype not in self._compute:
            self._compute[dtype] = [np.empty(self.block, dtype) for _ in range(self.inputs)]
        return self._compute[dtype]


def _read(plan: TensorPlan, merge: Merge, start: int, count: int) -> List[tuple]:
    """Raw bytes of elements [start, start+count) of every source: [(uint8 array, dtype)]."""
    raws = []
    for model, name in plan.sources:
        reader = merge.reader(model)
        raws.append((reader.map_elements(name, start, count), reader.info(name).dtype))
    return raws


def _decode(plan: TensorPlan, buf: Buffers, raws, lo: int, hi: int, compute) -> List[np.ndarray]:
    """Elements [lo, hi) of a chunk as `compute` arrays, rounded to the plan's working dtype
    (mergekit loads the inputs as `dtype`, then computes in float32)."""
    arrays = []
    for j, (raw, dtype) in enumerate(raws):
        size = ITEMSIZE[dtype]
        x = decode(raw[lo * size : hi * size], dtype, buf.compute(compute)[j][: hi - lo])
        if plan.work_dtype in ("BF16", "F16") and dtype != plan.work_dtype:
            round_through(x, plan.work_dtype, buf.tmp, buf.scratch)
        arrays.append(x)
    return arrays


def read_elements(plan: TensorPlan, merge: Merge, rnd: Rounder, compute, start: int, count: int) -> List[np.ndarray]:
    """Elements [start, start+count) of every source as fresh arrays rounded to the working
    dtype: for methods that look at whole rows around a block (della)."""
    arrays = []
    for raw, dtype in _read(plan, merge, start, count):
        x = decode(raw, dtype, np.empty(count, compute))
        if plan.work_dtype in ("BF16", "F16") and dtype != plan.work_dtype:
            rnd(x)
        arrays.append(x)
    return arrays


def merge_tensor(plan: TensorPlan, merge: Merge, buf: Buffers, writer: ShardWriter, offset: int) -> None:
    """Stream one output tensor to byte `offset` of the open shard.

    The method's job (merge/methods/) makes `job.passes` reduction passes over every chunk
    (SLERP's norms and dot, TIES's k-th magnitude, ...), then the writing pass combines each
    block. A tensor that fits one chunk is mapped once for all passes."""
    compute = np.float64 if plan.work_dtype == "F64" else np.float32
    n, chunk, block = plan.numel, buf.chunk, buf.block
    rnd = Rounder(plan.work_dtype)
    ctx = TensorContext(compute, rnd, lambda start, count: read_elements(plan, merge, rnd, compute, start, count),
                        block, merge.options.random_seed)
    job = methods.get(plan.method).job(plan, ctx)
    if 1 < job.align <= block:  # whole multiples of `align` per block, whole blocks per chunk
        block -= block % job.align
        chunk -= chunk % block
    held = None  # the raw chunk kept between the passes when the tensor is one chunk
    for pass_index in range(job.passes):
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            raws = held if held is not None else _read(plan, merge, start, count)
            for lo in range(0, count, block):
                job.reduce(pass_index, _decode(plan, buf, raws, lo, min(lo + block, count), compute), start + lo)
            held = raws if count == n else None
            del raws  # unmapped before the next chunk is mapped: both would be resident at once
        job.end_pass(pass_index)
    out_size = ITEMSIZE[plan.out_dtype]
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        raws = held if held is not None else _read(plan, merge, start, count)
        for lo in range(0, count, block):
            hi = min(lo + block, count)
            result = job.combine(_decode(plan, buf, raws, lo, hi, compute), start + lo)
            if not job.proven_finite and not np.isfinite(result, out=buf.finite[: hi - lo]).all():
                raise UserError(
                    f"merged tensor '{plan.name}' has inf/nan values (from {plan.sources[0][0]} and "
                    f"{plan.sources[-1][0]}): check the input models for non-finite weights"
                )
            if plan.out_dtype != plan.work_dtype and plan.work_dtype in ("BF16", "F16"):
                round_through(result, plan.work_dtype, buf.tmp, buf.scratch)  # mergekit stores `dtype` first
            # write each block while it is still in cache (one 16 MB write per chunk ran ~2x slower)
            writer.write(encode(result, plan.out_dtype, buf.out, buf.scratch), offset + (start + lo) * out_size)
        del raws


def check_shard_header(path: Path, shard: ShardPlan) -> None:
    header = read_header(path)
    for t in shard.tensors:
        info = header.tensors.get(t.name)
        if info is None or info.shape != tuple(t.shape) or info.dtype != t.out_dtype:
            raise UserError(f"{path}: tensor '{t.name}' missing or wrong after writing; rerun the merge")


def write_shard(merge: Merge, shard: ShardPlan, buf: Buffers, report: Callable[[int, int], None]) -> None:
    path = merge.tmp / shard.filename
    marker = merge.tmp / f"{shard.filename}.done"
    marker.unlink(missing_ok=True)
    writer = ShardWriter(path, shard.head, shard.size)
    try:
        for t, offset in zip(shard.tensors, shard.offsets):
            merge_tensor(t, merge, buf, writer, offset)
            report(1, t.nbytes)
    except BaseException:
        writer.close(sync=False)
        raise
    writer.close()
    check_shard_header(path, shard)
    write_atomic(marker, merge.fingerprint)


def keep_freed_memory() -> None:
    """Have glibc keep freed heap memory instead of returning it to the kernel after each block's
    temporaries: on VMs that report free pages to the host, each page given back costs ~12 us
    when it is touched again (97% of a TIES merge's page faults, ~25% of its CPU time). RSS
    stays the same: the heap's peak is reached either way."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    libc.mallopt(-2, 64 << 20)  # M_TOP_PAD
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (glibc's maximum): block temporaries come from the heap


def run_worker(merge: Merge, rank: int, world: int, report: Callable[[int, int], None]) -> None:
    todo = [s for s in merge.owned_shards(rank, world) if not merge.is_complete(s)]
    if not todo:
        return
    keep_freed_memory()
    buf = Buffers(merge.options.chunk_elements, max(len(t.sources) for s in todo for t in s.tensors))
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    for shard in todo:
        write_shard(merge, shard, buf, report)
        if pause:
            time.sleep(pause)
