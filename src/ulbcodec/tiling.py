"""Tiles: how large images go through the networks with bounded memory.

Two ways, both runtime helpers (no learned maths): :func:`tiled_apply` stitches the cores
of overlapping tiles without blending (the anchor codec's local transforms), and
:func:`blended_tiles` blends overlapping tiles with linear ramps (the next-frame decoder,
whose attention and GroupNorms are global within a tile), with the tile sizes the
next-frame decoder and the device-memory estimate (placement.py) share.

Stitched tiles (``tiled_apply``)
--------------------------------

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
from typing import Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ulbcodec.threads import torch_threads

Scales = Union[Fraction, Sequence[Fraction]]

# Tiles run on a pool of (at most) 2 threads, each tile on one intra-op thread, so the
# pixels do not depend on the pool size. Each worker holds one tile's working set, hence
# no more than 2 (speed and memory: docs/measurements.md, "Tile workers").
TILE_WORKERS = 2


def tile_workers() -> int:
    """Tile workers for this process: TILE_WORKERS, or fewer threads if torch has fewer."""
    return max(1, min(TILE_WORKERS, torch.get_num_threads()))


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

    with torch_threads(1):
        if workers <= 1 or len(boxes) == 1:
            for box in boxes:
                run(box)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(boxes))) as pool:
                list(pool.map(run, boxes))
    return tuple(out) if multi else out[0]


def in_parallel(*calls: Callable[[], Tensor]) -> Tuple[Tensor, ...]:
    """``tuple(call() for call in calls)``; on the CPU without gradients and with
    :func:`tile_workers` > 1, on that many Python threads, each call on ONE intra-op thread
    (independent networks side by side, instead of each waiting on an OpenMP team)."""
    workers = min(tile_workers(), len(calls))
    if workers <= 1 or torch.is_grad_enabled():
        return tuple(call() for call in calls)

    def run(call):
        torch.set_num_threads(1)  # this pool thread's own count (see tiled_apply)
        with torch.no_grad():
            return call()

    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        return tuple(pool.map(run, calls))


# ------------------------------------------------------------------ blended tiles (next-frame decoder)

# Transformer tiles, in latent pixels (x8 for image pixels): the size the transformer
# was trained on (its config's sample_height/width), kept between these bounds, with a
# quarter of it to blend over. Attention over a larger window than the training crops
# costs fidelity (docs/measurements.md, "Transformer tiles").
# 64 latents = 512 px, 2048 tokens for the two temporal tokens (a CogVideoX base model's
# crops are larger; its tiles stay at 64 to bound memory).
MIN_LATENT_TILE = 32
MAX_LATENT_TILE = 64
# Tiles go through the transformer in batches of about this many latents (8 tiles of 32,
# 2 of 64): per-call overheads dominate small tiles, while large tiles gain nothing and
# cost memory.
TILE_BATCH_LATENTS = 8 * 32 * 32

# VAE tiles: 512 px with 128 px of overlap. The VAE's convolutions are local but its
# GroupNorms take statistics over the whole tile, so its tiles are blended too.
VAE_TILE = 512
VAE_OVERLAP = 128
# A VAE at most this wide at full resolution (the shipped one has 16 channels there)
# takes tiles twice as large: less overlap to compute again, for a little more memory. A
# wide VAE (CogVideoX's own: 128 channels) keeps 512 px, whose activations are larger.
NARROW_VAE_CHANNELS = 32


def transformer_tile(config: Mapping) -> Tuple[int, int]:
    """(side, overlap) in latents of the transformer's tiles, from its diffusers config."""
    trained = min(config.get("sample_height", MAX_LATENT_TILE), config.get("sample_width", MAX_LATENT_TILE))
    side = max(MIN_LATENT_TILE, min(MAX_LATENT_TILE, int(trained)))
    return side, side // 4


def tile_batch(side: int) -> int:
    """How many transformer tiles of ``side`` latents go through it at once."""
    return max(1, TILE_BATCH_LATENTS // (side * side))


def vae_tile(full_resolution_channels: int) -> int:
    """Side in pixels of the VAE's tiles for a VAE this wide at full resolution."""
    return 2 * VAE_TILE if full_resolution_channels <= NARROW_VAE_CHANNELS else VAE_TILE


def blend_ramp(size: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """1-D weights: linear ramps over the overlap at the inner edges, 1 elsewhere."""
    w = torch.ones(size)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if not at_start:
            w[:overlap] = ramp
        if not at_end:
            w[-overlap:] = ramp.flip(0)
    return w


def tile_starts(length: int, tile: int, overlap: int) -> Iterator[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        yield 0
        return
    stride = tile - overlap
    start = 0
    while True:
        if start + tile >= length:
            yield length - tile
            return
        yield start
        start += stride


def even_tile(length: int, tile: int, overlap: int, align: int = 8) -> int:
    """The side of the fewest tiles of at most ``tile`` that cover ``length`` with
    ``overlap``, made as even as ``align`` allows.

    A fixed side wastes work where the last tile is pushed back over its neighbour (a
    4000 px side in 512 px tiles with 128 of overlap: 11 tiles, 5632 px of work); spread
    evenly, the same 11 tiles need only 480 px each (5280 px).
    """
    if length <= tile:
        return length
    n = -(-(length - overlap) // (tile - overlap))
    side = -(-(length + (n - 1) * overlap) // n)
    return min(tile, -(-side // align) * align)


def blended_tiles(fn, *inputs: Tensor, tile: int, overlap: int, scale: Fraction = Fraction(1),
                  even: bool = False, batch: int = 1, workers: int = 1) -> Tensor:
    """Apply ``fn(*tiles)`` on overlapping tiles of the inputs, blending the overlaps.

    ``tile`` and ``overlap`` are in pixels of the inputs (which share one size): tiles of
    side ``tile``, or with ``even`` the fewest tiles of at most ``tile`` spread evenly
    (:func:`even_tile`, sides multiples of 8: whole latents for pixel inputs); ``fn``
    returns [B, C, side·scale, side·scale]. Weights ramp linearly across each overlap and
    sum to one everywhere, so a function that commutes with cropping is reproduced
    exactly, and one that does not (attention, GroupNorm statistics) changes smoothly
    from one tile to the next instead of showing a seam. With ``batch`` > 1, ``fn`` sees
    up to that many tiles at once, stacked along the batch dimension (all tiles have one
    size), and must treat the samples of a batch independently.

    With ``workers`` > 1 and at least that many calls, the calls run on a pool of
    ``workers`` Python threads, each on ONE intra-op thread (as :func:`tiled_apply`'s
    tiles): the small element-wise ops of a tile then never wait on an OpenMP team, which
    on a CPU shared with other work cost the transformer 3x (issue 28); fewer calls keep
    the caller's threads. Blending stays in tile order.
    """
    scale = Fraction(scale)
    b, _, h, w = inputs[0].shape
    th, tw = (even_tile(n, tile, overlap) if even else min(tile, n) for n in (h, w))
    if any((n * scale).denominator != 1 for n in (th, tw, overlap)):
        raise ValueError(f"tile {th}x{tw} / overlap {overlap} are not whole output pixels at scale {scale}")
    oh, ow = int(h * scale), int(w * scale)
    out, weight = None, torch.zeros(1, 1, oh, ow)
    ys, xs = list(tile_starts(h, th, overlap)), list(tile_starts(w, tw, overlap))
    starts = [(y, x) for y in ys for x in xs]
    sh, sw, ov = int(th * scale), int(tw * scale), int(overlap * scale)
    # Batches of one size (12 tiles in at most 8: 6 + 6, not 8 + 4), the last padded with
    # copies of its last tile where the tiles do not divide evenly: every call then has
    # the same shape, and a new process compiles its CPU kernels for one shape only.
    calls = -(-len(starts) // max(1, batch))
    size = -(-len(starts) // calls)
    groups = [starts[first:first + size] for first in range(0, len(starts), size)]
    grad = torch.is_grad_enabled()

    def run(group, one_thread: bool = False):
        if one_thread:  # a pool thread: its own OpenMP count and grad mode (see tiled_apply)
            torch.set_num_threads(1)
        padded = group + group[-1:] * (size - len(group))
        with torch.set_grad_enabled(grad):
            tiles = (torch.cat([t[:, :, y:y + th, x:x + tw] for y, x in padded]) for t in inputs)
            return fn(*tiles).float().split(b)

    if workers > 1 and len(groups) >= workers:
        with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            outputs = pool.map(lambda g: run(g, True), groups)
            done = list(zip(groups, outputs))
    else:
        done = ((group, run(group)) for group in groups)
    for group, results in done:
        for (y, x), res in zip(group, results):
            if out is None:
                out = res.new_zeros(res.shape[:2] + (oh, ow))
            y0, x0 = int(y * scale), int(x * scale)
            wy = blend_ramp(sh, min(ov, sh), y == ys[0], y == ys[-1])
            wx = blend_ramp(sw, min(ov, sw), x == xs[0], x == xs[-1])
            wt = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y0 : y0 + sh, x0 : x0 + sw] += res * wt
            weight[:, :, y0 : y0 + sh, x0 : x0 + sw] += wt
    return out / weight
