"""Checkerboard partition of a latent for two-pass context coding.

::

    row 0:  n A n A n A        A: anchor positions, (row + col) odd, coded first
    row 1:  A n A n A n        n: non-anchor positions, coded second with the anchors
    row 2:  n A n A n A           as context

A part is coded as the squeezed ``[C, H, W/2]`` grid of its positions in raster order
(even rows take odd columns, odd rows take even columns).
"""

from __future__ import annotations

import torch
from torch import Tensor


# Checkerboard helpers. "Anchor" positions are those with (row + col) odd; they are coded
# first, the remaining ("non-anchor") positions second, with the anchors as context.


def checkerboard_mask(h: int, w: int, anchor: bool, device: torch.device) -> Tensor:
    """Boolean [h, w] mask of anchor (row+col odd) or non-anchor (row+col even) positions."""
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    odd = (rows + cols) % 2 == 1
    return odd if anchor else ~odd


def keep_part(x: Tensor, anchor: bool) -> Tensor:
    """Zero every position of ``x`` [B, C, H, W] that is not of the requested kind."""
    mask = checkerboard_mask(x.shape[-2], x.shape[-1], anchor, x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def squeeze_part(x: Tensor, anchor: bool) -> Tensor:
    """Gather one checkerboard part of ``x`` [B, C, H, W] into a dense [B, C, H, W/2] grid.

    Row r keeps the columns of the requested parity: for anchors, even rows take odd
    columns and odd rows take even columns; non-anchors the other way round. This is also
    the order in which the part's symbols go into the bitstream.
    """
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, h, w // 2)
    even_col, odd_col = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2] = x[:, :, 0::2, even_col::2]
    out[:, :, 1::2] = x[:, :, 1::2, odd_col::2]
    return out


def unsqueeze_part(x: Tensor, anchor: bool) -> Tensor:
    """Inverse of :func:`squeeze_part`: scatter [B, C, H, W/2] back, zeros elsewhere."""
    b, c, h, half_w = x.shape
    out = x.new_zeros(b, c, h, half_w * 2)
    even_col, odd_col = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2, even_col::2] = x[:, :, 0::2]
    out[:, :, 1::2, odd_col::2] = x[:, :, 1::2]
    return out
