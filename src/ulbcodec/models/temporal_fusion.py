"""Temporal fusion of a low-rate P frame with its motion-compensated reference: the
decoder side of a fused P frame (GOP syntax 5, docs/bitstream.md; component
``temporal_fusion`` of a video package, trained by :mod:`ulbcodec.train.temporal_fusion`).

A latent-conditional P frame (:mod:`ulbcodec.models.latent_conditional_codec`) decodes to
exactly what the keyframe codec gives for its own latent: it inherits nothing from its
reference, so the encoder's only cheap inter frame is a warp, and detail returns only with
a keyframe. Here the P frame is coded at a *low* rate level and the decoder fuses its
decode with the reference warped along the coded motion field, in the spirit of the
conditional decoders of learned video codecs (Li, Li and Lu, "Deep Contextual Video
Compression", NeurIPS 2021): the reference supplies the detail, the P frame what changed.
The fusion costs no bits and the fused frame becomes the next frame's reference.

Data flow::

    P-frame decode x̂_p (level p) ─┐     ┌─────────┐   m (blend, per pixel)
    warped reference x̃ (level k) ─┼────►┤  U-Net  ├─► c (correction, RGB)
    p, k (as constant planes) ────┘     └─────────┘
                                          x̂ = x̃ + m·(x̂_p − x̃) + c

At initialisation ``c = 0`` and ``m = sigmoid(-4) ≈ 0.018``: the output is (almost) the warp
alone, the mode the encoder already has, and training moves it from there.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import Tensor, nn

MAX_LEVEL = 5.0  # levels are fed as level / MAX_LEVEL: the packages' rate levels run 0..5
_INITIAL_BLEND_LOGIT = -4.0


class TemporalFusion(nn.Module):
    """``forward(decoded, reference, level, reference_level)`` → the fused frame
    [B, 3, H, W] (H, W multiples of 4; values unclamped)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.config: Dict[str, Any] = {"width": width}
        w = width
        self.inp = nn.Sequential(nn.Conv2d(8, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU())
        self.down1 = nn.Sequential(nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                                   nn.GELU())
        self.down2 = nn.Sequential(nn.Conv2d(2 * w, 3 * w, 4, 2, 1), nn.GELU(),
                                   *[m for _ in range(3) for m in (nn.Conv2d(3 * w, 3 * w, 3, padding=1), nn.GELU())])
        self.up2 = nn.ConvTranspose2d(3 * w, 2 * w, 4, 2, 1)
        self.mid1 = nn.Sequential(nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU())
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, 2, 1)
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, 4, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        with torch.no_grad():
            self.out[-1].bias[3] = _INITIAL_BLEND_LOGIT

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TemporalFusion":
        return cls(**dict(config))

    def forward(self, decoded: Tensor, reference: Tensor, level: float, reference_level: float) -> Tensor:
        if decoded.shape != reference.shape or decoded.ndim != 4 or decoded.shape[1] != 3:
            raise ValueError(f"decoded and reference must be equal [B, 3, H, W], got {tuple(decoded.shape)} "
                             f"and {tuple(reference.shape)}")
        if decoded.shape[-2] % 4 or decoded.shape[-1] % 4:
            raise ValueError(f"frame sides must be multiples of 4, got {tuple(decoded.shape[-2:])}")
        planes = [torch.full_like(decoded[:, :1], float(v) / MAX_LEVEL) for v in (level, reference_level)]
        a = self.inp(torch.cat([decoded, reference, *planes], 1))
        b = self.down1(a)
        c = self.down2(b)
        d = self.mid1(self.up2(c) + b)
        out = self.out(self.up1(d) + a)
        blend = torch.sigmoid(out[:, 3:])
        return reference + blend * (decoded - reference) + out[:, :3]
