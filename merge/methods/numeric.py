"""The numeric toolkit of the merge methods: pure math on numpy arrays, no I/O.

- SLERP and linear interpolation (mergekit 0.1.5 `merge_methods/slerp.py`, `linear.py`):
  - each tensor is flattened; it is normalised by its L2 norm only when that norm exceeds 1e-8;
  - when |dot| of the normalised tensors exceeds 0.9995 the original tensors are LERPed;
  - otherwise result = sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 with θ = arccos(dot),
    applied to the original tensors; v0 is the base model, so t=0 returns the base.

  Large tensors are processed in fixed-size chunks in two passes: `SlerpStats` accumulates
  |v0|², |v1|² and v0·v1 in float64 over the chunks, `slerp_coefficients` turns them into the
  two scalars, and `combine` writes each interpolated chunk. Whole-tensor `slerp` is the same
  three steps on one chunk.
- What a job gets from the runner: `Rounder` (each op rounded to the working dtype, as torch
  does) and `TensorContext`.
- `Groups`: reductions per row or column.
- `random_key`, `random_words`, `bernoulli`: Philox draws that do not depend on chunking,
  workers or nodes.
- `RankWindow`: exact rank selection over a whole tensor, streamed; `l1_ratio`: the rescale
  of a masked tensor.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from merge.io import decode, encode
from merge.native import kernels

# ---------------------------------------------------------------------------------------------
# SLERP and linear interpolation
# ---------------------------------------------------------------------------------------------
DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
# float64 scratch block for the dot products: small enough to stay in L2 cache, large enough
# that the Python loop costs nothing next to the BLAS call (16M elements: ~15 ms here).
_F64_BLOCK = 1 << 16


class SlerpStats:
    """Running |v0|², |v1|², v0·v1 in float64 over chunks of two flattened tensors."""

    def __init__(self) -> None:
        self.sq0 = 0.0
        self.sq1 = 0.0
        self.dot = 0.0
        self._a = np.empty(_F64_BLOCK, np.float64)
        self._b = np.empty(_F64_BLOCK, np.float64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """x, y: 1-D float32/float64 chunks of equal length, same positions in v0 and v1."""
        if x.dtype == np.float64:  # already exact; no copy needed
            self.sq0 += float(np.dot(x, x))
            self.sq1 += float(np.dot(y, y))
            self.dot += float(np.dot(x, y))
            return
        # float32 BLAS dots lose ~1e-5 relative on millions of elements; float64 blocks don't.
        for start in range(0, x.shape[0], _F64_BLOCK):
            n = min(_F64_BLOCK, x.shape[0] - start)
            a, b = self._a[:n], self._b[:n]
            np.copyto(a, x[start : start + n])
            np.copyto(b, y[start : start + n])
            self.sq0 += float(np.dot(a, a))
            self.sq1 += float(np.dot(b, b))
            self.dot += float(np.dot(a, b))


def slerp_coefficients(
    t: float, sq0: float, sq1: float, dot: float, compute_dtype=np.float32
) -> Tuple[np.floating, np.floating]:
    """(c0, c1) such that slerp(t, v0, v1) = c0·v0 + c1·v1, from |v0|², |v1|², v0·v1."""
    norm0 = math.sqrt(sq0)
    norm1 = math.sqrt(sq1)
    norm0 = norm0 if norm0 > NORM_EPS else 1.0
    norm1 = norm1 if norm1 > NORM_EPS else 1.0
    cos = min(1.0, max(-1.0, dot / (norm0 * norm1)))
    if abs(cos) > DOT_THRESHOLD:
        # mergekit forms 1 - t in the compute dtype; do the same so LERP rounds identically.
        t_c = compute_dtype(t)
        return compute_dtype(1) - t_c, t_c
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return (
        compute_dtype(math.sin((1.0 - t) * theta) / sin_theta),
        compute_dtype(math.sin(t * theta) / sin_theta),
    )


def combine(c0, c1, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """c0·x + c1·y, in place in x (y is clobbered). Rounds like mergekit's `c0 * x + c1 * y`."""
    np.multiply(x, c0, out=x)
    np.multiply(y, c1, out=y)
    np.add(x, y, out=x)
    return x


def combine_linear(weights: Sequence[float], normalize: bool, xs: Sequence[np.ndarray]) -> np.ndarray:
    """Σ w_i·x_i (/ Σ w_i), in place in xs[0]; rounds like mergekit's linear merge."""
    dtype = xs[0].dtype.type
    out = xs[0]
    np.multiply(out, dtype(weights[0]), out=out)
    for w, x in zip(weights[1:], xs[1:]):
        np.multiply(x, dtype(w), out=x)
        np.add(out, x, out=out)
    if normalize:
        np.divide(out, dtype(sum(dtype(w) for w in weights)), out=out)
    return out


def slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Whole-tensor SLERP of float arrays; computes in float32 (float64 for float64 inputs)."""
    dtype = np.float64 if v0.dtype == np.float64 else np.float32
    x = np.array(v0, dtype=dtype).reshape(-1)
    y = np.array(v1, dtype=dtype).reshape(-1)
    stats = SlerpStats()
    stats.add(x, y)
    c0, c1 = slerp_coefficients(t, stats.sq0, stats.sq1, stats.dot, dtype)
    return combine(c0, c1, x, y).reshape(v0.shape)


def lerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """(1-t)·v0 + t·v1 in float32 (float64 for float64 inputs)."""
    dtype = np.float64 if v0.dtype == np.float64 else np.float32
    x = np.array(v0, dtype=dtype)
    y = np.array(v1, dtype=dtype)
    t_c = dtype(t)
    return combine(dtype(1) - t_c, t_c, x, y)


# ---------------------------------------------------------------------------------------------
# what a job gets from the runner
# ---------------------------------------------------------------------------------------------
class Rounder:
    """Rounds float32 arrays and scalars to the working dtype (BF16/F16), as torch does after
    each op in that dtype; a no-op for F32/F64 work (numpy's float32 ops round like torch's)."""

    def __init__(self, work_dtype: str):
        self.dtype = work_dtype
        self.active = work_dtype in ("BF16", "F16")
        self._out = np.empty(0, np.uint8)
        self._scratch = np.empty(0, np.uint32)
        self._lib = kernels() if work_dtype == "BF16" else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x rounded in place (float32, 1-D or contiguous)."""
        if not self.active:
            return x
        flat = x.reshape(-1)
        n = flat.shape[0]
        if self._lib is not None and flat.dtype == np.float32 and flat.flags.c_contiguous:
            self._lib.round_bf16(flat.ctypes.data, n)  # the loop below in one pass (merge/native.py)
            return x
        if self._scratch.shape[0] < n:
            self._out = np.empty(n * 8, np.uint8)
            self._scratch = np.empty(n, np.uint32)
        if self.dtype == "BF16":
            # round to nearest even on the 16 dropped bits, in place: 5 passes instead of an
            # encode + decode round trip (this runs after every op of a bf16 merge)
            bits, tmp = flat.view(np.uint32), self._scratch[:n]
            np.right_shift(bits, 16, out=tmp)
            np.bitwise_and(tmp, 1, out=tmp)
            np.add(tmp, 0x7FFF, out=tmp)
            np.add(bits, tmp, out=bits)
            np.bitwise_and(bits, np.uint32(0xFFFF0000), out=bits)
            return x
        decode(encode(flat, self.dtype, self._out, self._scratch), self.dtype, flat)
        return x

    @property
    def fused(self):
        """merge/native.py's C loops for fused bf16 chains (BF16 work with a compiler), else None:
        the methods then run their numpy ops, with the same bits."""
        return self._lib

    def scalar(self, value: float) -> float:
        """A scalar rounded to the working dtype (a 0-dim torch tensor of it)."""
        if self.dtype == "F64":
            return float(value)
        x = np.array([value], np.float32)
        return float(self(x)[0])

    def array(self, values) -> np.ndarray:
        """float32 values rounded (a small tensor of scalars, e.g. per-row norms)."""
        return self(np.asarray(values, np.float32).copy())


@dataclass
class TensorContext:
    """What the runner hands a job besides the blocks."""

    compute: type
    """np.float32, or np.float64 for F64 work."""
    rnd: Rounder
    read: Callable[[int, int], List[np.ndarray]]
    """read(start, count): fresh decoded, work-rounded arrays of elements [start, start+count)
    of every source (for methods that need whole rows around a block: della)."""
    block: int
    """Elements per block (jobs size their scratch by it)."""
    random_seed: int = 0


# ---------------------------------------------------------------------------------------------
# row-wise reductions
# ---------------------------------------------------------------------------------------------
class Groups:
    """Which vector each element of a row-major tensor belongs to, for reductions along a dim:
    `flat` (one vector: the whole tensor), `last` (rows: dim -1) or `first` (dim 0: the vectors
    run down the first axis, one per position in the remaining dims)."""

    def __init__(self, shape: Sequence[int], mode: str):
        numel = int(np.prod(shape)) if len(shape) else 1
        self.mode = mode if len(shape) > 1 else "flat"
        if self.mode == "last":
            self.size, self.count = int(shape[-1]), numel // int(shape[-1])
        elif self.mode == "first":
            self.count, self.size = numel // int(shape[0]), int(shape[0])
        else:
            self.size, self.count = numel, 1
        self._squares = np.empty(0, np.float64)

    def index(self, offset: int, n: int) -> Optional[np.ndarray]:
        """Group of each element [offset, offset+n); None for one group."""
        if self.count == 1:
            return None
        positions = np.arange(offset, offset + n, dtype=np.int64)
        if self.mode == "last":
            return positions // self.size
        return positions % self.count

    def add(self, acc: np.ndarray, index: Optional[np.ndarray], values: np.ndarray, fused=None) -> None:
        """acc[group] += values summed per group (float64 acc); `fused` (Rounder.fused) sums
        float32 values in one C pass with numpy's bits (merge/native.py)."""
        if index is None and fused is not None and values.dtype == np.float32 and values.flags.c_contiguous:
            acc[0] += fused.sum_f32(values.ctypes.data, values.shape[0], np.getbufsize())
        elif index is None:
            acc[0] += float(np.sum(values, dtype=np.float64))
        else:
            acc += np.bincount(index, weights=values, minlength=self.count)

    def add_squares(self, acc: np.ndarray, index: Optional[np.ndarray], x: np.ndarray, fused=None) -> None:
        """acc[group] += Σ x² per group, squared and summed in float64 (torch.norm's float
        accumulation); `fused` (Rounder.fused) squares (and sums one group) in one C pass with
        numpy's bits."""
        if fused is None:
            self.add(acc, index, np.square(x, dtype=np.float64))
            return
        if index is None:
            acc[0] += fused.sum_squares(x.ctypes.data, x.shape[0])
            return
        n = x.shape[0]
        if self._squares.shape[0] < n:
            self._squares = np.empty(n, np.float64)
        squares = self._squares[:n]
        fused.square_f64(x.ctypes.data, squares.ctypes.data, n)
        self.add(acc, index, squares)

    @staticmethod
    def pick(per_group: np.ndarray, index: Optional[np.ndarray]):
        """Per-element values of a per-group array (a scalar for one group)."""
        return per_group[0] if index is None else per_group[index]

    @staticmethod
    def operands(index: Optional[np.ndarray], *per_group: np.ndarray) -> Tuple[List[np.ndarray], int]:
        """Per-group arrays as merge/native.py's fused loops take them, with their stride: one
        value per element of the block (stride 1), or the one group's value (stride 0). Keep
        the arrays alive while the loop runs."""
        if index is None:
            return [np.ascontiguousarray(a[:1]) for a in per_group], 0
        return [np.ascontiguousarray(a[index]) for a in per_group], 1


# ---------------------------------------------------------------------------------------------
# random draws that do not depend on chunking, workers or nodes
# ---------------------------------------------------------------------------------------------
def random_key(seed: int, tensor: str, source: int) -> List[int]:
    """A Philox key from the seed, the output tensor's name and the source's position."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{source}".encode(), digest_size=16).digest()
    return [int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")]


def random_words(key: List[int], offset: int, n: int) -> np.ndarray:
    """n uniform uint32 words: words offset .. offset+n-1 of the key's stream. Philox is a
    counter-based generator (one counter step = 4 uint64 = 8 words), so element i of a tensor
    always gets word i, whatever the chunk it was computed in."""
    first = offset // 2
    last = -(-(offset + n) // 2)
    skip = first % 4
    raw = np.random.Philox(key=key, counter=[first // 4, 0, 0, 0]).random_raw(last - first + skip)[skip:]
    words = raw.view(np.uint32)  # little-endian: the low word of draw j is word 2j
    return words[offset - 2 * first : offset - 2 * first + n]


def thresholds(p) -> np.ndarray:
    """Probabilities as thresholds on `random_words`: a word w keeps with probability p when
    w < floor(p·2^32) (p to 2^-32; the methods draw only for p < 1, so it fits 32 bits)."""
    return np.minimum(np.floor(np.asarray(p, np.float64) * 4294967296.0), 4294967295.0).astype(np.uint32)


def bernoulli(key: List[int], offset: int, n: int, p: float) -> np.ndarray:
    """Keep-mask of elements [offset, offset+n), each True with probability p."""
    return keep_below(key, offset, n, thresholds(p))


@functools.lru_cache(maxsize=64)
def philox_key(key: Tuple[int, int]) -> Tuple[int, int]:
    """The key numpy's Philox runs with: a list with a word past 2^63 goes through float64 on its
    way to uint64 (low bits lost), and the C draws must lose the same bits."""
    k0, k1 = np.random.Philox(key=list(key)).state["state"]["key"]
    return int(k0), int(k1)


def keep_below(key: List[int], offset: int, n: int, limit: np.ndarray) -> np.ndarray:
    """random_words(key, offset, n) < limit (one uint32 threshold, or n of them): in one C pass
    without the words (merge/native.py), else in numpy, with the same bits."""
    lib = kernels()
    if lib is None:
        return random_words(key, offset, n) < limit
    stride = 1 if limit.ndim else 0
    limit = np.ascontiguousarray(limit, np.uint32)  # (makes a 0-d threshold 1-d)
    keep = np.empty(n, np.bool_)
    counter = np.array([offset // 8, 0, 0, 0], np.uint64)  # word w is word w % 8 of block w // 8 + 1
    k0, k1 = philox_key(tuple(key))
    lib.philox_keep(k0, k1, counter.ctypes.data, offset % 8, n, limit.ctypes.data,
                    stride, keep.ctypes.data)
    return keep


def kept_bits_and_norms(lib, key: List[int], offset: int, x: np.ndarray, p: float):
    """bernoulli(key, offset, n, p) packed as np.packbits packs it, with the l1 norms of x before
    and after it (np.sum(|x|) and np.sum(|x|·mask), float64, numpy's bits), in one C pass
    (merge/native.py's keep_norms)."""
    n, buffer = x.shape[0], np.getbufsize()
    limit = np.ascontiguousarray(thresholds(p), np.uint32)
    bits, sums, scratch = np.empty(-(-n // 8), np.uint8), np.empty(2), np.empty(buffer, np.uint8)
    k0, k1 = philox_key(tuple(key))
    counter = np.array([offset // 8, 0, 0, 0], np.uint64)
    lib.keep_norms(x.ctypes.data, n, buffer, k0, k1, counter.ctypes.data, offset % 8, limit.ctypes.data, 0,
                   scratch.ctypes.data, bits.ctypes.data, sums.ctypes.data)
    return bits, float(sums[0]), float(sums[1])


def uniforms(key: List[int], offset: int, n: int) -> np.ndarray:
    """The words of `random_words` as floats in [0, 1) (for tests and docs)."""
    return random_words(key, offset, n) * (1.0 / 4294967296.0)


# ---------------------------------------------------------------------------------------------
# exact rank selection over a whole tensor, streamed
# ---------------------------------------------------------------------------------------------
class RankWindow:
    """Keeps the elements at positions [lo, hi) of a tensor's magnitudes in sorted order
    (ascending, or descending), ties broken by element index (a stable sort), without holding
    the tensor: a radix select over the float bits finds the values at both ends in one
    streaming pass per 16-bit digit (BF16 work: 1 pass, F16/F32: 2, F64: 4); `keep` then
    decides each element in one more scan, counting the ties at the ends as it goes."""

    DIGIT = 16

    def __init__(self, lo: int, hi: int, descending: bool, compute, work_dtype: str, numel: int):
        self.lo, self.hi, self.descending = lo, hi, descending
        # an end at the tensor's own end needs no search: everything below (above) it is kept
        self.bounded = [lo > 0, hi < numel]
        self.utype = np.uint64 if compute == np.float64 else np.uint32
        self.bits = 64 if compute == np.float64 else 32
        self.passes = 1 if work_dtype == "BF16" else self.bits // self.DIGIT  # bf16 values fill 16 bits
        if hi <= lo or not any(self.bounded):  # nothing kept, or everything
            self.passes = 0
        # per target (position lo, position hi-1): the key prefix found so far, elements below it
        self.targets = [lo, hi - 1]
        self.prefix = [0, 0]
        self.below = [0, 0]
        self._hist = [None, None]
        self.values: Optional[List[int]] = None
        self._seen = [0, 0]

    def keys(self, magnitudes: np.ndarray) -> np.ndarray:
        k = magnitudes.view(self.utype)
        return ~k if self.descending else k  # descending = ascending on inverted bits; ties keep index order

    def reduce_values(self, pass_index: int, values: np.ndarray, fused=None) -> None:
        """`reduce` of |values|; `fused` (Rounder.fused) counts the first digit of float32
        magnitudes in one C pass (the same counts: a histogram has no order)."""
        if fused is None or pass_index or values.dtype != np.float32 or self.utype != np.uint32:
            self.reduce(pass_index, np.abs(values))
            return
        hist = np.zeros(1 << self.DIGIT, np.int64)
        fused.magnitude_histogram(values.ctypes.data, int(self.descending), hist.ctypes.data, values.shape[0])
        self.reduce(pass_index, None, hist)

    def reduce(self, pass_index: int, magnitudes: Optional[np.ndarray], first_digits: Optional[np.ndarray] = None) -> None:
        """Count the block's digits at this pass; `first_digits`: pass 0's counts, already made."""
        keys = self.keys(magnitudes) if first_digits is None else None
        shift = self.bits - self.DIGIT * (pass_index + 1)
        for t in range(2):
            if not self.bounded[t]:
                continue
            if t == 1 and self.bounded[0] and self.prefix[1] == self.prefix[0] and self.below[1] == self.below[0]:
                continue  # same candidates as target 0: share its histogram
            if first_digits is not None:
                hist = first_digits
            else:
                if pass_index == 0:
                    sel = keys
                else:
                    sel = keys[(keys >> self.utype(shift + self.DIGIT)) == self.utype(self.prefix[t])]
                digits = ((sel >> self.utype(shift)) & self.utype(0xFFFF)).astype(np.int64)
                hist = np.bincount(digits, minlength=1 << self.DIGIT)
            self._hist[t] = hist if self._hist[t] is None else self._hist[t] + hist

    def end_pass(self, pass_index: int) -> None:
        for t in range(2):
            if not self.bounded[t]:
                continue
            hist = self._hist[t] if self._hist[t] is not None else self._hist[0]  # shared: same candidates
            cum = np.cumsum(hist)
            rank = self.targets[t] - self.below[t]
            digit = int(np.searchsorted(cum, rank, side="right"))
            self.below[t] += int(cum[digit - 1]) if digit > 0 else 0
            self.prefix[t] = (self.prefix[t] << self.DIGIT) | digit
        self._hist = [None, None]
        if pass_index == self.passes - 1:
            shift = self.bits - self.DIGIT * self.passes
            self.values = [p << shift for p in self.prefix]
            if shift:  # BF16: the low bits are zero (descending: one after inversion)
                fill = (1 << shift) - 1 if self.descending else 0
                self.values = [v | fill for v in self.values]

    def keep(self, magnitudes: np.ndarray, offset: int) -> np.ndarray:
        """Boolean keep-mask of a block; blocks must come in offset order from 0 each scan."""
        if self.hi <= self.lo:
            return np.zeros(magnitudes.shape[0], np.bool_)
        if offset == 0:
            self._seen = [0, 0]
        if not any(self.bounded):
            return np.ones(magnitudes.shape[0], np.bool_)
        keys = self.keys(magnitudes)
        v_lo, v_hi = (self.utype(v) for v in self.values)
        if self.bounded[0] and self.bounded[1]:
            keep = (keys > v_lo) & (keys < v_hi)
        elif self.bounded[1]:
            keep = keys < v_hi
        else:
            keep = keys > v_lo
        ends = [(v, t) for v, t in ((v_lo, 0), (v_hi, 1)) if self.bounded[t]]
        if len(ends) == 2 and v_lo == v_hi:
            ends = ends[:1]
        for value, t in ends:
            where = np.flatnonzero(keys == value)  # the ties at this end, in index order
            if not where.size:
                continue
            position = self.below[t] + self._seen[t] + np.arange(where.size)
            keep[where[(position >= self.lo) & (position < self.hi)]] = True
            self._seen[t] += where.size
        return keep


def l1_ratio(rnd: Rounder, before: float, after: float, eps: float = 1e-7) -> Optional[float]:
    """mergekit's rescale of a masked tensor to its l1 norm: before/after in the working dtype,
    None when either norm is below eps (then the masked tensor is kept as is)."""
    before, after = rnd.scalar(before), rnd.scalar(after)
    if before < eps or after < eps:
        return None
    return rnd.scalar(np.float32(before) / np.float32(after))
