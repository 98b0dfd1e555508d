"""Encoder-side latent refinement: a better latent for the same decoder.

The analysis transform maps every image to its latent in one pass (amortised inference),
which leaves an *amortisation gap*: for one given image, some other latent has a lower
rate-distortion cost under the very same decoder and entropy model. Refinement closes
part of the gap by gradient descent on the latent of that one image (Campos, Meierhans,
Djelouah and Schroers, "Content adaptive optimization for neural image compression",
CVPR workshops 2019; Yang, Bamler and Mandt, "Improving inference for neural image
compression", NeurIPS 2020). Only the encoder changes: a refined file is an ordinary
file, decoded by the unchanged decoder::

    x ─► g_a ─► y₀ ─► y ◄──────────────────────── Adam, `steps` steps, cosine step size
                      │                                   ▲
                      ├─► AnchorCodec.forward_latent ─► x̂ ─┤ D(x̂, x) on the image's pixels
                      └─► −log₂ p(y + u), −log₂ p(z + u) ──┘ R (uniform-noise proxies)
    loss = R / pixels + λ_l · (0.3·255²·MSE + 1300·(1 − MS-SSIM) + 500·(ADM + VIF losses))
    y ─► AnchorCodec.encode_latent ─► bitstream (coded exactly as an unrefined latent)

The objective is the anchor codec's own training loss at the level's λ
(:mod:`ulbcodec.losses.rate_distortion`, as :func:`ulbcodec.train.anchor.rd_loss` uses it) plus the detail (ADM) and information-fidelity
(VIF) losses of :mod:`ulbcodec.losses`, weighted against the distortion as in stage II of
the generative decoder's training (10 against distortion/50). Both credit a decoded image
with at most the original's own detail and contrast, so the latent cannot win them by
sharpening beyond the original. Measured on a held-out 768x480 photograph (Garden.png,
level 2, 30 steps, models/generative of stage 7, whose anchor codec had not yet learnt
these terms itself (docs/training.md, stage 8); benchmarks/refine_objectives.py measures
the same over several photographs and levels with the shipped model, BENCHMARKS.md):

  ============================  ======  ==================  ===================
  objective                      bits    anchor PSNR / VMAF  generative PSNR / VMAF
  ============================  ======  ==================  ===================
  none (g_a alone)               —       27.14 / 20.9        26.61 / 28.5
  training loss only             −15.7 % 27.38 / 18.1        26.71 / 27.3
  + detail and VIF (this one)    −8.4 %  27.46 / 34.0        26.37 / 41.1
  ============================  ======  ==================  ===================

The training loss alone closes part of the amortisation gap as the papers report, but
spends the gain on smoothness, which VMAF marks down; the two perceptual terms spend
part of it on the original's detail.

Optimiser: Adam at step size 0.01 with a cosine decay. Adam moves every element by about
the step size per step whatever its gradient, so at 0.05 the latent drifted: the
objective *rose* (while VMAF rose further) — a perturbation, not a refinement. At 0.01 the
objective with the rounded latent's true rate falls (tests/test_refinement.py). The rate
takes uniform-noise proxies (training's), the reconstruction straight-through rounding
(training's); the noise comes from a fixed seed, so the same image and settings give the
same file. Stochastic Gumbel annealing (Yang et al.) did worse here: at 8-20 steps its
soft rounding is still far from the hard one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ulbcodec.losses.rate_distortion import (MSE_WEIGHT, PERCEPTUAL_MIN_SIDE, anchor_distortion, bits_per_pixel,
                                             perceptual_terms)

PERCEPTUAL_WEIGHT = 500.0  # per unit of the detail and VIF losses (stage II: 10 against D/50)
LEARNING_RATE = 0.01
MAX_PIXELS = 1920 * 1088  # 1080p: the backward pass holds every activation (about 2.5 GB per MP)
MSSSIM_MIN_SIDE = 161  # five scales of an 11-tap window


@dataclass(frozen=True)
class RefineSettings:
    """How the encoder refines a latent (``ulbc encode --refine-steps``)."""

    steps: int = 30
    lr: float = LEARNING_RATE
    perceptual_weight: float = PERCEPTUAL_WEIGHT  # 0: the anchor codec's training loss alone
    seed: int = 0


def refinement_loss(out: dict, x: Tensor, lmbda: float,
                    perceptual_weight: float = PERCEPTUAL_WEIGHT) -> Tuple[Tensor, dict]:
    """The refinement objective of one :meth:`AnchorCodec.forward_latent` output against the
    original ``x`` [1, 3, H, W] (the decoded frame is cropped to H×W first). Terms the
    image is too small for (MS-SSIM under 161 px, detail and VIF under 64 px) are left out."""
    height, width = x.shape[-2:]
    x_hat = out["anchor_frame"][..., :height, :width].float()
    rate = bits_per_pixel(out["likelihoods"], height * width)
    if min(height, width) >= MSSSIM_MIN_SIDE:
        distortion, mse, msssim = anchor_distortion(x_hat, x)
    else:
        mse = F.mse_loss(x_hat, x)
        distortion, msssim = MSE_WEIGHT * mse, None
    terms = {"bpp_proxy": rate.item(), "psnr": -10 * math.log10(max(mse.item(), 1e-12))}
    if msssim is not None:
        terms["ms_ssim"] = msssim.item()
    if perceptual_weight and min(height, width) >= PERCEPTUAL_MIN_SIDE:
        detail, vif = perceptual_terms(x_hat, x)
        distortion = distortion + perceptual_weight * (detail + vif)
        terms.update(detail=detail.item(), vif=vif.item())
    return rate + lmbda * distortion, terms


def refine_latent(model, x: Tensor, y: Tensor, rate_level, lmbda: float, settings: RefineSettings) -> Tensor:
    """The refined latent of one image: ``settings.steps`` Adam steps on the objective above
    from ``y`` (= ``model.analyze(x_padded, rate_level=rate_level)``, the padded image's
    latent), with ``x`` [1, 3, H, W] the original at its own size in [0, 1]. Returns a new
    tensor; the model's weights, modes and gradients are left as they were. The backward
    pass holds every activation of the whole image: callers bound its size
    (:data:`MAX_PIXELS`, checked by :meth:`ulbcodec.image.ImageCodec.encode`)."""
    steps, lr = settings.steps, settings.lr
    if steps <= 0:
        return y
    wanted = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    latent = y.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=lr)
    try:
        devices = [latent.device] if latent.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(settings.seed)
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                out = model.forward_latent(latent, rate_level, with_bypass=False, noisy_likelihoods=True)
                loss, _ = refinement_loss(out, x, lmbda, settings.perceptual_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, flag in zip(model.parameters(), wanted):
            p.requires_grad_(flag)
    return latent.detach()
