"""mergekit's generalized task arithmetic family: task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear (mergekit 0.1.5
`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`).

Per tensor, with base b and models x_i: d_i = x_i - b; d_i is sparsified (magnitude: keep the
top `density` of |d_i|; random: keep each element with probability `density`; magnitude
outliers: drop the `gamma` largest, then keep `density`; della: keep with a probability that
grows with the element's magnitude rank in its row, density ± epsilon) and, with `rescale`,
scaled back to its l1 norm; d_i *= weight_i. With sign consensus (TIES), only the d_i whose
sign agrees with the sign of Σ d_i count; the mix Σ d_i is divided by the weights that count
(`normalize`), times `lambda`, plus b. Every op rounds to the working dtype, as mergekit's
torch code does.

Passes over the inputs before the writing pass:
- task_arithmetic: 0;
- ties, breadcrumbs, breadcrumbs_ties: the exact k-th magnitudes by radix select (1 pass for
  bf16 work, 2 for f16/f32, 4 for f64), +1 when `rescale` is on (l1 norms of the kept part);
- dare_ties, dare_linear, della, della_linear: 1 (the l1 norms) when `rescale` is on (their
  default), else 0.
"""

from __future__ import annotations

import ctypes
from typing import Dict, List, Optional

import numpy as np

from merge.methods.base import DENSITY, IN_0_1, NON_NEGATIVE, MergeMethod, Param, TensorJob
from merge.methods.numeric import (RankWindow, bernoulli, keep_below, kept_bits_and_norms, l1_ratio, random_key,
                                   thresholds)

MAGNITUDE, RANDOM, OUTLIERS, DELLA = "magnitude", "random", "magnitude_outliers", "della_magprune"
DELLA_KEY_RANGE = 8192  # merge/native.py's RANGE: della_limits' counting-sort buckets
KEPT_MASK_BYTES = 32 << 20  # per tensor and worker: a 65M-element embedding of two models is 16 MB


class TaskArithmeticFamily(MergeMethod):
    base_model = "required"
    min_models = 2

    def __init__(self, name: str, consensus: bool, sparsify: Optional[str], normalize: bool, rescale: bool,
                 summary: str):
        self.name = name
        self.consensus = consensus
        self.sparsify = sparsify
        self.randomised = sparsify in (RANDOM, DELLA)
        self.summary = summary
        weight_accepts = NON_NEGATIVE if consensus else None  # the sign election weighs votes by weight
        params = [
            Param("int8_mask", False, help="mergekit's memory saving for the sign mask; no effect on the result"),
            Param("normalize", normalize, help="divide the mix by the sum of the weights that count"),
            Param("rescale", rescale, help="scale each sparsified task vector back to its l1 norm"),
            Param("lambda", 1.0, help="scale of the mixed task vector"),
            Param("weight", per_model=True, accepts=weight_accepts, help="each model's task-vector weight"),
            Param("density", 1.0, per_model=True, accepts=DENSITY, help="fraction of each task vector kept"),
        ]
        if sparsify == OUTLIERS:
            params.append(Param("gamma", 0.01, per_model=True, accepts=IN_0_1,
                                help="fraction of the largest magnitudes dropped"))
        if sparsify == DELLA:
            params.append(Param("epsilon", 0.15, per_model=True, accepts=IN_0_1,
                                help="keep probabilities spread over density ± epsilon by magnitude rank"))
        self.params = tuple(params)
        if sparsify in (MAGNITUDE, OUTLIERS):
            self.passes = "radix select: 1 (bf16) / 2 (f16, f32) / 4 (f64), +1 with rescale"
        elif sparsify:
            self.passes = "1 with rescale (default), else 0"
        else:
            self.passes = "0"

    def check_values(self, values):
        if self.sparsify != DELLA:
            return None
        for density, epsilon in zip(values["density"], values["epsilon"]):
            if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
                return (f"della needs density ± epsilon inside (0, 1), got density {density} and epsilon {epsilon}: "
                        "lower epsilon")
        return None

    def job(self, plan, ctx) -> TensorJob:
        return TaskArithmeticJob(self, plan, ctx)


class TaskArithmeticJob(TensorJob):
    def __init__(self, method: TaskArithmeticFamily, plan, ctx):
        self.m, self.plan, self.ctx, self.rnd = method, plan, ctx, ctx.rnd
        p = plan.params
        rnd = self.rnd
        self.models = len(plan.sources) - 1
        self.weights = [rnd.scalar(w) for w in p["weight"]]  # a tensor of the working dtype in mergekit
        self.density = list(p["density"])
        self.normalize, self.rescale, self.scale = p["normalize"], p["rescale"], float(p["lambda"])
        numel = plan.numel
        sparse = method.sparsify
        self.active = [bool(sparse) and d < 1 for d in self.density]
        self.windows: List[Optional[RankWindow]] = [None] * self.models
        self.keys = [random_key(ctx.random_seed, plan.name, i + 1) for i in range(self.models)]
        rank_passes = 0
        for i in range(self.models):
            if not self.active[i]:
                continue
            if sparse == MAGNITUDE:  # mergekit: top k of |d| by a descending argsort
                k = max(1, int(self.density[i] * numel))
                self.windows[i] = RankWindow(0, k, True, ctx.compute, plan.work_dtype, numel)
            elif sparse == OUTLIERS:  # mergekit: ascending positions [n_bot, n_bot + target_n)
                target = int(self.density[i] * numel)
                top = int(p["gamma"][i] * numel)
                bottom = max(0, numel - target - top)
                self.windows[i] = RankWindow(bottom, bottom + target, False, ctx.compute, plan.work_dtype, numel)
            if self.windows[i] is not None:
                rank_passes = max(rank_passes, self.windows[i].passes)
        self.rank_passes = rank_passes
        self.norm_pass = self.rescale and any(self.active)
        self.passes = rank_passes + (1 if self.norm_pass else 0)
        # masks drawn in the norm pass are kept as bits for the writing pass (each random word
        # drawn and each row ranked once) while they fit the cap; past it they are drawn again
        self.kept_masks: Dict[int, List[Optional[np.ndarray]]] = {}
        self.keep_masks = self.norm_pass and numel * sum(self.active) // 8 <= KEPT_MASK_BYTES
        self.before = [0.0] * self.models
        self.after = [0.0] * self.models
        self.ratio: List[Optional[float]] = [None] * self.models
        if sparse == RANDOM:
            # torch.bernoulli draws against the density as a tensor of the working dtype (float32 for f16)
            self.keep_p = [rnd.scalar(d) if plan.work_dtype == "BF16" else float(np.float32(d)) for d in self.density]
        if sparse == DELLA:
            self.epsilon = list(p["epsilon"])
            shape = plan.shape
            self.row = int(np.prod(shape[1:])) if len(shape) > 1 else numel
            self.align = self.row
            self._della_tables = {}

    # --- the task vectors and their masks ---------------------------------------------------
    def deltas(self, xs: List[np.ndarray]) -> List[np.ndarray]:
        """d_i = x_i - base, in place in xs[1:]."""
        base = xs[0]
        fused = self.rnd.fused
        if fused is not None:  # merge/native.py: the same bits in one pass
            for x in xs[1:]:
                fused.sub_round_bf16(x.ctypes.data, base.ctypes.data, x.shape[0])
            return xs[1:]
        return [self.rnd(np.subtract(x, base, out=x)) for x in xs[1:]]

    def masks(self, ds: List[np.ndarray], offset: int) -> List[Optional[np.ndarray]]:
        kept = self.kept_masks.pop(offset, None)
        if kept is not None:
            n = ds[0].shape[0]
            return [None if bits is None else np.unpackbits(bits, count=n).view(np.bool_) for bits in kept]
        out: List[Optional[np.ndarray]] = [None] * self.models
        sparse = self.m.sparsify
        if sparse == DELLA:
            return self.della_masks(ds, offset)
        for i, d in enumerate(ds):
            if not self.active[i]:
                continue
            if self.windows[i] is not None:
                out[i] = self.windows[i].keep(np.abs(d), offset)
            else:
                out[i] = bernoulli(self.keys[i], offset, d.shape[0], self.keep_p[i])
        return out

    def della_thresholds(self, i: int) -> np.ndarray:
        """Model i's keep probability by magnitude rank 0..row-1 within a row, as `bernoulli`
        thresholds. mergekit: ranks (+1) in the working dtype, rank_norm = (rank - 1) / (row - 1),
        p = (density - epsilon) + rank_norm·2·epsilon, each op rounded to the working dtype."""
        if i not in self._della_tables:
            rnd, row = self.rnd, self.row
            r = rnd(rnd(np.arange(row, dtype=np.float32)) + np.float32(1))
            span = rnd.scalar(np.float32(rnd.scalar(row)) - np.float32(1))
            norm = rnd(rnd(r - np.float32(1)) / np.float32(span)) if span > 0 else np.zeros_like(r)
            np.clip(norm, 0, 1, out=norm)
            eps = np.float32(self.epsilon[i])
            probs = rnd(rnd(rnd(norm * np.float32(2)) * eps) + np.float32(self.density[i] - self.epsilon[i]))
            self._della_tables[i] = thresholds(probs)
        return self._della_tables[i]

    def della_masks(self, ds: List[np.ndarray], offset: int) -> List[Optional[np.ndarray]]:
        """Keep-masks of elements [offset, offset+n) (the block's task vectors `ds`): each element
        kept with the probability of its magnitude rank within its row (mergekit's
        della_magprune: rows of a 2-D tensor, a 1-D tensor is one row). Blocks are whole rows
        (`align`) where a row fits a block; otherwise the rows around the block are read whole:
        memory grows with the row, not the tensor."""
        row, n = self.row, ds[0].shape[0]
        first, last = offset // row, -(-(offset + n) // row)
        rows = last - first
        if offset % row or n % row:
            ds = self.deltas(self.ctx.read(first * row, rows * row))
        lo = offset - first * row
        starts = (np.arange(rows, dtype=np.int64) * row)[:, None]
        out: List[Optional[np.ndarray]] = [None] * self.models
        for i, d in enumerate(ds):
            if not self.active[i]:
                continue
            limit = np.empty(rows * row, np.uint32)
            if self.rnd.fused is not None:  # the ranks below by a stable radix sort in C: the same order
                scratch = np.empty(2 * row + DELLA_KEY_RANGE + 1, np.uint32)
                self.rnd.fused.della_limits(d.ctypes.data, rows, row, self.della_thresholds(i).ctypes.data,
                                            limit.ctypes.data, scratch.ctypes.data)
            else:
                mags = np.abs(d).reshape(rows, row)
                if self.plan.work_dtype == "BF16":  # bf16 magnitudes sort as 16-bit keys: numpy's radix sort
                    mags = (mags.view(np.uint32) >> 16).astype(np.uint16)
                order = np.argsort(mags, axis=1, kind="stable")
                limit[order + starts] = self.della_thresholds(i)[None, :]  # the element of rank j gets table[j]
            out[i] = keep_below(self.keys[i], offset, n, limit[lo : lo + n])
        return out

    def sparsified(self, ds, offset):
        """Masks applied (and rescaled to the l1 norm once the norms are known), in place."""
        for i, (d, mask) in enumerate(zip(ds, self.masks(ds, offset))):
            if mask is None:
                continue
            np.multiply(d, mask, out=d)
            if self.ratio[i] is not None:
                self.rnd(np.multiply(d, np.float32(self.ratio[i]), out=d))
        return ds

    # --- the passes ---------------------------------------------------------------------------
    def reduce(self, pass_index, xs, offset):
        ds = self.deltas(xs)
        if pass_index < self.rank_passes:
            for w, d in zip(self.windows, ds):
                if w is not None and pass_index < w.passes:
                    w.reduce_values(pass_index, d, self.rnd.fused)
            return
        fused = self.rnd.fused
        if fused is not None and self.keep_masks and self.m.sparsify == RANDOM and np.getbufsize() % 8 == 0:
            self.kept_masks[offset] = [self.kept_bits(fused, i, d, offset) if self.active[i] else None
                                       for i, d in enumerate(ds)]
            return
        masks = self.masks(ds, offset)
        if self.keep_masks:
            self.kept_masks[offset] = [None if mask is None else np.packbits(mask) for mask in masks]
        for i, (d, mask) in enumerate(zip(ds, masks)):  # the l1 norms
            if mask is not None and fused is not None:  # the sums below with their bits, in C
                mask = np.ascontiguousarray(mask)
                sums = np.empty(2)
                fused.sum_abs_kept(d.ctypes.data, mask.ctypes.data, d.shape[0], np.getbufsize(), sums.ctypes.data)
                self.before[i] += float(sums[0])
                self.after[i] += float(sums[1])
            elif mask is not None:
                a = np.abs(d, out=d)
                self.before[i] += float(np.sum(a, dtype=np.float64))
                self.after[i] += float(np.sum(np.multiply(a, mask, out=a), dtype=np.float64))

    def kept_bits(self, fused, i, d, offset):
        """Model i's mask as bits, drawn with its l1 norms in one C pass: the steps below."""
        bits, before, after = kept_bits_and_norms(fused, self.keys[i], offset, d, self.keep_p[i])
        self.before[i] += before
        self.after[i] += after
        return bits

    def end_pass(self, pass_index):
        if pass_index < self.rank_passes:
            for w in self.windows:
                if w is not None and pass_index < w.passes:
                    w.end_pass(pass_index)
            return
        self.ratio = [l1_ratio(self.rnd, b, a) if self.active[i] else None
                      for i, (b, a) in enumerate(zip(self.before, self.after))]

    def linear_divisor(self) -> np.float32:
        """The divisor of a mix without sign consensus: the weights' sum in the working dtype."""
        total_w = np.float32(0)
        for w in self.weights:
            total_w = np.float32(total_w + np.float32(w))
        divisor = np.float32(self.rnd.scalar(total_w))
        return np.float32(1) if abs(divisor) < 1e-8 else divisor

    def fused_combine(self, xs, offset):
        """combine's ops after the task vectors, rounded alike, in C loops (merge/native.py): one
        pass per model, then one for the mix."""
        fused, base = self.rnd.fused, xs[0]
        ds = self.deltas(xs)
        for d, mask, ratio, w in zip(ds, self.masks(ds, offset), self.ratio, self.weights):
            mask = None if mask is None else np.ascontiguousarray(mask)
            fused.ta_weigh(d.ctypes.data, None if mask is None else mask.ctypes.data, ratio is not None,
                           1.0 if ratio is None else ratio, w, d.shape[0])
        k = len(ds)
        divisor = np.float32(1) if self.m.consensus or not self.normalize else self.linear_divisor()
        fused.task_arithmetic_mix(base.ctypes.data, (ctypes.c_void_p * k)(*[d.ctypes.data for d in ds]),
                                  (ctypes.c_float * k)(*self.weights), k, int(self.m.consensus),
                                  int(self.normalize), divisor, np.float32(self.scale), base.shape[0])
        return base

    def combine(self, xs, offset):
        rnd = self.rnd
        if rnd.fused is not None:
            return self.fused_combine(xs, offset)
        base = xs[0]
        ds = self.sparsified(self.deltas(xs), offset)
        for d, w in zip(ds, self.weights):
            rnd(np.multiply(d, np.float32(w), out=d))
        if self.m.consensus:
            # TIES sign election: the sign of Σ d_i; a d_i counts where its sign agrees (0 never does)
            total = ds[0].copy()
            for d in ds[1:]:
                np.add(total, d, out=total)
            positive = total >= 0
            mixed = np.zeros_like(base)
            divisor = np.zeros_like(base)
            for d, w in zip(ds, self.weights):
                # boolean ops and a multiply by the mask: np.where / where= ran ~10x slower here
                agree = (d > 0) == positive
                agree &= d != 0
                np.multiply(d, agree, out=d)
                np.add(mixed, d, out=mixed)
                np.multiply(agree, np.float32(w), out=total)
                np.add(divisor, total, out=divisor)
            rnd(mixed)
            rnd(divisor)
            divisor[divisor == 0] = 1
        else:
            mixed = ds[0]
            for d in ds[1:]:
                np.add(mixed, d, out=mixed)
            rnd(mixed)
            divisor = self.linear_divisor()
        if self.normalize:
            rnd(np.divide(mixed, divisor, out=mixed))
        if self.scale != 1:
            rnd(np.multiply(mixed, np.float32(self.scale), out=mixed))
        return np.add(base, mixed, out=base)


METHODS = (
    TaskArithmeticFamily("task_arithmetic", False, None, False, False,
                         "base + Σ weight·(model - base)"),
    TaskArithmeticFamily("ties", True, MAGNITUDE, True, False,
                         "top-density magnitudes of each task vector, sign election"),
    TaskArithmeticFamily("dare_ties", True, RANDOM, False, True,
                         "random keep with probability density, rescaled, sign election"),
    TaskArithmeticFamily("dare_linear", False, RANDOM, False, True,
                         "random keep with probability density, rescaled, summed"),
    TaskArithmeticFamily("breadcrumbs", False, OUTLIERS, False, False,
                         "drop the gamma largest and keep density of the rest, summed"),
    TaskArithmeticFamily("breadcrumbs_ties", True, OUTLIERS, False, False,
                         "breadcrumbs with sign election"),
    TaskArithmeticFamily("della", True, DELLA, True, True,
                         "keep probability by magnitude rank per row, rescaled, sign election"),
    TaskArithmeticFamily("della_linear", False, DELLA, False, True,
                         "della without sign election"),
)
