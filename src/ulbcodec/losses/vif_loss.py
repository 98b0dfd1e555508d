"""Information-fidelity loss: how much of the original's visual information survives decoding.

A differentiable training loss after the pixel-domain, multi-scale form of visual
information fidelity (VIF) of Sheikh and Bovik, "Image information and visual quality"
(IEEE Trans. Image Processing 2006), the measure VMAF reads at four scales
(``vif_scale0..3``). Written here from the paper's definitions (no VMAF code)::

    luma Y(x), Y(x̂) ─► scale s = 0..3: Gaussian window w_s (17, 9, 5, 3 taps, σ = taps/5);
                       before scales 1..3, low-pass with w_s and keep every 2nd pixel
    local statistics under w_s:  σ_o², σ_t², σ_ot             (o original, t decoded)
    distortion channel t = g·o + v:  g = clamp(σ_ot / σ_o², 0, 1),  σ_v² = σ_t² − g·σ_ot
    per scale:  VIF_s = Σ log2(1 + g²σ_o² / (σ_v² + σ_n²)) / Σ log2(1 + σ_o² / σ_n²)
                                                              σ_n² = 2 (visual noise, 8-bit luma)
    loss = 1 − mean_s VIF_s                    0: all information kept, nothing added

Why: at 0.02-0.06 bpp the generative decode already scores above the best AVIF variant on
VMAF's detail feature (ADM, which :mod:`ulbcodec.losses.detail_loss` trains) but well under
it on the coarse VIF scales (benchmarks/vmaf_features.py; docs/training.md, after stage 7),
and nothing in the stage II loss asked for them. Used by stage II (``--vif-weight``), by
the encoder's latent refinement (:mod:`ulbcodec.refinement`) and by the anchor trainer
(``--perceptual-weight``). The gain is clamped to at most 1 (as VMAF's "NEG" mode limits
it): in the paper's channel a contrast boost (g > 1) *raises* VIF above 1, a way to win
the metric without restoring anything, which a trained decoder would find.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCALES = 4
SIGMA_N_SQ = 2.0  # the paper's visual noise variance, on the 0..255 scale of luma
_EPS = 1e-10
GAIN_LIMIT = 1.0  # at most the original's contrast counts as kept (why: module docstring)


def luma(rgb: Tensor) -> Tensor:
    """[B,3,H,W] in [0,1] → BT.709 limited-range luma [B,1,H,W] (16..235), the plane
    VMAF scores in this project (:func:`ulbcodec.metrics.rgb_to_yuv420p_bt709`)."""
    w = torch.tensor((0.2126, 0.7152, 0.0722), device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return 16 + 219 * (rgb * w).sum(1, keepdim=True)


def gaussian_window(taps: int, device=None, dtype=None) -> Tensor:
    """The normalised 1-D Gaussian of ``taps`` taps and σ = taps / 5."""
    x = torch.arange(taps, device=device, dtype=dtype) - (taps - 1) / 2
    w = torch.exp(-0.5 * (x / (taps / 5)) ** 2)
    return w / w.sum()


def _filter(y: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' filtering of [B,C,H,W] (no padding: the window stays inside)."""
    c = y.shape[1]
    y = F.conv2d(y, window.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, window.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def vif_per_scale(decoded: Tensor, original: Tensor, scales: int = SCALES) -> Tensor:
    """[B, scales]: per image and scale the share of the original's information the decoded
    image keeps, in [0, 1] (images [B,3,H,W] in [0,1], at least 64 px on each side)."""
    pair = torch.cat([luma(original), luma(decoded)], 1)  # [B,2,H,W]: filtered together
    out = []
    for s in range(scales):
        taps = 2 ** (SCALES - s) + 1
        window = gaussian_window(taps, pair.device, pair.dtype)
        if s > 0:
            pair = _filter(pair, window)[:, :, ::2, ::2]
        mu = _filter(pair, window)
        second = _filter(torch.cat([pair * pair, pair[:, :1] * pair[:, 1:]], 1), window)
        var_o = (second[:, 0] - mu[:, 0] ** 2).clamp_min(0)
        var_t = (second[:, 1] - mu[:, 1] ** 2).clamp_min(0)
        cov = second[:, 2] - mu[:, 0] * mu[:, 1]
        gain = (cov / (var_o + _EPS)).clamp(0, GAIN_LIMIT)
        noise = (var_t - gain * cov).clamp_min(_EPS)
        num = torch.log2(1 + gain ** 2 * var_o / (noise + SIGMA_N_SQ)).flatten(1).sum(1)
        den = torch.log2(1 + var_o / SIGMA_N_SQ).flatten(1).sum(1)
        out.append(num / den.clamp_min(_EPS))
    return torch.stack(out, 1)


def vif_loss(decoded: Tensor, original: Tensor, scales: int = SCALES) -> Tensor:
    """1 − the mean over scales of :func:`vif_per_scale`, averaged over the batch (0 is perfect)."""
    return 1 - vif_per_scale(decoded, original, scales).mean()
