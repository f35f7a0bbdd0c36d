"""Optional C loops for the hottest bf16 steps of a merge: decoding bf16 bytes to float32,
rounding float32 values to bf16 in place (after every op of a bf16 merge: 5-13 times per
element), encoding float32 to bf16 bytes, the whole elementwise chains of nuslerp and
model_stock, and the dare/della keep-masks (numpy's Philox4x64-10 words, compared with their
thresholds, summed and packed in the loop that draws them). numpy needs 2-5 passes over a block for each step, and a pass per op of a chain;
each C loop needs one, with the same bits: the rounding is integer round-to-nearest-even on
the float32 bit pattern, and the float ops are single IEEE float32 ops in numpy's order
(no FMA contraction, no fast-math), as numpy's are.

Built at first use with the system C compiler (`$CC`, else `cc`) into
~/.cache/domainforge/ (keyed by the source, the compiler and the machine type; no
`-march=native`, so a cache shared between nodes of different CPU generations stays valid),
and loaded with ctypes. Without a compiler, or when the build fails, the merge says so in one
line and runs the numpy loops: slower, the same bytes (tests/test_merge_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#define COMMA ,

/* Each loop is built for AVX-512, AVX2 and plain x86-64 and picked at load time (the same bits:
   no FMA contraction), and written so that the compiler vectorises it. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR
#endif

/* round to nearest even on the 16 dropped bits (torch's bf16 rounding of a float32 result) */
static inline float rnd(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* numpy's Rounder, one pass, in place */
VECTOR void round_bf16(uint32_t *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = x[i];
        x[i] = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    }
}

/* float32 bits -> bf16 bits, rounding as above: merge/io.py's encode, one pass */
VECTOR void encode_bf16(const uint32_t *x, uint16_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u = x[i];
        out[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

/* bf16 bits -> float32 bits (the top half): merge/io.py's decode, one pass */
VECTOR void decode_bf16(const uint16_t *src, uint32_t *out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = (uint32_t)src[i] << 16;
}

/* The fused chains of the bf16 methods below each do what their numpy code does op by op,
   every op rounded to bf16; one pass instead of two to ten. A coefficient pointer with
   stride 0 is one value for the block, with stride 1 one value per element (per-row angles). */

/* where mask (0 or 1) is set a, else b, without a branch */
static inline float pick(uint8_t mask, float a, float b) {
    uint32_t m = 0u - (uint32_t)mask, ua, ub;
    memcpy(&ua, &a, 4);
    memcpy(&ub, &b, 4);
    ua = (ua & m) | (ub & ~m);
    memcpy(&a, &ua, 4);
    return a;
}

/* x = rnd(x - base): task vectors, model_stock's offsets */
VECTOR void sub_round_bf16(float *restrict x, const float *restrict base, size_t n) {
    for (size_t i = 0; i < n; i++)
        x[i] = rnd(x[i] - base[i]);
}

/* out = x² in float64 (numpy's square(x, dtype=float64)), for the norms: numpy then sums out
   as before, so the sums keep their bits */
VECTOR void square_f64(const float *restrict x, double *restrict out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = (double)x[i] * (double)x[i];
}

/* Sums in float64 with numpy's bits: np.sum(a, dtype=float64) adds, to 0.0, numpy's pairwise
   sum (8 accumulators up to 128 values, halves above) of the whole array when it is float64,
   and of each BUFFER-value piece (np.getbufsize()) when float32 values are cast as they are
   summed. The values are made on the fly from the float32 arrays: VALUE(i) below. */
#define PAIRWISE(NAME, PARAMS, ARGS, VALUE)                                                      \
    static double NAME(PARAMS, size_t n) {                                                      \
        if (n < 8) {                                                                            \
            double res = 0.;                                                                    \
            for (size_t i = 0; i < n; i++)                                                      \
                res += VALUE(i);                                                                \
            return res;                                                                         \
        } else if (n <= 128) {                                                                  \
            double r[8], res;                                                                   \
            size_t i;                                                                           \
            for (int j = 0; j < 8; j++)                                                         \
                r[j] = VALUE(j);                                                                \
            for (i = 8; i < n - (n % 8); i += 8)                                                \
                for (int j = 0; j < 8; j++)                                                     \
                    r[j] += VALUE(i + j);                                                       \
            res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));            \
            for (; i < n; i++)                                                                  \
                res += VALUE(i);                                                                \
            return res;                                                                         \
        } else {                                                                                \
            size_t n2 = n / 2;                                                                  \
            n2 -= n2 % 8;                                                                       \
            return NAME(ARGS, n2) + NAME(ARGS##_AT(n2), n - n2);                                \
        }                                                                                       \
    }

#define SQUARE(i) ((double)x[i] * (double)x[i])
#define X_ARGS x
#define X_ARGS_AT(k) x + (k)
PAIRWISE(pairwise_squares, const float *x, X_ARGS, SQUARE)

#define VALUE(i) ((double)x[i])
PAIRWISE(pairwise_values, const float *x, X_ARGS, VALUE)

#define ABS(i) ((double)fabsf(x[i]))
PAIRWISE(pairwise_abs, const float *x, X_ARGS, ABS)

#define KEPT_ABS(i) ((double)(fabsf(x[i]) * (float)m[i]))
#define XM_ARGS x, m
#define XM_ARGS_AT(k) x + (k), m + (k)
PAIRWISE(pairwise_kept_abs, const float *x COMMA const uint8_t *m, XM_ARGS, KEPT_ABS)

/* np.sum(np.square(x, dtype=float64)): one float64 array, one pairwise sum */
double sum_squares(const float *x, size_t n) {
    return 0. + pairwise_squares(x, n);
}

/* np.sum(x, dtype=float64) of float32 values: buffered pieces */
double sum_f32(const float *x, size_t n, size_t buffer) {
    double acc = 0.;
    for (size_t s = 0; s < n; s += buffer)
        acc += pairwise_values(x + s, n - s < buffer ? n - s : buffer);
    return acc;
}

/* the l1 norms of d before and after its keep-mask m, as np.sum(|d|, dtype=float64) and
   np.sum(|d|·m, dtype=float64) of the float32 values: out[0], out[1] */
void sum_abs_kept(const float *x, const uint8_t *m, size_t n, size_t buffer, double *out) {
    double before = 0., after = 0.;
    for (size_t s = 0; s < n; s += buffer)
        before += pairwise_abs(x + s, n - s < buffer ? n - s : buffer);
    for (size_t s = 0; s < n; s += buffer)
        after += pairwise_kept_abs(x + s, m + s, n - s < buffer ? n - s : buffer);
    out[0] = before;
    out[1] = after;
}

/* hist[d] += 1 for each first 16-bit digit d of |x|'s float32 bits (inverted when descending):
   the first pass of RankWindow's radix select, which numpy does in five */
VECTOR void magnitude_histogram(const uint32_t *restrict x, int descending, int64_t *restrict hist, size_t n) {
    uint32_t flip = descending ? 0xFFFFFFFFu : 0u;
    for (size_t i = 0; i < n; i++)
        hist[((x[i] & 0x7FFFFFFFu) ^ flip) >> 16]++;
}

/* della's keep thresholds of whole rows: limit[i] = table[rank of element i in its row], ranks
   by bf16 magnitude ((x & 0x7FFFFFFF) >> 16), ties in index order: numpy's stable argsort of
   the 16-bit keys, here a counting sort (stable) over the row's key range, or, where that range
   passes RANGE, an LSD radix sort on the two bytes. scratch: 2·row + RANGE + 1 */
#define RANGE 8192
static inline uint32_t della_key(uint32_t x) {
    return (x & 0x7FFFFFFFu) >> 16;
}

static void della_radix(const uint32_t *x, size_t row, uint32_t *by_low, uint32_t *order) {
    uint32_t low[257] = {0}, high[257] = {0};
    for (size_t i = 0; i < row; i++) {
        uint32_t k = della_key(x[i]);
        low[(k & 0xFFu) + 1]++;
        high[(k >> 8) + 1]++;
    }
    for (size_t b = 1; b < 257; b++) {
        low[b] += low[b - 1];
        high[b] += high[b - 1];
    }
    for (size_t i = 0; i < row; i++)
        by_low[low[della_key(x[i]) & 0xFFu]++] = (uint32_t)i;
    for (size_t j = 0; j < row; j++) {
        uint32_t i = by_low[j];
        order[high[della_key(x[i]) >> 8]++] = i;
    }
}

void della_limits(const uint32_t *d, size_t rows, size_t row, const uint32_t *table, uint32_t *limit,
                  uint32_t *scratch) {
    uint32_t *keys = scratch, *order = scratch + row, *count = scratch + 2 * row;
    for (size_t r = 0; r < rows; r++) {
        const uint32_t *x = d + r * row;
        uint32_t lo = 0xFFFFFFFFu, hi = 0;
        for (size_t i = 0; i < row; i++) {
            uint32_t k = della_key(x[i]);
            keys[i] = k;
            lo = k < lo ? k : lo;
            hi = k > hi ? k : hi;
        }
        if (hi - lo < RANGE) {
            memset(count, 0, (hi - lo + 2) * sizeof(uint32_t));
            for (size_t i = 0; i < row; i++)
                count[keys[i] - lo + 1]++;
            for (uint32_t b = 1; b <= hi - lo; b++)
                count[b] += count[b - 1];
            for (size_t i = 0; i < row; i++)
                order[count[keys[i] - lo]++] = (uint32_t)i;
        } else {
            della_radix(x, row, keys, order);
        }
        for (size_t j = 0; j < row; j++)
            limit[r * row + order[j]] = table[j];
    }
}

/* out = rnd(a * b): model_stock's pairwise products */
VECTOR void mul_round_bf16(const float *restrict a, const float *restrict b, float *restrict out, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = rnd(a[i] * b[i]);
}

/* nuslerp's dot terms of the normalised vectors: v0 = rnd(rnd(v0 / n0) * rnd(v1 / n1)) */
VECTOR void nuslerp_dot_terms(float *restrict v0, const float *restrict v1, const float *restrict n0,
                              const float *restrict n1, size_t stride, size_t n) {
    if (stride == 0) {
        float a = n0[0], b = n1[0];
        for (size_t i = 0; i < n; i++)
            v0[i] = rnd(rnd(v0[i] / a) * rnd(v1[i] / b));
    } else {
        for (size_t i = 0; i < n; i++)
            v0[i] = rnd(rnd(v0[i] / n0[i]) * rnd(v1[i] / n1[i]));
    }
}

/* nuslerp's interpolation: rnd(rnd(rnd(v0·a) + rnd(v1·b)) / scale), or where colinear
   rnd(rnd(v0·la) + rnd(v1·lb)); plus base when there is one (unrounded, as the encode rounds) */
VECTOR void nuslerp_combine(float *restrict v0, const float *restrict v1, const float *restrict base,
                            const float *restrict a, const float *restrict b, const float *restrict scale,
                            const uint8_t *restrict colinear, size_t stride, float la, float lb, size_t n) {
    if (stride == 0 && colinear[0]) {
        for (size_t i = 0; i < n; i++)
            v0[i] = rnd(rnd(v0[i] * la) + rnd(v1[i] * lb));
    } else if (stride == 0) {
        float ca = a[0], cb = b[0], cs = scale[0];
        for (size_t i = 0; i < n; i++)
            v0[i] = rnd(rnd(rnd(v0[i] * ca) + rnd(v1[i] * cb)) / cs);
    } else {
        for (size_t i = 0; i < n; i++) {
            float lerp = rnd(rnd(v0[i] * la) + rnd(v1[i] * lb));
            float slerp = rnd(rnd(rnd(v0[i] * a[i]) + rnd(v1[i] * b[i])) / scale[i]);
            v0[i] = pick(colinear[i], lerp, slerp);
        }
    }
    if (base)
        for (size_t i = 0; i < n; i++)
            v0[i] = base[i] + v0[i];
}

/* The task-arithmetic family's write from its task vectors d_j (rounded to bf16), in two
   steps. `ta_weigh`, per model, in place: d_j·mask_j (the mask as 0/1 floats), rnd(d_j·ratio_j)
   where rescaled, rnd(d_j·w_j). `task_arithmetic_mix`: with sign consensus (TIES) the d_j that
   agree with the sign of their float32 sum are summed from 0, as are their weights (the
   divisor; 0 -> 1), each sum then rounded; else the d_j summed and rounded, over the given
   divisor; rnd(mix / divisor) when normalising (x / 1 and rnd of a rounded value change no
   bit, so the unnormalised and unscaled cases run the same loop), rnd(mix·scale); base + mix
   (unrounded, as the encode rounds), into base. */
VECTOR void ta_weigh(float *restrict d, const uint8_t *restrict mask, int rescaled, float ratio, float w, size_t n) {
    if (mask && rescaled)
        for (size_t i = 0; i < n; i++)
            d[i] = rnd(rnd(d[i] * (float)mask[i] * ratio) * w);
    else if (mask)
        for (size_t i = 0; i < n; i++)
            d[i] = rnd(d[i] * (float)mask[i] * w);
    else if (rescaled)
        for (size_t i = 0; i < n; i++)
            d[i] = rnd(rnd(d[i] * ratio) * w);
    else
        for (size_t i = 0; i < n; i++)
            d[i] = rnd(d[i] * w);
}

static inline float ta_finish(float mix, float div, float scale) {
    return rnd(rnd(mix / div) * scale);
}

static inline void ta_consensus(float *restrict base, const float *const *ds, const float *weights, size_t models,
                                int normalize, float scale, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float total = ds[0][i], mix = 0.0f, div = 0.0f;
        for (size_t j = 1; j < models; j++)
            total = total + ds[j][i];
        uint8_t positive = total >= 0.0f;
        for (size_t j = 0; j < models; j++) {
            float v = ds[j][i];
            float agree = (float)(((uint8_t)(v > 0.0f) == positive) & (v != 0.0f));
            mix = mix + v * agree;
            div = div + agree * weights[j];
        }
        div = rnd(div);
        div = div == 0.0f ? 1.0f : div;
        base[i] = base[i] + ta_finish(rnd(mix), normalize ? div : 1.0f, scale);
    }
}

static inline void ta_linear(float *restrict base, const float *const *ds, size_t models, float divisor, float scale,
                             size_t n) {
    for (size_t i = 0; i < n; i++) {
        float mix = ds[0][i];
        for (size_t j = 1; j < models; j++)
            mix = mix + ds[j][i];
        base[i] = base[i] + ta_finish(rnd(mix), divisor, scale);
    }
}

VECTOR void task_arithmetic_mix(float *restrict base, const float *const *ds, const float *weights, size_t models,
                                int consensus, int normalize, float divisor, float scale, size_t n) {
    if (consensus && models == 2)
        ta_consensus(base, ds, weights, 2, normalize, scale, n);
    else if (consensus)
        ta_consensus(base, ds, weights, models, normalize, scale, n);
    else if (models == 2)
        ta_linear(base, ds, 2, divisor, scale, n);
    else
        ta_linear(base, ds, models, divisor, scale, n);
}

/* model_stock's write: average = rnd(rnd(Σ w_j, rounded after each add) / count);
   out = rnd(average · t) + rnd(w0 · (1 - t)) (unrounded, as the encode rounds), in ws[0] */
VECTOR static void add_round(float *restrict out, const float *restrict w, size_t n) {
    for (size_t i = 0; i < n; i++)
        out[i] = rnd(out[i] + w[i]);
}

VECTOR void model_stock_combine(const float *restrict w0, float *const *ws, size_t models, float count,
                                const float *restrict t, const float *restrict one_minus_t, size_t stride, size_t n) {
    float *restrict out = ws[0];
    for (size_t j = 1; j < models; j++)
        add_round(out, ws[j], n);
    if (stride == 0) {
        float ct = t[0], cu = one_minus_t[0];
        for (size_t i = 0; i < n; i++)
            out[i] = rnd(rnd(out[i] / count) * ct) + rnd(w0[i] * cu);
    } else {
        for (size_t i = 0; i < n; i++)
            out[i] = rnd(rnd(out[i] / count) * t[i]) + rnd(w0[i] * one_minus_t[i]);
    }
}

/* numpy's np.random.Philox: Philox4x64-10 (Random123). A block is the 4 uint64 of a 256-bit
   counter; numpy bumps the counter (with carry) before each block it draws. */
static inline uint64_t mulhilo64(uint64_t a, uint64_t b, uint64_t *hi) {
    __uint128_t p = (__uint128_t)a * b;
    *hi = (uint64_t)(p >> 64);
    return (uint64_t)p;
}

/* one Philox4x64 round on counter state c with round key (k0, k1) */
static inline void philox_round(uint64_t *c, uint64_t k0, uint64_t k1) {
    uint64_t hi0, hi1;
    uint64_t lo0 = mulhilo64(0xD2E7470EE14C6C93ull, c[0], &hi0);
    uint64_t lo1 = mulhilo64(0xCA5A826395121157ull, c[2], &hi1);
    c[0] = hi1 ^ c[1] ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ k1;
    c[3] = lo0;
}

static inline void philox_block(const uint64_t *ctr, uint64_t k0, uint64_t k1, uint64_t *out) {
    for (int i = 0; i < 4; i++)
        out[i] = ctr[i];
    for (int r = 0; r < 10; r++) {
        if (r) {
            k0 += 0x9E3779B97F4A7C15ull;
            k1 += 0xBB67AE8584CAA73Bull;
        }
        philox_round(out, k0, k1);
    }
}

static inline void philox_bump(uint64_t *c) {
    if (++c[0] == 0 && ++c[1] == 0 && ++c[2] == 0)
        ++c[3];
}

/* two consecutive blocks after counter c (bumped twice), round by round: each block's
   rounds are a chain of dependent multiplies, and two chains keep the multiplier busier */
static inline void philox_blocks2(uint64_t *c, uint64_t k0, uint64_t k1, uint64_t *out) {
    for (int block = 0; block < 2; block++) {
        philox_bump(c);
        for (int i = 0; i < 4; i++)
            out[4 * block + i] = c[i];
    }
    for (int r = 0; r < 10; r++) {
        if (r) {
            k0 += 0x9E3779B97F4A7C15ull;
            k1 += 0xBB67AE8584CAA73Bull;
        }
        philox_round(out, k0, k1);
        philox_round(out + 4, k0, k1);
    }
}

/* np.random.Philox(key=k, counter=counter).random_raw(n) */
void philox_raw(uint64_t k0, uint64_t k1, const uint64_t *counter, size_t n, uint64_t *out) {
    uint64_t c[4] = {counter[0], counter[1], counter[2], counter[3]}, block[4];
    for (size_t i = 0; i < n; i += 4) {
        philox_bump(c);
        philox_block(c, k0, k1, block);
        for (size_t j = 0; j < 4 && i + j < n; j++)
            out[i + j] = block[j];
    }
}

/* keep[i] = word[skip + i] < limit[i·stride]: the stream's uint32 words (each uint64 low half
   first, numpy's random_raw(...).view(uint32)) against one threshold (stride 0) or one per
   element (stride 1), written as the bool mask in one pass, no words array */
void philox_keep(uint64_t k0, uint64_t k1, const uint64_t *counter, size_t skip, size_t n, const uint32_t *limit,
                 size_t stride, uint8_t *keep) {
    uint64_t c[4] = {counter[0], counter[1], counter[2], counter[3]}, block[8];
    size_t i = 0;
    for (; skip >= 8; skip -= 8)
        philox_bump(c);
    if (skip) {  /* the rest of a started block */
        philox_bump(c);
        philox_block(c, k0, k1, block);
        for (size_t j = skip; j < 8 && i < n; j++, i++)
            keep[i] = (uint32_t)(block[j / 2] >> (32 * (j % 2))) < limit[i * stride];
    }
    for (; n - i >= 16; i += 16) {  /* whole pairs of blocks */
        philox_blocks2(c, k0, k1, block);
        const uint32_t *l = limit + i * stride;
        for (int j = 0; j < 8; j++) {
            keep[i + 2 * j] = (uint32_t)block[j] < (stride ? l[2 * j] : l[0]);
            keep[i + 2 * j + 1] = (uint32_t)(block[j] >> 32) < (stride ? l[2 * j + 1] : l[0]);
        }
    }
    for (size_t j = 8; i < n; i++, j++) {  /* the last block or two */
        if (j == 8) {
            philox_bump(c);
            philox_block(c, k0, k1, block);
            j = 0;
        }
        keep[i] = (uint32_t)(block[j / 2] >> (32 * (j % 2))) < limit[i * stride];
    }
}

/* dare's norm pass over one model's task vector x, in pieces of `buffer` elements (numpy's
   buffered cast; a multiple of 8): each piece's keep-mask as philox_keep draws it, into `mask`
   (buffer bytes: it stays in the cache), the l1 norms before and after the mask with
   sum_abs_kept's bits (out[0], out[1]), and the mask packed as np.packbits packs it (the first
   element in the top bit) into bits: one pass instead of four */
void keep_norms(const float *x, size_t n, size_t buffer, uint64_t k0, uint64_t k1, const uint64_t *counter,
                size_t skip, const uint32_t *limit, size_t stride, uint8_t *mask, uint8_t *bits, double *out) {
    double before = 0., after = 0.;
    for (size_t s = 0; s < n; s += buffer) {
        size_t len = n - s < buffer ? n - s : buffer, word = skip + s;
        uint64_t c[4] = {counter[0] + word / 8, counter[1], counter[2], counter[3]};
        if (c[0] < counter[0] && ++c[1] == 0 && ++c[2] == 0)  /* the add carried */
            ++c[3];
        philox_keep(k0, k1, c, word % 8, len, limit + s * stride, stride, mask);
        before += pairwise_abs(x + s, len);
        after += pairwise_kept_abs(x + s, mask, len);
        size_t b = 0;
        for (; 8 * b + 8 <= len; b++) {  /* eight 0/1 bytes -> one byte, element 8b in the top bit */
            uint64_t m;
            memcpy(&m, mask + 8 * b, 8);
            bits[s / 8 + b] = (uint8_t)((m * 0x8040201008040201ull) >> 56);
        }
        if (8 * b < len) {
            uint8_t byte = 0;
            for (size_t j = 0; 8 * b + j < len; j++)
                byte |= (uint8_t)(mask[8 * b + j] << (7 - j));
            bits[s / 8 + b] = byte;
        }
    }
    out[0] = before;
    out[1] = after;
}
"""
# no FMA contraction, no fast-math: every op rounds as numpy's does (the same bits)
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
_P, _N, _F = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_float
SIGNATURES = {  # every pointer is an array's .ctypes.data
    "round_bf16": [_P, _N],
    "encode_bf16": [_P, _P, _N],
    "decode_bf16": [_P, _P, _N],
    "sub_round_bf16": [_P, _P, _N],
    "mul_round_bf16": [_P, _P, _P, _N],
    "square_f64": [_P, _P, _N],
    "magnitude_histogram": [_P, ctypes.c_int, _P, _N],
    "sum_squares": [_P, _N],
    "sum_f32": [_P, _N, _N],
    "sum_abs_kept": [_P, _P, _N, _N, _P],
    "della_limits": [_P, _N, _N, _P, _P, _P],
    "nuslerp_dot_terms": [_P, _P, _P, _P, _N, _N],
    "nuslerp_combine": [_P, _P, _P, _P, _P, _P, _P, _N, _F, _F, _N],
    "model_stock_combine": [_P, _P, _N, _F, _P, _P, _N, _N],
    "ta_weigh": [_P, _P, ctypes.c_int, _F, _F, _N],
    "task_arithmetic_mix": [_P, _P, _P, _N, ctypes.c_int, ctypes.c_int, _F, _F, _N],
    "philox_raw": [ctypes.c_uint64, ctypes.c_uint64, _P, _N, _P],
    "philox_keep": [ctypes.c_uint64, ctypes.c_uint64, _P, _N, _N, _P, _N, _P],
    "keep_norms": [_P, _N, _N, ctypes.c_uint64, ctypes.c_uint64, _P, _N, _P, _N, _P, _P, _P],
}
SUMS = ("sum_squares", "sum_f32")  # return a double
DISABLE_ENV = "DOMAINFORGE_MERGE_NUMPY_ONLY"  # set to 1: the numpy loops (for comparisons)


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256(f"{SOURCE}\0{FLAGS}\0{compiler}\0{platform.machine()}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "domainforge"
    return cache / f"merge-kernels-{key}.so"


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: workers that build at the
    same time never load a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernels.c"
        src.write_text(SOURCE)
        out = Path(tmp) / "kernels.so"
        subprocess.run([compiler, *FLAGS, "-o", str(out), str(src)], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, target)


@functools.lru_cache(maxsize=None)
def kernels() -> Optional[ctypes.CDLL]:
    """The loaded C loops, or None (numpy loops) after one line on stderr saying why."""
    if os.environ.get(DISABLE_ENV) == "1":
        return None
    compiler = os.environ.get("CC") or "cc"
    target = _library_path(compiler)
    try:
        if not target.is_file():
            if shutil.which(compiler) is None:
                raise OSError(f"no C compiler '{compiler}' (install cc, or set CC)")
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        reason = err.stderr.decode(errors="replace").strip().splitlines()[-1:] if isinstance(
            err, subprocess.CalledProcessError) and err.stderr else [str(err)]
        print(f"merge: bf16 loops run in numpy (slower, same bytes): {(reason or [''])[0][:160]}", file=sys.stderr)
        return None
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_double if name in SUMS else None
    return lib
