"""The anchor codec's rate-distortion terms, shared by everything that optimises against
them: its training (:func:`ulbcodec.train.anchor.rd_loss`), stage II of the generative
decoder (:mod:`ulbcodec.train.generative`, the same distortion / 50) and the encoder's
latent refinement (:mod:`ulbcodec.refinement`)::

    rate        R = Σ −log₂ p  over every likelihood tensor, per pixel
    distortion  D = 0.3·255²·MSE + 1300·(1 − MS-SSIM)
    perceptual  P = detail loss (ADM) + VIF loss   (optional, weighted: D + w·P)

Why both terms of D: MS-SSIM from scratch does not learn and MS-SSIM alone shifts colours;
1300 puts 1 − MS-SSIM on the scale of 255²·MSE at these rates (docs/training.md).
Why P: D alone spends every bit on smoothness, which VMAF marks down; the detail and VIF
losses credit a decoded image with at most the original's own detail and contrast
(:mod:`ulbcodec.losses.detail_loss`, :mod:`ulbcodec.losses.vif_loss`), so nothing is won
by sharpening beyond it.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ulbcodec.losses.detail_loss import SCALES as DETAIL_SCALES
from ulbcodec.losses.detail_loss import detail_loss
from ulbcodec.losses.vif_loss import vif_loss

MSE_WEIGHT = 0.3 * 255**2
MSSSIM_WEIGHT = 1300.0
PERCEPTUAL_MIN_SIDE = 64  # VIF's four scales (losses/vif_loss.py)


def bits_per_pixel(likelihoods: Mapping[str, Tensor], num_pixels: int) -> Tensor:
    """R: the bits the likelihoods stand for (CompressAI's bound keeps each ≥ 1e-9), per pixel."""
    return sum(-torch.log2(l.float().clamp_min(1e-9)).sum() for l in likelihoods.values()) / num_pixels


def anchor_distortion(x_hat: Tensor, x: Tensor, win_size: int = 11) -> Tuple[Tensor, Tensor, Tensor]:
    """(D, MSE, MS-SSIM) of a decoded batch against the originals (both [B, 3, H, W] in [0, 1],
    each side over (win_size - 1)·16 px for MS-SSIM's five scales: 161 px with the default
    11 px window); MS-SSIM on the clamped image."""
    from pytorch_msssim import ms_ssim

    mse = F.mse_loss(x_hat, x)
    msssim = ms_ssim(x_hat.clamp(0, 1), x, data_range=1.0, win_size=win_size)
    return MSE_WEIGHT * mse + MSSSIM_WEIGHT * (1 - msssim), mse, msssim


def perceptual_terms(x_hat: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(detail loss, VIF loss) of a decoded batch against the originals ([B, 3, H, W] in
    [0, 1], at least :data:`PERCEPTUAL_MIN_SIDE` px each side). The detail loss's wavelet
    takes the top-left crop whose sides divide by 16; VIF takes the whole image."""
    whole = 2**DETAIL_SCALES
    h16, w16 = x.shape[-2] // whole * whole, x.shape[-1] // whole * whole
    return detail_loss(x_hat[..., :h16, :w16], x[..., :h16, :w16]), vif_loss(x_hat, x)
