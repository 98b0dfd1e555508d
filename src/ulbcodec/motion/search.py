"""Motion estimation (encoder side only): the mesh field that best predicts a frame.

The decoder never runs this, so it may use floating point and any thread count; what it
decides is written to the file and warped bit-exactly (:mod:`ulbcodec.motion.field`).

Coarse to fine over a luma pyramid (1/4, 1/2, full size): at each stage every candidate
offset δ is added to *all* node vectors, the reference is warped along the resulting
field (bilinear), and each node keeps the δ with the lowest mean absolute error over its
two-cell window plus a smoothness term (the L1 distance to its four neighbours' vectors,
which the planar predictor of :mod:`ulbcodec.motion.coding` turns into few bits). The
last stage searches quarter pels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec.motion.field import QUARTER, SPACINGS, MotionField, grid_shape, warp
from ulbcodec.threads import torch_threads

__all__ = ["estimate", "estimate_vectors", "best_field", "warp_bilinear"]

# (pyramid factor, search radius, step), in full-size pixels
STAGES = ((4, 24.0, 4.0), (2, 4.0, 2.0), (1, 2.0, 1.0), (1, 0.75, 0.25))
_SMOOTHING_SWEEPS = 3
SMOOTHNESS = 3.0  # grey levels of window error that one pixel of vector difference must save
# Candidate offsets are tried together, as many as make this many samples (a few at full
# size, dozens at the pyramid's top): fewer calls, intermediates that stay in cache
_CHUNK_PIXELS = 1 << 16


def _luma(frame: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → luma [1, 1, H, W] in grey levels (the encoder's search input)."""
    f = torch.from_numpy(np.array(frame, dtype=np.float32))
    return (f @ torch.tensor([0.299, 0.587, 0.114]))[None, None]


def _dense(vectors: torch.Tensor, spacing: int, height: int, width: int) -> torch.Tensor:
    """Node vectors [B, rows, cols, 2] → bilinear flow [B, H, W, 2] with nodes every ``spacing``."""
    rows, cols = vectors.shape[1:3]
    dense = F.interpolate(vectors.permute(0, 3, 1, 2), size=((rows - 1) * spacing + 1, (cols - 1) * spacing + 1),
                          mode="bilinear", align_corners=True)
    return dense[:, :, :height, :width].permute(0, 2, 3, 1)


class _Sampler:
    """A reference [B, C, H, W] bilinearly sampled at each pixel + a flow [B, H, W, 2]
    (pixels), clamped to the border; the pixel grid is built once for many flows."""

    def __init__(self, reference: torch.Tensor):
        _, _, h, w = reference.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        self.reference, self.pixels = reference, torch.stack([xs, ys], -1)
        self.scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)])

    def __call__(self, flow: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """The reference sampled along ``flow`` [copies·B, H, W, 2]: ``copies`` flows each."""
        reference = self.reference if copies == 1 else self.reference.repeat(copies, 1, 1, 1)
        return F.grid_sample(reference, (self.pixels + flow) * self.scale - 1, mode="bilinear",
                             padding_mode="border", align_corners=True)


def warp_bilinear(reference: torch.Tensor, vectors: torch.Tensor, spacing: int) -> torch.Tensor:
    """A differentiable stand-in for :func:`~ulbcodec.motion.field.warp` (bilinear, float)
    for training: ``reference`` [B, C, H, W] along node vectors [B, rows, cols, 2] in pixels."""
    h, w = reference.shape[-2:]
    return _Sampler(reference)(_dense(vectors, spacing, h, w))


class _WindowError:
    """Mean |target − reference warped along a flow| over each node's two-cell window
    [D, B, rows, cols], for D flows at once over one (target, reference) pair: the pixel
    grid and each window's pixel count are computed once."""

    def __init__(self, target: torch.Tensor, reference: torch.Tensor, spacing: int, shape: Tuple[int, int]):
        _, _, h, w = target.shape
        rows, cols = shape
        self.target, self.sample, self.spacing, self.shape = target, _Sampler(reference), spacing, shape
        self.pad = (spacing, (cols - 1) * spacing + spacing - w, spacing, (rows - 1) * spacing + spacing - h)
        self.count = F.avg_pool2d(F.pad(torch.ones_like(target), self.pad), 2 * spacing, spacing).clamp_min(1e-6)

    def __call__(self, flow: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Errors [D, B, rows, cols] along ``flow`` [B, H, W, 2] moved by each of ``offsets``
        [D, 2], a few offsets at a time (:data:`_CHUNK_PIXELS`); each value is the one a
        single flow would give."""
        b, h, w = flow.shape[:3]
        per_chunk = max(1, _CHUNK_PIXELS // (b * h * w))
        errors = [self._errors((flow + chunk[:, None, None, None]).reshape(-1, h, w, 2))
                  for chunk in offsets.split(per_chunk)]
        rows, cols = self.shape
        return torch.cat(errors).reshape(len(offsets), b, *errors[0].shape[-3:])[..., 0, :rows, :cols]

    def _errors(self, flows: torch.Tensor) -> torch.Tensor:
        copies = flows.shape[0] // self.target.shape[0]
        sampled = self.sample(flows, copies)
        total = F.avg_pool2d(F.pad((self.target.repeat(copies, 1, 1, 1) - sampled).abs(), self.pad),
                             2 * self.spacing, self.spacing)
        return total / self.count.repeat(copies, 1, 1, 1)


def _neighbour_costs(chosen: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Σ over the 4 neighbours of |chosen_neighbour − candidate|₁, per node: ``chosen``
    [B, rows, cols, 2], ``candidates`` [D, B, rows, cols, 2] → [D, B, rows, cols]."""
    total = torch.zeros(candidates.shape[:4])
    total[..., :, 1:] += (chosen[:, :, :-1] - candidates[:, :, :, 1:]).abs().sum(-1)
    total[..., :, :-1] += (chosen[:, :, 1:] - candidates[:, :, :, :-1]).abs().sum(-1)
    total[..., 1:, :] += (chosen[:, :-1] - candidates[:, :, 1:]).abs().sum(-1)
    total[..., :-1, :] += (chosen[:, 1:] - candidates[:, :, :-1]).abs().sum(-1)
    return total


@torch.no_grad()
def estimate_vectors(target: torch.Tensor, reference: torch.Tensor, spacing: int,
                     smoothness: float = SMOOTHNESS, stages: Sequence[Tuple[int, float, float]] = STAGES
                     ) -> torch.Tensor:
    """Node vectors [B, rows, cols, 2] (pixels, on the last stage's quarter-pel grid) along
    which ``reference`` best predicts ``target``, both luma [B, 1, H, W] in grey levels.
    ``stages``: (pyramid factor, search radius, step) in full-size pixels."""
    b, _, h, w = target.shape
    shape = grid_shape(w, h, spacing)
    vectors = torch.zeros(b, *shape, 2)
    for factor, radius, step in stages:
        if factor > 1 and (min(h, w) // factor < 16 or spacing % factor):
            continue
        t = F.avg_pool2d(target, factor, ceil_mode=True) if factor > 1 else target
        r = F.avg_pool2d(reference, factor, ceil_mode=True) if factor > 1 else reference
        hl, wl = t.shape[-2:]
        offsets = np.arange(-radius, radius + step / 2, step)
        deltas = torch.tensor([(dx, dy) for dy in offsets for dx in offsets], dtype=torch.float32)
        window_error = _WindowError(t, r, spacing // factor, shape)
        # δ moves every node alike, so it moves every pixel alike: the bilinear flow of the
        # nodes is interpolated once per stage
        flow = _dense(vectors, spacing // factor, hl, wl) / factor
        data = window_error(flow, deltas / factor)
        choice = data.argmin(0)
        candidates = vectors + deltas[:, None, None, None]
        for _ in range(_SMOOTHING_SWEEPS):  # iterated conditional modes over the neighbours' choices
            chosen = vectors + deltas[choice]
            choice = (data + smoothness * _neighbour_costs(chosen, candidates)).argmin(0)
        vectors = vectors + deltas[choice]
    return vectors


def luma(frames: torch.Tensor) -> torch.Tensor:
    """RGB [B, 3, H, W] in [0, 1] → luma [B, 1, H, W] in grey levels (what the search compares)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=frames.device).view(1, 3, 1, 1)
    return (frames * weights).sum(1, keepdim=True) * 255


def estimate(target: np.ndarray, reference: np.ndarray, spacing: int,
             smoothness: float = SMOOTHNESS) -> MotionField:
    """The mesh field (at ``spacing``) along which ``reference`` best predicts ``target``
    (HxWx3 uint8 frames). On one thread: a second gains little on these many small
    operations, and a busy core makes every one of them wait for it (the same field on any
    thread count)."""
    with torch_threads(1):
        vectors = estimate_vectors(_luma(target), _luma(reference), spacing, smoothness)[0]
    return MotionField(spacing, torch.round(vectors * QUARTER).to(torch.int32).numpy())


def best_field(target: np.ndarray, reference: np.ndarray,
               cost: Callable[[float, np.ndarray], float]) -> Tuple[Optional[MotionField], np.ndarray, float]:
    """(field or None for no motion, the warped reference, its cost) of the lowest
    ``cost(bits, prediction)`` among no motion and a field at each node spacing; ``bits``
    is the field's coded size plus ~4 bytes for its length prefix, spacing and table bytes."""
    from ulbcodec.motion.coding import coded_bits

    best = (None, reference, cost(0.0, reference))
    h, w = target.shape[:2]
    spacings = [spacing for spacing in SPACINGS if spacing <= 2 * max(h, w)]
    # The searches at each spacing are independent: side by side, each on one thread
    # (estimate), as many at once as the caller has threads.
    with torch_threads(1) as threads, ThreadPoolExecutor(max_workers=max(1, min(threads, len(spacings)))) as pool:
        fields = list(pool.map(lambda spacing: estimate(target, reference, spacing), spacings))
    for field in fields:
        if field.is_zero:
            continue
        warped = warp(reference, field)
        c = cost(coded_bits(field) + 8 * 4, warped)
        if c < best[2]:
            best = (field, warped, c)
    return best
