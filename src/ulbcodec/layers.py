"""Building blocks of the anchor codec's transforms (:mod:`ulbcodec.models.anchor_codec`),
after NeFIC's published layers: residual conv blocks (CompressAI's conv3x3, GDN and
sub-pixel convolutions) and per-pixel token MLPs.

Names of sub-modules are those of the released state_dict (``information_transformer_layes``
and the like are spelled as published), so that the official weights load strictly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.layers import GDN, conv3x3, subpel_conv3x3


def conv_activations(x: Tensor) -> Tensor:
    """``x`` in the memory layout the transforms' convolutions run fastest in: channels-last
    for inference (oneDNN's faster layout for them, BENCHMARKS.md issue 28), the default
    layout while autograd records, because torch 2.13's float32 backward through these
    convolutions in channels-last crashes on AVX2-only CPUs (docs/measurements.md)."""
    if torch.is_grad_enabled():
        return x.contiguous()
    return x.contiguous(memory_format=torch.channels_last)


class StridedResidualBlock(nn.Module):
    """conv3x3(stride) → GELU → conv3x3 → GDN, plus a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.gdn = GDN(out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.gdn(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        return out + shortcut


class ResidualConvBlock(nn.Module):
    """conv3x3 → GELU → conv3x3 → GELU, plus an identity (or 1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        return out + shortcut


class UpsamplingResidualBlock(nn.Module):
    """Sub-pixel ×2 conv → GELU → conv3x3 → inverse GDN, plus a sub-pixel shortcut."""

    def __init__(self, in_ch: int, out_ch: int, factor: int = 2):
        super().__init__()
        self.subpel_conv = subpel_conv3x3(in_ch, out_ch, factor)
        self.act = nn.GELU()
        self.conv = conv3x3(out_ch, out_ch)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = subpel_conv3x3(in_ch, out_ch, factor)

    def forward(self, x: Tensor) -> Tensor:
        out = self.igdn(self.conv(self.act(self.subpel_conv(x))))
        return out + self.upsample(x)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by CLIP-style MLPs: x·σ(1.702x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenMLPBlock(nn.Module):
    """Per-pixel token block: ``x += out(value(ln1(x)))``; ``x += MLP(ln2(x))``.

    Attention-free (each token only mixes its own channels); width d → 2d → d MLP.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(dim, dim * 2)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(dim * 2, dim)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.output_proj(self.value_proj(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


def token_stack(dim: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[TokenMLPBlock(dim) for _ in range(depth)])


def apply_per_pixel(feat: Tensor, project_in: nn.Module, blocks: nn.Module, project_out: nn.Module) -> Tensor:
    """Run Linear → token blocks → Linear on every pixel of ``feat`` [B, C, H, W].

    Keeps the exact tensor layout of the published code (flatten, transpose without a
    copy) because the GEMM path, and hence the last bits, can depend on it.
    """
    b, c, h, w = feat.shape
    tokens = feat.reshape(b, c, h * w).transpose(1, 2)
    tokens = project_out(blocks(project_in(tokens)))
    return tokens.transpose(1, 2).reshape(b, -1, h, w)


def rate_gains(gain: Tensor, inverse_gain: Tensor, rate_level: float) -> Tuple[Tensor, Tensor]:
    """(gain, inverse_gain) of one rate level as [1, M, 1, 1], from the per-level gain
    vectors [L, M] (asymmetric gained compression, Cui et al. 2021). A fractional level
    interpolates its two neighbours geometrically: log-gains are linear in the level."""
    top = gain.shape[0] - 1
    if not 0 <= rate_level <= top:
        raise ValueError(f"rate_level must lie in [0, {top}], got {rate_level}")
    low = int(math.floor(rate_level))
    frac = float(rate_level) - low
    g, inverse = gain[low].abs(), inverse_gain[low].abs()
    if frac > 0:
        g = g.pow(1.0 - frac) * gain[low + 1].abs().pow(frac)
        inverse = inverse.pow(1.0 - frac) * inverse_gain[low + 1].abs().pow(frac)
    return g.view(1, -1, 1, 1), inverse.view(1, -1, 1, 1)

