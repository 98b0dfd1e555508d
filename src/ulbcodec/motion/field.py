"""Mesh motion fields and their bit-exact warp.

A :class:`MotionField` is a grid of control vectors, one per node of a square mesh with
``spacing`` pixels between nodes (node ``(i, j)`` sits on pixel ``(x, y) = (j·s, i·s)``;
the last row and column of nodes lie on or past the frame's edge). Each pixel's motion
is the bilinear interpolation of its cell's four node vectors, so the field is
continuous: a pan is one vector repeated, a zoom or a rotation is a linear field, and no
block edges appear in the prediction (control-grid interpolation, Sullivan and Baker,
ICASSP 1991; the mesh motion of MPEG-4 Part 2).

Everything the decoder computes here is integer arithmetic on uint8 frames, so every
machine warps to the same bytes: vectors are in quarter pels, the interpolated flow is
rounded to eighth pels, and the sample at a fractional position is the separable 4-tap
interpolation with HEVC's eighth-pel chroma filters (coefficients summing to 64),
rounded once. Sample positions outside the frame are clamped to its border.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["MotionField", "SPACINGS", "QUARTER", "MAX_VECTOR", "grid_shape", "warp"]

QUARTER = 4  # vector units per pixel
SPACINGS = (16, 32, 64)  # node spacings a file may use (pixels)
MAX_VECTOR = 1 << 14  # |component| bound in quarter pels (4096 px): larger is a corrupt file
_EIGHTH = 8
# HEVC's chroma interpolation filters, one row per eighth-pel phase (H.265, 8.5.3.3.3.2).
_FILTERS = np.array([[0, 64, 0, 0], [-2, 58, 10, -2], [-4, 54, 16, -2], [-6, 46, 28, -4],
                     [-4, 36, 36, -4], [-4, 28, 46, -6], [-2, 16, 54, -4], [-2, 10, 58, -2]], dtype=np.int64)


def grid_shape(width: int, height: int, spacing: int) -> Tuple[int, int]:
    """(rows, columns) of nodes that cover a width x height frame at ``spacing``."""
    return -(-height // spacing) + 1, -(-width // spacing) + 1


@dataclass(frozen=True)
class MotionField:
    """Control vectors ``vectors[i, j] = (dx, dy)`` in quarter pels (int32), pointing from
    a pixel of the current frame to where its content was in the reference."""

    spacing: int
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if self.spacing not in SPACINGS:
            raise ValueError(f"motion node spacing {self.spacing} not in {SPACINGS}")
        if self.vectors.ndim != 3 or self.vectors.shape[2] != 2:
            raise ValueError(f"motion vectors must be [rows, columns, 2], got {self.vectors.shape}")

    @classmethod
    def zeros(cls, width: int, height: int, spacing: int) -> "MotionField":
        return cls(spacing, np.zeros((*grid_shape(width, height, spacing), 2), np.int32))

    @property
    def is_zero(self) -> bool:
        return not self.vectors.any()

    def fits(self, width: int, height: int) -> bool:
        return self.vectors.shape[:2] == grid_shape(width, height, self.spacing)

    def flow(self, width: int, height: int, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """The dense flow [H, W, 2] (dx, dy) in eighth pels, int64: the bilinear
        interpolation of the node vectors, rounded half up (of the pixel rows
        ``rows = (first, end)`` only, when given)."""
        if not self.fits(width, height):
            raise ValueError(f"a {self.vectors.shape[:2]} node grid does not fit a {width}x{height} frame "
                             f"at spacing {self.spacing}")
        s = self.spacing
        v = self.vectors.astype(np.int64)
        first, end = rows if rows is not None else (0, height)
        xs, ys = np.arange(width), np.arange(first, end)
        j0, ax = xs // s, (xs % s)[None, :, None]
        i0, ay = ys // s, (ys % s)[:, None, None]
        # Along x at every node row, then along y; weights multiply to s² in all.
        node_rows = (s - ax) * v[:, j0] + ax * v[:, j0 + 1]  # [rows, W, 2]
        num = (s - ay) * node_rows[i0] + ay * node_rows[i0 + 1]  # [H, W, 2], quarter pels × s²
        scale = s * s * QUARTER // _EIGHTH  # quarter pels × s² → eighth pels
        return (2 * num + scale) // (2 * scale)


_BAND = 128  # rows warped at a time: intermediates of 128 rows, not of the whole frame
_PAD = 3  # border pixels repeated around the reference: every tap of a clamped position lands in it
_FILTERS_T = torch.from_numpy(_FILTERS.astype(np.int32))


def warp(reference: np.ndarray, field: MotionField) -> np.ndarray:
    """``reference`` (HxWx3 uint8) sampled along ``field``: the motion-compensated
    prediction of the current frame, identical on every machine. The gathers and products
    run in torch's int32 (exact: a 4x4 filter sum stays under 2^21), which gathers faster
    than numpy's fancy indexing (BENCHMARKS.md, "Warp").

    Clamping a sample position to the frame's border is the same as reading a reference
    with its border repeated ``_PAD`` times, its integer position clamped to [−2, W]: a
    position further out has all four taps on the border, like its clamped one, and the
    filter's weights sum to 64 whatever the phase."""
    h, w = reference.shape[:2]
    stride = w + 2 * _PAD
    padded = np.pad(reference, ((_PAD, _PAD), (_PAD, _PAD), (0, 0)), mode="edge")
    flat = torch.from_numpy(padded.reshape(-1, 3)).to(torch.int32)
    out = torch.empty((h, w, 3), dtype=torch.uint8)
    columns = torch.arange(w, dtype=torch.int64)[None, :] * _EIGHTH
    for first in range(0, h, _BAND):
        end = min(h, first + _BAND)
        flow = torch.from_numpy(field.flow(w, h, (first, end)))
        x = (columns + flow[..., 0]).reshape(-1)
        y = (torch.arange(first, end, dtype=torch.int64)[:, None] * _EIGHTH + flow[..., 1]).reshape(-1)
        # the top-left tap of each pixel's 4x4 neighbourhood in the padded reference
        corner = (torch.clamp(y >> 3, -2, h) + _PAD - 1) * stride + torch.clamp(x >> 3, -2, w) + _PAD - 1
        wx, wy = _FILTERS_T[x & 7], _FILTERS_T[y & 7]  # [pixels, 4]
        acc = torch.zeros((x.numel(), 3), dtype=torch.int32)
        for a in range(4):
            row = corner + a * stride
            line = wx[:, 0, None] * flat.index_select(0, row)
            for b in range(1, 4):
                line += wx[:, b, None] * flat.index_select(0, row + b)
            acc += wy[:, a, None] * line
        out[first:end] = torch.clamp((acc + 2048) >> 12, 0, 255).to(torch.uint8).view(end - first, w, 3)
    return out.numpy()
