"""Safetensors I/O by byte offset: a lazy model reader and a pre-allocated shard writer
(headers are read and checked by core/safetensors_header.py, which training shares).

The safetensors format is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets: [begin, end]}}, offsets relative to the data area), then
the raw little-endian tensor bytes. Because every tensor's place is in the header, a chunk of
a tensor is one small mapping of its byte range, and an output shard can be laid out up front
and each tensor written straight to its offset with `pwrite`.

Reads map one chunk at a time (`map_elements`) rather than the whole file or
`safetensors.safe_open` (which hands out whole tensors): mapped pages count toward RSS only
while mapped, so memory stays flat whatever the model size, and the page cache is read in
place (1.35 s of pread copies for 3.4 GB here went away). numpy rather than torch: the
workers start in milliseconds and carry no torch runtime (~300 MB RSS).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from core.errors import UserError
from core.safetensors_header import TensorInfo, read_model_headers, weight_files
from merge.native import kernels

# safetensors dtype -> bytes per element (floating types only: merges interpolate floats)
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
# MAP_POPULATE: the pages of a mapped chunk (already in the page cache) are mapped in one call
# instead of one fault per 64 KB as the passes touch them.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)

# names accepted in a merge config's `dtype` / `out_dtype`
DTYPE_NAMES = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float64": "F64", "fp64": "F64", "double": "F64",
}
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_PROMOTION = {"F16": 1, "BF16": 1, "F32": 2, "F64": 3}


def promote(a: str, b: str) -> str:
    """torch.promote_types on safetensors dtype names (bf16 + f16 -> f32)."""
    if a == b:
        return a
    if {a, b} == {"BF16", "F16"}:
        return "F32"
    return a if _PROMOTION[a] > _PROMOTION[b] else b


class ModelReader:
    """A Hugging Face model directory opened lazily: headers only, tensors read on demand."""

    def __init__(self, path: str):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            what = "is a file, not a model directory" if self.path.exists() else "does not exist"
            raise UserError(f"model path '{path}' {what}: give a Hugging Face model directory with *.safetensors")
        files, weight_map = weight_files(self.path)
        if not files:
            has_bin = any(self.path.glob("*.bin")) or any(self.path.glob("*.pt"))
            hint = "convert it with save_pretrained(..., safe_serialization=True)" if has_bin else (
                "point to the directory that holds the model weights")
            raise UserError(f"model path '{path}' holds no .safetensors files: {hint}")
        self.tensors: Dict[str, Tuple[Path, TensorInfo]] = {}
        for shard, header in read_model_headers(self.path).items():
            for tensor, info in header.tensors.items():
                self.tensors[tensor] = (shard, info)
        config = self.path / "config.json"
        self.config: Optional[dict] = json.loads(config.read_text()) if config.is_file() else None
        self._fds: Dict[Path, int] = {}

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def map_elements(self, name: str, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of `name` as a read-only uint8 view of the page
        cache; unmapped as soon as the last view of it is dropped."""
        shard, info = self.tensors[name]
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(shard, os.O_RDONLY)
        size = ITEMSIZE[info.dtype]
        begin = info.begin + start * size
        aligned = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, begin - aligned + count * size, flags=MAP_FLAGS, prot=mmap.PROT_READ, offset=aligned)
        return np.frombuffer(mapped, np.uint8, count * size, begin - aligned)

    def files(self) -> List[Path]:
        return sorted({shard for shard, _ in self.tensors.values()})

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def pread_exact(fd: int, out: np.ndarray, offset: int, path: Path) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise UserError(f"{path}: ends before byte {offset + len(view)}; the file is truncated: re-download it")
        done += n


def pwrite_exact(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# ---------------------------------------------------------------------------------------------
# dtype conversion between raw storage bytes and the float32/float64 compute buffers
# ---------------------------------------------------------------------------------------------
def decode(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Storage bytes `raw` (uint8, n·itemsize) -> `out` (float32 or float64, n elements)."""
    if dtype == "BF16":
        src = raw.view(np.uint16)
        if out.dtype == np.float32:  # bf16 is the top half of a float32
            bits = out.view(np.uint32)
            lib = kernels()
            if lib is not None and out.flags.c_contiguous and src.flags.c_contiguous and src.ctypes.data % 2 == 0:
                lib.decode_bf16(src.ctypes.data, bits.ctypes.data, src.shape[0])  # the 2 passes below in one
                return out
            np.copyto(bits, src)
            np.left_shift(bits, 16, out=bits)
        else:
            np.copyto(out, (src.astype(np.uint32) << 16).view(np.float32))
        return out
    np.copyto(out, raw.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]))
    return out


def encode(src: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """float32/float64 `src` -> storage bytes of `dtype` in `out` (uint8), rounding to nearest
    even as torch does; returns the filled uint8 view. `scratch` (uint32) has >= src.size."""
    n = src.shape[0]
    dst = out[: n * ITEMSIZE[dtype]]
    if dtype == "BF16":
        if src.dtype != np.float32:
            src32 = scratch[:n].view(np.float32)
            np.copyto(src32, src, casting="unsafe")
            src = src32
        bits = src.view(np.uint32)
        lib = kernels()
        if lib is not None and bits.flags.c_contiguous:
            lib.encode_bf16(bits.ctypes.data, dst.ctypes.data, n)  # the loop below in one pass (merge/native.py)
            return dst
        tmp = scratch[:n]
        # round to nearest even on the 16 dropped bits: add 0x7FFF + lowest kept bit
        np.right_shift(bits, 16, out=tmp)
        np.bitwise_and(tmp, 1, out=tmp)
        np.add(tmp, 0x7FFF, out=tmp)
        np.add(tmp, bits, out=tmp)
        np.right_shift(tmp, 16, out=tmp)
        np.copyto(dst.view(np.uint16), tmp, casting="unsafe")
        return dst
    target = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    np.copyto(dst.view(target), src, casting="unsafe")
    return dst


def round_through(buf: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Round a compute buffer to the storage `dtype` and back, in place."""
    return decode(encode(buf, dtype, out, scratch), dtype, buf)


# ---------------------------------------------------------------------------------------------
# output shards
# ---------------------------------------------------------------------------------------------
def shard_header(entries: List[Tuple[str, str, Tuple[int, ...], int]], metadata: Dict[str, str]) -> Tuple[bytes, List[int]]:
    """(header bytes incl. the 8-byte length, absolute offset of each entry) for
    entries [(name, dtype, shape, nbytes)] laid out back to back in the given order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    relative = []
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        relative.append(offset)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data area 8-byte aligned, as the safetensors crate does
    head = struct.pack("<Q", len(text)) + text
    return head, [len(head) + r for r in relative]


class ShardWriter:
    """An output shard created at its final size with its header; tensors are written at their
    offsets, in file order (the header, then each tensor's blocks: `write` checks it).

    The bytes go through two aligned staging buffers and `O_DIRECT` writes by a writer thread
    (the next buffer fills while the last one is written): fresh page-cache pages cost 0.6-4.5 ns
    of kernel time per output byte on VMs that report free pages to the host, an O_DIRECT write
    0.04 ns. Filesystems without O_DIRECT (some network filesystems, older tmpfs) refuse it with
    EINVAL at open or at the first write; the shard is then written through the page cache, as
    is the unaligned tail of every shard. `close` fsyncs either way."""

    STAGE = 4 << 20
    ALIGN = 4096
    WRITEBACK = 64 << 20  # buffered fallback: start writeback every 64 MB

    def __init__(self, path: Path, head: bytes, total_size: int):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        with self.naming_the_file():
            os.ftruncate(self.fd, total_size)
        self._lo = self._hi = 0
        self._direct = self._open_direct(path)
        self._stages = [mmap.mmap(-1, self.STAGE) for _ in range(2)] if self._direct is not None else []
        self._stage = 0
        self._base = 0  # file offset of the current stage's first byte
        self._fill = 0  # bytes staged
        self._flusher = None  # (thread, [error]) of the stage being written
        self.write(np.frombuffer(head, np.uint8), 0)

    @staticmethod
    def _open_direct(path: Path) -> Optional[int]:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return os.open(path, os.O_WRONLY | flag)
        except OSError as err:
            if err.errno == errno.EINVAL:  # the filesystem has no O_DIRECT
                return None
            raise

    @contextlib.contextmanager
    def naming_the_file(self):
        """ftruncate/pwrite errors (a full disk) name no file: add this shard's path."""
        try:
            yield
        except OSError as err:
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror, str(self.path)) from err

    def write(self, data: np.ndarray, offset: int) -> None:
        if self._direct is None:
            self._write_buffered(data, offset)
            return
        if offset != self._base + self._fill:
            raise ValueError(f"{self.path}: write at byte {offset}, expected {self._base + self._fill} (file order)")
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), self.STAGE - self._fill)
            self._stages[self._stage][self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.STAGE:
                self._flush_stage()

    def _write_buffered(self, data: np.ndarray, offset: int) -> None:
        with self.naming_the_file():
            pwrite_exact(self.fd, data, offset)
        self._lo = min(self._lo, offset) if self._hi else offset
        self._hi = max(self._hi, offset + data.nbytes)
        if self._hi - self._lo >= self.WRITEBACK:
            os.posix_fadvise(self.fd, self._lo, self._hi - self._lo, os.POSIX_FADV_DONTNEED)
            self._lo = self._hi

    def _flush_stage(self) -> None:
        """Hand the full stage to a writer thread (os.pwrite releases the GIL); the next stage
        fills meanwhile."""
        import threading

        self._wait()
        stage, base, errors = self._stages[self._stage], self._base, []
        thread = threading.Thread(target=self._write_stage, args=(stage, base, self.STAGE, errors), daemon=True)
        thread.start()
        self._flusher = (thread, errors)
        self._stage ^= 1
        self._base += self.STAGE
        self._fill = 0

    def _write_stage(self, stage: mmap.mmap, base: int, size: int, errors: list) -> None:
        try:
            self._write_direct(memoryview(stage)[:size], base)
        except BaseException as err:  # re-raised by the main thread at its next write or close
            errors.append(err)

    def _write_direct(self, view: memoryview, offset: int) -> None:
        """Aligned bytes through O_DIRECT; whatever it leaves (a short write near a full disk,
        a filesystem that refuses it with EINVAL) through the page cache, which reports the
        real error."""
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self._direct, view[done:], offset + done)
                if n <= 0 or n % self.ALIGN:
                    done += max(n, 0)
                    break
                done += n
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise
        if done < len(view):
            with self.naming_the_file():
                pwrite_exact(self.fd, np.frombuffer(view[done:], np.uint8), offset + done)

    def _wait(self) -> None:
        if self._flusher is None:
            return
        thread, errors = self._flusher
        thread.join()
        self._flusher = None
        if errors:
            raise errors[0]

    def _finish(self) -> None:
        """The staged rest: its aligned part direct, the tail (< 4 KiB) through the page cache."""
        if self._direct is None:
            return
        self._wait()
        aligned = self._fill - self._fill % self.ALIGN
        view = memoryview(self._stages[self._stage])
        if aligned:
            self._write_direct(view[:aligned], self._base)
        if self._fill > aligned:
            with self.naming_the_file():
                pwrite_exact(self.fd, np.frombuffer(view[aligned : self._fill], np.uint8), self._base + aligned)
        self._fill = 0

    def close(self, sync: bool = True) -> None:
        try:
            if sync:
                self._finish()
                os.fsync(self.fd)
        finally:
            if self._flusher is not None:
                self._flusher[0].join()
                self._flusher = None
            if self._direct is not None:
                os.close(self._direct)
                self._direct = None
            for stage in self._stages:
                stage.close()
            self._stages = []
            os.close(self.fd)
