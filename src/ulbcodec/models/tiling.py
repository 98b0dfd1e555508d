"""Run a fully-convolutional transform over a large image in overlapping tiles.

The analysis and synthesis transforms are local (convolutions, GDN, per-pixel MLPs), so
a tile that carries ``margin`` extra pixels of context on every side produces, in its
core, the same output as the whole image would, up to the small influence of context
beyond the margin. Cores are stitched without blending: with a margin of 64 input
pixels (4 latent rows) the seams are below the codec's own error (tested in
tests/test_image_codec.py). Peak memory is that of one tile, whatever the image size.

Entropy coding is *not* tiled: the latent of the whole image is coded as one string, so
tiling changes neither the rate nor the bitstream layout.

::

     input (H x W)                         output (H*s x W*s)
    +-----+-----+-----+                   +-----+-----+-----+
    |core |core |core |  each core +      |     |     |     |
    |  +margin  |     |  margin -> fn ->  |core | ... |     |   keep only the core
    +-----+-----+-----+                   +-----+-----+-----+
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable

import torch


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    scale: Fraction,
    core: int,
    margin: int,
) -> torch.Tensor:
    """Apply ``fn`` (which maps [B,C,h,w] to [B,C',h*scale,w*scale]) tile by tile.

    ``core`` and ``margin`` are in input pixels and must make ``core*scale`` and
    ``margin*scale`` whole numbers. When the input fits into one tile, ``fn`` runs once
    on the whole input, so small images are never tiled.
    """
    scale = Fraction(scale)
    _, _, h, w = x.shape
    if h <= core + 2 * margin and w <= core + 2 * margin:
        return fn(x)
    for name, value in (("core", core), ("margin", margin)):
        if (value * scale).denominator != 1:
            raise ValueError(f"tile {name} {value} is not a whole number of output pixels at scale {scale}")
    out = None
    for top in range(0, h, core):
        for left in range(0, w, core):
            bottom, right = min(top + core, h), min(left + core, w)
            t0, l0 = max(top - margin, 0), max(left - margin, 0)
            t1, l1 = min(bottom + margin, h), min(right + margin, w)
            tile = fn(x[:, :, t0:t1, l0:l1])
            if out is None:
                out = tile.new_empty(tile.shape[:2] + (int(h * scale), int(w * scale)))
            out[:, :, int(top * scale) : int(bottom * scale), int(left * scale) : int(right * scale)] = tile[
                :, :, int((top - t0) * scale) : int((bottom - t0) * scale),
                int((left - l0) * scale) : int((right - l0) * scale),
            ]
    return out
