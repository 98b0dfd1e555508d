"""Detail loss: how much of the original's detail a decoded image restores.

A differentiable training loss after the detail loss measure (DLM) of Li, Zhang, Ma and
Ngan, "Image quality assessment by separately evaluating detail losses and additive
impairments" (IEEE Trans. Multimedia 2011), the measure VMAF calls ADM. It is written
here from the paper's definitions (no VMAF code), simplified where noted::

    luma Y(x), Y(x̂) ─► db2 wavelet, 4 scales ─► detail bands o (original), t (decoded)
    per coefficient:  k = clamp(t / o, 0, 1)        the share of o that t restores
                      r = k · o                     restored detail (never more than o,
                                                    never of the wrong sign)
                      a = t − r                     additive impairment (noise, wrong texture)
    masking:          r' = relu(|r| − mean3×3(|a|) / 3)   impairment hides restored detail
    per scale:        q_s = ∛Σ r'³ / ∛Σ |o|³        (Minkowski pooling over the three bands)
    loss = 1 − mean_s q_s                           0: every detail restored, nothing added

Why: trained on MSE, MS-SSIM and a patch discriminator alone, the one-step decoder added
texture that *lowered* VMAF against the anchor frame (docs/training.md, stage II); MSE pulls
every uncertain coefficient toward zero (blur), while this term pays for detail of the
right sign up to the original's magnitude and charges anything else as impairment that
masks it. Simplifications against the paper/VMAF: no contrast-sensitivity weights (each
scale counts the same), no border crop, masking by a plain 3×3 mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Daubechies-2 analysis filters (orthonormal), low and high pass.
_DB2_LOW = (-0.12940952255092145, 0.22414386804185735, 0.836516303737469, 0.48296291314469025)
_DB2_HIGH = (-0.48296291314469025, 0.836516303737469, -0.22414386804185735, -0.12940952255092145)
SCALES = 4
_EPS = 1e-3  # on the 0..255 scale of luma: far below one grey level


def _db2_kernels(device, dtype) -> Tensor:
    """The four 4×4 separable kernels [LL, LH, HL, HH] as a conv weight [4, 1, 4, 4]."""
    lo = torch.tensor(_DB2_LOW, device=device, dtype=dtype)
    hi = torch.tensor(_DB2_HIGH, device=device, dtype=dtype)
    pairs = [(lo, lo), (lo, hi), (hi, lo), (hi, hi)]  # (vertical, horizontal)
    return torch.stack([v[:, None] * h[None, :] for v, h in pairs])[:, None]


def luma(rgb: Tensor) -> Tensor:
    """[B,3,H,W] in [0,1] → BT.601 luma [B,1,H,W] on the 0..255 scale (as VMAF's 8-bit Y)."""
    w = torch.tensor((0.299, 0.587, 0.114), device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * w).sum(1, keepdim=True) * 255.0


def wavelet_details(y: Tensor, scales: int = SCALES) -> list[Tensor]:
    """[B,1,H,W] → per scale the detail bands [B,3,H/2^s,W/2^s] of a db2 decomposition."""
    kernels = _db2_kernels(y.device, y.dtype)
    out = []
    for _ in range(scales):
        bands = F.conv2d(F.pad(y, (1, 2, 1, 2), mode="reflect"), kernels, stride=2)
        y = bands[:, :1]
        out.append(bands[:, 1:])
    return out


def detail_restoration(decoded: Tensor, original: Tensor, scales: int = SCALES) -> Tensor:
    """Per image the share of the original's detail the decoded image restores, in [0, 1]
    (images [B,3,H,W] in [0,1], sides divisible by 2^scales)."""
    per_scale = []
    for t, o in zip(wavelet_details(luma(decoded), scales), wavelet_details(luma(original), scales)):
        k = (t * o / (o * o + _EPS)).clamp(0, 1)
        r = k * o
        a = t - r
        mask = F.avg_pool2d(a.abs(), 3, stride=1, padding=1, count_include_pad=False) / 3
        restored = F.relu(r.abs() - mask)
        num = restored.pow(3).flatten(1).sum(1).add(1e-12).pow(1 / 3)
        den = o.abs().pow(3).flatten(1).sum(1).add(1e-12).pow(1 / 3)
        per_scale.append(num / den)
    return torch.stack(per_scale, 1).mean(1)


def detail_loss(decoded: Tensor, original: Tensor, scales: int = SCALES) -> Tensor:
    """1 − :func:`detail_restoration`, averaged over the batch (0 is perfect)."""
    return 1 - detail_restoration(decoded, original, scales).mean()
