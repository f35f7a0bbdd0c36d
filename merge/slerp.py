"""SLERP and linear interpolation of weight tensors: pure math, no I/O.

Semantics follow mergekit 0.1.5 (`mergekit/merge_methods/slerp.py`, `linear.py`):
- each tensor is flattened; it is normalised by its L2 norm only when that norm exceeds 1e-8;
- when |dot| of the normalised tensors exceeds 0.9995 the original tensors are LERPed;
- otherwise result = sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 with θ = arccos(dot),
  applied to the original tensors; v0 is the base model, so t=0 returns the base.

Large tensors are processed in fixed-size chunks in two passes: `SlerpStats` accumulates
|v0|², |v1|² and v0·v1 in float64 over the chunks, `slerp_coefficients` turns them into the
two scalars, and `combine` writes each interpolated chunk. Whole-tensor `slerp` is the same
three steps on one chunk.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

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
