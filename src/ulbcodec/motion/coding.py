"""Entropy coding of a mesh motion field: planar prediction, then rANS with integer tables.

::

    vectors [rows, cols, 2] ──► − pred(left + top − top-left) ──► d (quarter pels)
    d_x, d_y ──► rANS(table t_x), rANS(table t_y) ──► string          (raster order)
    payload: spacing, t_x << 4 | t_y, string             (bitstream.MotionPayload)

The planar predictor is exact for a pan and for the linear fields of a zoom or a
rotation, so camera motion codes to a run of zero differences, which the steepest of the
tables charges a few hundredths of a bit each. The tables are two-sided geometric
distributions over -16..16 built in integer arithmetic (no floating point), so encoder
and decoder hold the same CDFs on every machine; larger differences take CompressAI's
escape (bypass) path. The encoder picks, per component, the table that codes the field
in the fewest bits.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Sequence, Tuple

import numpy as np

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import RansDecoder, RansEncoder

from ulbcodec.bitstream import BitstreamError, MotionPayload
from ulbcodec.entropy.coding import rans_safe
from ulbcodec.motion.field import MAX_VECTOR, SPACINGS, MotionField, grid_shape

__all__ = ["compress", "decompress", "coded_bits"]

_HALF = 16  # table symbols cover differences -16..16
_PRECISION = 16
# Decay of each table per unit of |d|, in 1/1024: from p(0) ≈ 0.99 to p(0) ≈ 0.1.
_DECAYS = (1, 3, 8, 20, 40, 70, 110, 160, 220, 290, 370, 460, 550, 640, 750, 870)


@lru_cache(maxsize=None)
def _table(index: int) -> Tuple[int, ...]:
    """Quantised CDF (CompressAI layout: 33 symbols, the escape, 2^16 at the end)."""
    decay = _DECAYS[index]
    weights, w = [], 1 << 40
    for _ in range(_HALF + 1 + 48):
        weights.append(w)
        w = w * decay // 1024
    centre = weights[: _HALF + 1]
    pmf = [centre[abs(k)] for k in range(-_HALF, _HALF + 1)] + [2 * sum(weights[_HALF + 1:])]
    total = sum(pmf)
    freq = [max(1, p * (1 << _PRECISION) // total) for p in pmf]
    freq[_HALF] += (1 << _PRECISION) - sum(freq)  # the remainder to the most probable symbol
    cdf = [0]
    for f in freq:
        cdf.append(cdf[-1] + f)
    return tuple(cdf)


def _predictions(vectors: np.ndarray) -> np.ndarray:
    """Each node's prediction from its decoded neighbours: planar (left + top − top-left)
    inside, linear extrapolation along the first row and column (so that the first row
    of a zoom costs nothing either), the previous node at the second, 0 at the first."""
    v = vectors.astype(np.int64)
    pred = np.zeros_like(v)
    pred[0, 1:2], pred[0, 2:] = v[0, :1], 2 * v[0, 1:-1] - v[0, :-2]
    pred[1:2, 0], pred[2:, 0] = v[:1, 0], 2 * v[1:-1, 0] - v[:-2, 0]
    pred[1:, 1:] = v[1:, :-1] + v[:-1, 1:] - v[:-1, :-1]
    return pred


def _from_differences(d: np.ndarray) -> np.ndarray:
    """The inverse of ``vectors − _predictions(vectors)``: the edges by double cumulative
    sums (their prediction is linear), then the planar part by a 2-D prefix sum of the
    first-order steps."""
    steps = d.copy()
    # along an edge, step j = step j-1 + d_j and the first step is d_1
    steps[0, 1:], steps[1:, 0] = np.cumsum(d[0, 1:], 0), np.cumsum(d[1:, 0], 0)
    return steps.cumsum(0).cumsum(1)


def _bits(histogram: Sequence[Tuple[int, int]], index: int) -> float:
    """Exact cost of the symbols of ``histogram`` ((value, count) pairs) under table
    ``index``, escapes at their bypass length."""
    cdf = _table(index)
    escape = -math.log2((cdf[-1] - cdf[-2]) / (1 << _PRECISION))
    total = 0.0
    for value, count in histogram:
        k = value + _HALF
        if 0 <= k <= 2 * _HALF:
            total += count * -math.log2((cdf[k + 1] - cdf[k]) / (1 << _PRECISION))
        else:
            raw = 2 * abs(value) + 1
            total += count * (escape + 4 * (1 + (raw.bit_length() + 3) // 4) + 4)
    return total


def _best_table(symbols: Sequence[int]) -> Tuple[int, float]:
    histogram = [(int(v), int(c)) for v, c in zip(*np.unique(np.asarray(symbols), return_counts=True))]
    costs = [_bits(histogram, t) for t in range(len(_DECAYS))]
    best = int(np.argmin(costs))
    return best, costs[best]


def _differences(field: MotionField) -> Tuple[List[int], List[int]]:
    d = field.vectors.astype(np.int64) - _predictions(field.vectors)
    return d[..., 0].ravel().tolist(), d[..., 1].ravel().tolist()


def coded_bits(field: MotionField) -> float:
    """The bits :func:`compress` spends on ``field``'s string (tables chosen as it does)."""
    dx, dy = _differences(field)
    return _best_table(dx)[1] + _best_table(dy)[1]


def compress(field: MotionField) -> MotionPayload:
    if np.abs(field.vectors).max(initial=0) > MAX_VECTOR:
        raise ValueError(f"motion vector beyond ±{MAX_VECTOR} quarter pels")
    dx, dy = _differences(field)
    tx, ty = _best_table(dx)[0], _best_table(dy)[0]
    symbols = [s for pair in zip(dx, dy) for s in pair]
    indexes = [tx, ty] * len(dx)
    string = _rans(RansEncoder().encode_with_indexes, symbols, indexes)
    return MotionPayload(field.spacing, tx << 4 | ty, string)


def decompress(payload: MotionPayload, width: int, height: int) -> MotionField:
    """The field of a payload for a width x height frame; a corrupt one raises BitstreamError."""
    if payload.spacing not in SPACINGS:
        raise BitstreamError(f"motion node spacing {payload.spacing} not in {SPACINGS}")
    rows, cols = grid_shape(width, height, payload.spacing)
    n = rows * cols
    tx, ty = payload.tables >> 4, payload.tables & 15
    string = rans_safe(payload.string, 2 * n)
    symbols = _rans(lambda *a: RansDecoder().decode_with_indexes(string, *a), None, [tx, ty] * n)
    d = np.asarray(symbols, np.int64).reshape(rows, cols, 2)
    if np.abs(d).max(initial=0) > 4 * MAX_VECTOR:
        raise BitstreamError("motion field out of range")
    v = _from_differences(d)
    if np.abs(v).max(initial=0) > MAX_VECTOR:
        raise BitstreamError("motion field out of range")
    return MotionField(payload.spacing, v.astype(np.int32))


def _rans(call, symbols, indexes: List[int]):
    tables = [list(_table(t)) for t in range(len(_DECAYS))]
    lengths = [len(c) for c in tables]
    offsets = [-_HALF] * len(tables)
    if symbols is None:
        return call(indexes, tables, lengths, offsets)
    return call(symbols, indexes, tables, lengths, offsets)
