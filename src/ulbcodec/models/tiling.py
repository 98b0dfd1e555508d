"""Run a fully-convolutional transform over a large image in overlapping tiles.

The analysis and synthesis transforms are local (convolutions, GDN, per-pixel MLPs), so
a tile that carries ``margin`` extra pixels of context on every side produces, in its
core, the same output as the whole image would, up to the small influence of context
beyond the margin. Cores are stitched without blending: with a margin of 64 input
pixels (4 latent rows) the seams are below the codec's own error (tested in
tests/test_image_codec.py). Peak memory is that of one tile, whatever the image size.

Entropy coding is *not* tiled: the latent of the whole image is coded as one string, so
tiling changes neither the rate nor the bitstream layout.

Determinism: each tile runs with ONE intra-op thread, and tiles run in parallel on a
pool of ``workers`` Python threads (torch releases the GIL). Multi-threaded CPU kernels
may split reductions differently for different thread counts; single-threaded kernels
on a tiling that depends only on the image size give the same pixels whatever the
thread count of the machine (tests/test_image_codec.py checks 1 vs 2 threads).

::

     input (H x W)                         output (H*s x W*s)
    +-----+-----+-----+                   +-----+-----+-----+
    |core |core |core |  each core +      |     |     |     |
    |  +margin  |     |  margin -> fn ->  |core | ... |     |   keep only the core
    +-----+-----+-----+                   +-----+-----+-----+
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

Scales = Union[Fraction, Sequence[Fraction]]


def tiled_apply(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    scale: Scales,
    core: int,
    margin: int,
    workers: Optional[int] = None,
    side: Sequence[Tuple[torch.Tensor, Fraction]] = (),
):
    """Apply ``fn`` (which maps [B,C,h,w] to [B,C',h*scale,w*scale]) tile by tile.

    ``core`` and ``margin`` are in input pixels and must make ``core*scale`` and
    ``margin*scale`` whole numbers. An input that fits into one tile is processed whole.
    ``workers`` defaults to torch's current intra-op thread count.

    ``side`` holds further inputs at other resolutions, each as (tensor, its size relative
    to ``x``); their crops of the same tile are passed to ``fn`` after the tile of ``x``.
    With a sequence of scales, ``fn`` returns a tuple of outputs, one per scale, and so
    does ``tiled_apply``.
    """
    multi = not isinstance(scale, (Fraction, int))
    scales = [Fraction(s) for s in (scale if multi else [scale])]
    for sc in scales + [Fraction(r) for _, r in side]:
        for name, value in (("core", core), ("margin", margin)):
            if (value * sc).denominator != 1:
                raise ValueError(f"tile {name} {value} is not a whole number of pixels at scale {sc}")
    _, _, h, w = x.shape
    if h <= core + 2 * margin and w <= core + 2 * margin:
        boxes = [(0, 0, h, w, 0, 0, h, w)]
    else:
        boxes = []
        for top in range(0, h, core):
            for left in range(0, w, core):
                bottom, right = min(top + core, h), min(left + core, w)
                boxes.append((top, left, bottom, right, max(top - margin, 0), max(left - margin, 0),
                              min(bottom + margin, h), min(right + margin, w)))
    workers = workers or torch.get_num_threads()
    out: list = [None] * len(scales)

    def crop(t: torch.Tensor, sc: Fraction, a: int, b: int, c: int, d: int) -> torch.Tensor:
        return t[:, :, int(a * sc) : int(b * sc), int(c * sc) : int(d * sc)]

    grad = torch.is_grad_enabled()
    allocation = threading.Lock()

    def run(box) -> None:
        # OpenMP's thread count is per calling thread: a pool thread must set its own, or
        # it would fork a team of its own (more memory, and thread-count-dependent floats).
        torch.set_num_threads(1)
        top, left, bottom, right, t0, l0, t1, l1 = box
        # Grad mode is per thread too: a pool thread would record an autograd graph under a
        # caller's no_grad (every activation kept: 12 GB for a 12 MP synthesis).
        with torch.set_grad_enabled(grad):
            tiles = fn(x[:, :, t0:t1, l0:l1], *(crop(t, Fraction(r), t0, t1, l0, l1) for t, r in side))
        for i, (tile, sc) in enumerate(zip(tiles if multi else [tiles], scales)):
            with allocation:
                if out[i] is None:  # first finished tile allocates (same shape from any tile)
                    out[i] = tile.new_empty(tile.shape[:-2] + (int(h * sc), int(w * sc)))
            out[i][..., int(top * sc) : int(bottom * sc), int(left * sc) : int(right * sc)] = tile[
                ..., int((top - t0) * sc) : int((bottom - t0) * sc), int((left - l0) * sc) : int((right - l0) * sc)
            ]

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1 or len(boxes) == 1:
            for box in boxes:
                run(box)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(boxes))) as pool:
                list(pool.map(run, boxes))
    finally:
        torch.set_num_threads(previous)
    return tuple(out) if multi else out[0]
