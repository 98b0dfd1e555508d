"""Block-grid loss: gradient energy a decoder adds on an 8 or 16 px grid, relative to the original.

The measure the generative issue's "no block grid" target is stated in, in torch so that
a decoder can be trained against it; :func:`ulbcodec.metrics.blockiness` reports it
(``1 + grid_excess``) for uint8 images::

    luma Y (BT.601, 8-bit units) of x̂ and x
    per column boundary j (and per row boundary):
        E(j) = mean squared step Y[:, j+1] − Y[:, j]
        r_j  = (E_x̂(j) + 1) / (E_x(j) + 1)        content cancels line by line
    per period p ∈ {8, 16}:
        B_p  = mean r on the grid lines ((j + 1) % p = 0) / mean r elsewhere
    loss = mean over images of max_p max(B_p − 1, 0)      0: no more grid than the original

Why: the transformer of the next-frame decoder writes each 2×2-latent patch (16 px) from
its own token, and its decode showed a grid at that period (BENCHMARKS.md, blockiness up to
1.20 at level 0) that neither MSE nor MS-SSIM nor a patch discriminator charged for. Only
an excess is charged: a decode smoother on the grid lines than elsewhere (B < 1) is not a
grid, and rewarding it would train a blur there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ulbcodec.losses.detail_loss import luma

PERIODS = (8, 16)


def _line_energies(x: Tensor) -> tuple[Tensor, Tensor]:
    """[B, W-1] column-boundary and [B, H-1] row-boundary mean squared luma steps of a
    [B, 3, H, W] batch in [0, 1] (luma in 8-bit units)."""
    y = luma(x.clamp(0, 1))[:, 0]
    cols = (y[..., :, 1:] - y[..., :, :-1]).pow(2).mean(dim=-2)
    rows = (y[..., 1:, :] - y[..., :-1, :]).pow(2).mean(dim=-1)
    return cols, rows


def grid_excess(dist: Tensor, ref: Tensor, periods: tuple[int, ...] = PERIODS) -> Tensor:
    """Per image, max over ``periods`` of B_p − 1 (may be negative), [B]. Both batches
    [B, 3, H, W] in [0, 1], each side over the largest period."""
    if dist.shape != ref.shape or dist.dim() != 4 or dist.shape[1] != 3:
        raise ValueError(f"grid_excess needs two [B, 3, H, W] batches of one shape, got "
                         f"{tuple(dist.shape)} and {tuple(ref.shape)}")
    if min(dist.shape[-2:]) <= max(periods):
        raise ValueError(f"grid_excess needs each side > {max(periods)} px, got {dist.shape[-1]}x{dist.shape[-2]}")
    ratios = [(d + 1.0) / (r + 1.0) for d, r in zip(_line_energies(dist), _line_energies(ref))]
    worst = []
    for p in periods:
        on, off = [], []
        for r in ratios:
            grid = (torch.arange(r.shape[-1], device=r.device) + 1) % p == 0
            on.append(r[:, grid])
            off.append(r[:, ~grid])
        worst.append(torch.cat(on, dim=1).mean(dim=1) / torch.cat(off, dim=1).mean(dim=1) - 1.0)
    return torch.stack(worst, dim=1).max(dim=1).values


def grid_loss(dist: Tensor, ref: Tensor, periods: tuple[int, ...] = PERIODS) -> Tensor:
    """Batch mean of max(:func:`grid_excess`, 0)."""
    return grid_excess(dist, ref, periods).clamp_min(0).mean()
