"""Colour statistics side information and the published NeFIC colour fix.

NeFIC's published test pipeline (``NeFICCodec.forward`` → ``adain_color_fix_quant(pred,
gt, 16)``) corrects the decoded image's per-channel mean and standard deviation to
those of the ORIGINAL image, read at the decoder and never counted in its bpp. ulbc
makes that side information honest: the encoder measures the statistics, quantises
them exactly as published, and stores them in a 12-byte ancillary ``colr`` chunk
(docs/bitstream.md) that is part of the file and of its size; the decoder applies the
published fix from the chunk::

    image x in [0,1] ─► floor(255·x)/255 ─► per channel: mean μ, std σ = sqrt(var_{N−1} + 1e-5)
                     ─► μ, σ rounded to multiples of 1/65535 ─► 6 × uint16 (big-endian): μR μG μB σR σG σB

    fix(pred) = floor(255 · clamp((p − μp)/σp · σg + μg, 0, 1)) / 255,   p = floor(255·pred)/255

(``floor`` is ToPILImage's truncation; every statistic is computed in float32 with
torch's reductions, as the published code does: tests/test_nefic_conformance.py
compares them, and the fixed image, with the vectors of tests/data/nefic_e2e/.)
The fixed image lies on the 1/255 grid, so ulbc's final rounding to uint8 is exact.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ulbcodec.errors import BitstreamError

#: Quantisation of the statistics: 16 bits, multiples of 1/65535 (published ``bits=16``).
LEVELS = (1 << 16) - 1
EPS = 1e-5  # added to the unbiased variance before the square root (published)
PAYLOAD_BYTES = 12


def to_u8_grid(x: Tensor) -> Tensor:
    """ToPILImage then ToTensor: ``floor(255·x) / 255`` (truncation, as ``.byte()``), float32."""
    return x.mul(255).to(torch.uint8).float().div(255)


def measure(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Quantised per-channel (mean, std) of a [1,3,H,W] image on the 1/255 grid, each [3]
    in float32 on multiples of 1/65535."""
    flat = x.float().reshape(x.shape[0], x.shape[1], -1)
    mean = flat.mean(dim=2)
    # one pixel has no unbiased variance (published: NaN); ulbc takes 0, so σ = sqrt(1e-5)
    var = flat.var(dim=2) if flat.shape[2] > 1 else torch.zeros_like(mean)
    std = (var + EPS).sqrt()
    return (torch.round(mean * LEVELS) / LEVELS)[0], (torch.round(std * LEVELS) / LEVELS)[0]


@dataclass(frozen=True)
class ColorStats:
    """An image's quantised per-channel statistics, as integers k (value k/65535)."""

    mean: Tuple[int, int, int]
    std: Tuple[int, int, int]

    @classmethod
    def of_rgb(cls, rgb: np.ndarray) -> "ColorStats":
        """Statistics of an HxWx3 uint8 image (the encoder's original, at its coded size)."""
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float().div(255)
        return cls.of_tensor(x)

    @classmethod
    def of_tensor(cls, x: Tensor) -> "ColorStats":
        """Statistics of a [1,3,H,W] image in [0,1] (quantised to u8 first, as published)."""
        mean, std = measure(to_u8_grid(x))
        as_int = [int(v) for v in torch.round(torch.cat([mean, std]) * LEVELS).tolist()]
        return cls(tuple(as_int[:3]), tuple(as_int[3:]))

    def tensors(self) -> Tuple[Tensor, Tensor]:
        """(mean, std) as float32 [3] tensors, equal to the published quantised values."""
        return (torch.tensor(self.mean, dtype=torch.float32) / LEVELS,
                torch.tensor(self.std, dtype=torch.float32) / LEVELS)

    def to_bytes(self) -> bytes:
        return struct.pack(">6H", *self.mean, *self.std)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "ColorStats":
        if len(payload) != PAYLOAD_BYTES:
            raise BitstreamError(f"colr chunk of {len(payload)} bytes, expected {PAYLOAD_BYTES}")
        values = struct.unpack(">6H", payload)
        if any(v == 0 for v in values[3:]):
            raise BitstreamError("colr chunk has a zero standard deviation (the encoder adds 1e-5: never 0)")
        return cls(values[:3], values[3:])

    def as_dict(self) -> dict:
        mean, std = self.tensors()
        return {"mean": [round(v, 5) for v in mean.tolist()], "std": [round(v, 5) for v in std.tolist()]}


def color_fix(pred: Tensor, target: ColorStats) -> Tensor:
    """The published ``adain_color_fix_quant(pred, gt, 16)`` then clamp, with the
    original's statistics from the file. ``pred``: [1,3,H,W] in [0,1], any float dtype
    (cast to float32, as ``NeFICCodec.forward`` does); returns float32 on the 1/255 grid."""
    p = to_u8_grid(pred.float().clamp(0, 1))
    mean_p, std_p = measure(p)
    mean_g, std_g = (t.to(p.device) for t in target.tensors())
    shape = (1, -1, 1, 1)
    out = (p - mean_p.view(shape)) / std_p.view(shape) * std_g.view(shape) + mean_g.view(shape)
    return to_u8_grid(out.clamp(0, 1)).clamp(0, 1)
