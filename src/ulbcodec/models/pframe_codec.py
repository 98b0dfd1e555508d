"""Conditional P-frame codec: one video frame coded given the previous decoded frame.

Conditional coding in the line of Microsoft's DCVC family (Li, Li and Lu, "Deep
Contextual Video Compression", NeurIPS 2021; DCVC-DC, CVPR 2023; DCVC-RT, CVPR 2025):
instead of coding a residual ``x - x_ref``, features of the *reference* (the previous
decoded frame, or the diffusion predictor's forecast of this frame) condition the
encoder, the decoder *and* the entropy model. As in DCVC-RT, motion is not coded: the
context is aligned implicitly by the receptive field of the context network, which at
the rates ulbc targets (≈0.002–0.05 bpp) is cheaper than any coded flow.

Data flow (B=1 for entropy coding; H, W multiples of 64)::

    x_ref ─► context ─┬─ c1 [C1, H/2] ─┬─ c2 [C2, H/4] ─┬─ c3 [C3, H/8] ─┬─ prior [M, H/16]
                      │                │                │                │  (rounded to 1/32)
            ┌─────────┴────────────────┴────────────────┴──┐             │
     x ──►──┤ g_a(x | c1, c2, c3)                         ├─ y ×gain[l]  │
            └──────────────────────────────────────────────┘  │          │
                  ┌───┐  z  ┌───┐ ẑ   ┌───┐ hyper [2M, H/16]  │          │
              ┌─►─┤h_a├──►──┤ Q ├─···─┤h_s├──────┐            │          │
              │   └───┘     └───┘ EB  └───┘      ▼            │          │
              y                       ┌──────────┴────────────┴──────────┴──┐
                                      │ checkerboard, 2 parts:              │
                                      │   μ, σ = params(hyper, prior        │
                                      │          [, spatial ctx of part 1]) │
                                      │   ŷ = round(y−μ)+μ  ···rANS(σ)···  │
                                      └──────────────────┬──────────────────┘
                                                         │ ŷ ×inverse_gain[l]
            ┌────────────────────────────────────────────┴─┐
     x̂ ◄───┤ x_ref + g_s(ŷ | c3, c2, c1, x_ref)            │
            └──────────────────────────────────────────────┘

``···`` is what the bitstream carries: one z string and one y string (anchor part, then
non-anchor part, each as the squeezed grid in raster order, as the anchor codec does).

Rate levels: asymmetric gain vectors (Cui et al., CVPR 2021) exactly as in
:class:`~ulbcodec.models.anchor_codec.AnchorCodec`, with the same λ per level, so that a
video's keyframes and P frames share one quality scale.

Determinism: the decoder must rebuild the entropy model's means and scales bit for bit.
Everything that feeds them — the context network up to the temporal prior, h_s, the
parameter networks — runs single-threaded in float32 (the anchor codec's deterministic
entropy path), starting from the *uint8* reference frame; the temporal prior is rounded
to a grid of 1/32 before it enters the parameter networks, so a last-bit difference
between CPUs in the context network moves it only where it lies on a rounding boundary.
The decoded-symbol CRC catches any desynchronisation. g_a and g_s do not touch the
entropy model; the caller runs them on a fixed thread count so that the encoder's
reconstruction (the next frame's reference) equals the decoder's.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import conv3x3, subpel_conv3x3
from compressai.models import CompressionModel

from ulbcodec.entropy.checkerboard import checkerboard_mask, keep_part, squeeze_part, unsqueeze_part
from ulbcodec.entropy.coding import (check_z_string, check_z_symbols, deterministic_entropy_path, rans_safe,
                                     scale_indexes, symbols_crc32)
from ulbcodec.layers import rate_gains
from ulbcodec.models.anchor_codec import _ste_round, resize_cdf_buffers

__all__ = ["PFrameCodec"]

RateLevel = Union[int, float]
PRIOR_STEP = 1.0 / 32  # grid of the temporal prior as it enters the entropy model


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class ResBlock(nn.Module):
    """conv3x3 → LeakyReLU → conv3x3, plus identity."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = conv3x3(ch, ch)
        self.act = _act()
        self.conv2 = conv3x3(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class TemporalContext(nn.Module):
    """The reference frame's multi-scale context features (DCVC-DC's temporal context
    mining, without motion): c1 at H/2, c2 at H/4, c3 at H/8, and the temporal prior for
    the entropy model at H/16. Dilated blocks at H/8 widen the receptive field so the
    context can follow motion implicitly (DCVC-RT)."""

    def __init__(self, widths: Tuple[int, int, int], M: int):
        super().__init__()
        c1, c2, c3 = widths
        self.level1 = nn.Sequential(nn.Conv2d(3, c1, 3, stride=2, padding=1), _act(), ResBlock(c1))
        self.level2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), _act(), ResBlock(c2))
        self.level3 = nn.Sequential(
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), _act(),
            nn.Conv2d(c3, c3, 3, padding=2, dilation=2), _act(),
            nn.Conv2d(c3, c3, 3, padding=4, dilation=4), _act(), ResBlock(c3))
        self.prior = nn.Sequential(nn.Conv2d(c3, M, 3, stride=2, padding=1), _act(), nn.Conv2d(M, M, 3, padding=1))

    def features(self, ref: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        c1 = self.level1(ref)
        c2 = self.level2(c1)
        return c1, c2, self.level3(c2)

    def temporal_prior(self, c3: Tensor) -> Tensor:
        return self.prior(c3)


class ConditionalAnalysis(nn.Module):
    """g_a: x → y at H/16, each scale fused with the context of the same scale."""

    def __init__(self, widths: Tuple[int, int, int], M: int):
        super().__init__()
        c1, c2, c3 = widths
        self.down1 = nn.Sequential(nn.Conv2d(6, c1, 3, stride=2, padding=1), _act())
        self.fuse1 = nn.Sequential(conv3x3(2 * c1, c1), _act(), ResBlock(c1))
        self.down2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), _act())
        self.fuse2 = nn.Sequential(conv3x3(2 * c2, c2), _act(), ResBlock(c2))
        self.down3 = nn.Sequential(nn.Conv2d(c2, c3, 3, stride=2, padding=1), _act())
        self.fuse3 = nn.Sequential(conv3x3(2 * c3, c3), _act(), ResBlock(c3))
        self.down4 = nn.Conv2d(c3, M, 3, stride=2, padding=1)

    def forward(self, x: Tensor, ref: Tensor, context: Sequence[Tensor]) -> Tensor:
        c1, c2, c3 = context
        h = self.fuse1(torch.cat([self.down1(torch.cat([x, ref], 1)), c1], 1))
        h = self.fuse2(torch.cat([self.down2(h), c2], 1))
        h = self.fuse3(torch.cat([self.down3(h), c3], 1))
        return self.down4(h)


class ConditionalSynthesis(nn.Module):
    """g_s: ŷ → x̂ = x_ref + residual, each scale fused with the context of the same scale:
    at zero bits a P frame is at worst a copy of its reference."""

    def __init__(self, widths: Tuple[int, int, int], M: int):
        super().__init__()
        c1, c2, c3 = widths
        self.up3 = nn.Sequential(subpel_conv3x3(M, c3, 2), _act())
        self.fuse3 = nn.Sequential(conv3x3(2 * c3, c3), _act(), ResBlock(c3))
        self.up2 = nn.Sequential(subpel_conv3x3(c3, c2, 2), _act())
        self.fuse2 = nn.Sequential(conv3x3(2 * c2, c2), _act(), ResBlock(c2))
        self.up1 = nn.Sequential(subpel_conv3x3(c2, c1, 2), _act())
        self.fuse1 = nn.Sequential(conv3x3(2 * c1, c1), _act(), ResBlock(c1))
        self.up0 = nn.Sequential(subpel_conv3x3(c1, 16, 2), _act())
        self.out = nn.Sequential(conv3x3(16 + 3, 16), _act(), conv3x3(16, 3))

    def forward(self, y_hat: Tensor, ref: Tensor, context: Sequence[Tensor]) -> Tensor:
        c1, c2, c3 = context
        h = self.fuse3(torch.cat([self.up3(y_hat), c3], 1))
        h = self.fuse2(torch.cat([self.up2(h), c2], 1))
        h = self.fuse1(torch.cat([self.up1(h), c1], 1))
        return ref + self.out(torch.cat([self.up0(h), ref], 1))


class PFrameCodec(CompressionModel):
    """Conditional P-frame codec (see the module docstring for the data flow).

    Args:
        N: channels of z.
        M: channels of y.
        context_widths: channels of the context features at H/2, H/4, H/8.
        num_rate_levels: gain-vector rate levels (≥ 1).

    Frames are RGB in [0, 1], [B, 3, H, W] with H, W multiples of :attr:`required_multiple`
    (the caller pads). The reference must be a decoded frame quantised to uint8 levels
    (``round(255·x)/255``) on the entropy-coding side, as the decoder sees it.
    """

    required_multiple = 64

    reconstruction_ignores_reference = False  # x̂ = x_ref + g_s(...)
    skip_block = None  # every latent position is coded

    def __init__(self, N: int = 64, M: int = 96, context_widths: Sequence[int] = (32, 48, 64),
                 num_rate_levels: int = 6):
        super().__init__()
        widths = tuple(context_widths)
        for name, value in (("N", N), ("M", M), ("num_rate_levels", num_rate_levels), *(
                (f"context_widths[{i}]", w) for i, w in enumerate(widths))):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"PFrameCodec: {name} must be an int in 1..4096, got {value!r}")
        if len(widths) != 3:
            raise ValueError(f"PFrameCodec: context_widths needs 3 widths, got {len(widths)}")
        self.config: Dict[str, Any] = {"N": N, "M": M, "context_widths": list(widths),
                                       "num_rate_levels": num_rate_levels}
        self.N, self.M, self.num_rate_levels = N, M, num_rate_levels
        self.context = TemporalContext(widths, M)
        self.g_a = ConditionalAnalysis(widths, M)
        self.g_s = ConditionalSynthesis(widths, M)
        self.h_a = nn.Sequential(nn.Conv2d(M, N, 3, stride=2, padding=1), _act(),
                                 nn.Conv2d(N, N, 3, stride=2, padding=1))
        self.h_s = nn.Sequential(subpel_conv3x3(N, N, 2), _act(), subpel_conv3x3(N, M, 2), _act(),
                                 conv3x3(M, 2 * M))
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.gaussian_conditional = GaussianConditional(None)
        self.spatial_context = nn.Conv2d(M, 2 * M, 5, padding=2)
        self.params_anchor = self._parameter_net(3 * M)
        self.params_nonanchor = self._parameter_net(5 * M)
        # He initialisation for the leaky ReLUs: torch's default shrinks each layer's output
        # and no GDN renormalises it, which starts y far below the quantisation step, where
        # training settles on a latent of zero bits (docs/training.md).
        # The synthesis's last layer starts near zero, so x̂ starts at the reference: He
        # initialised too, its residuals swamp x̂, and undoing them shrinks y first.
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.g_s.out[-1].weight.mul_(0.01)
        exponents = torch.linspace(-1.0, 1.0, num_rate_levels) if num_rate_levels > 1 else torch.zeros(1)
        init = torch.pow(2.0, exponents)[:, None].repeat(1, M)
        self.gain = nn.Parameter(init.clone())
        self.inverse_gain = nn.Parameter(1.0 / init)

    def _parameter_net(self, in_ch: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_ch, 2 * self.M, 1), _act(), nn.Conv2d(2 * self.M, 2 * self.M, 1), _act(),
                             nn.Conv2d(2 * self.M, 2 * self.M, 1))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PFrameCodec":
        return cls(**dict(config))

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Strict loading that first resizes the CDF buffers to the file's shapes (they
        depend on the data the tables were built from)."""
        resize_cdf_buffers(self, state_dict)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- pieces

    def gains(self, rate_level: RateLevel) -> Tuple[Tensor, Tensor]:
        """(gain, inverse_gain) [1, M, 1, 1]; fractional levels interpolate in the log domain."""
        if isinstance(rate_level, bool) or not isinstance(rate_level, (int, float)):
            raise ValueError(f"rate_level must be an int or float, got {rate_level!r}")
        return rate_gains(self.gain, self.inverse_gain, rate_level)

    def _check_frames(self, *frames: Tensor) -> None:
        shape = None
        for x in frames:
            if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"frames must be [B, 3, H, W] tensors, got {getattr(x, 'shape', type(x))}")
            if x.shape[-2] % self.required_multiple or x.shape[-1] % self.required_multiple:
                raise ValueError(f"frame sides must be multiples of {self.required_multiple}, got {tuple(x.shape)}")
            if shape is not None and x.shape != shape:
                raise ValueError(f"frame and reference differ in shape: {tuple(shape)} vs {tuple(x.shape)}")
            shape = x.shape

    def _prior(self, c3: Tensor) -> Tensor:
        prior = self.context.temporal_prior(c3)
        return _ste_round(prior / PRIOR_STEP) * PRIOR_STEP

    def _entropy_parameters(self, hyper: Tensor, prior: Tensor, quantize) -> Tuple[Tensor, Tensor, Tensor]:
        """The two-part checkerboard shared by forward/compress/decompress; ``quantize(anchor,
        scales, means)`` returns that part's ŷ on the full grid (zeros elsewhere)."""
        base = torch.cat([hyper, prior], 1)
        scales_a, means_a = self.params_anchor(base).chunk(2, 1)
        anchors = quantize(True, scales_a, means_a)
        ctx = self.spatial_context(anchors)
        scales_n, means_n = self.params_nonanchor(torch.cat([base, ctx], 1)).chunk(2, 1)
        y_hat = anchors + quantize(False, scales_n, means_n)
        is_anchor = checkerboard_mask(y_hat.shape[-2], y_hat.shape[-1], True, y_hat.device)
        return y_hat, torch.where(is_anchor, scales_a, scales_n), torch.where(is_anchor, means_a, means_n)

    # ---------------------------------------------------------------- training

    def forward(self, x: Tensor, ref: Tensor, rate_level: RateLevel = 0, noisy: bool = False) -> Dict[str, Any]:
        """Training pass: ``{"x_hat", "likelihoods"}``. ŷ is rounded with a straight-through
        gradient, or with ``noisy`` replaced by y + U(−½, ½) (Ballé et al. 2017): early in
        training the decoder must see a latent that varies with y, or rounding a small y to
        its mean everywhere teaches it to ignore y (the latent collapses to zero bits)."""
        self._check_frames(x, ref)
        gain, inverse = self.gains(rate_level)
        context = self.context.features(ref)
        y = self.g_a(x, ref, context) * gain
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        z_hat = _ste_round(z - medians) + medians
        hyper = self.h_s(z_hat)

        def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
            if noisy:
                return keep_part(y + torch.empty_like(y).uniform_(-0.5, 0.5), anchor)
            return keep_part(_ste_round(y - means) + means, anchor)

        y_hat, scales, means = self._entropy_parameters(hyper, self._prior(context[2]), quantize)
        _, y_likelihoods = self.gaussian_conditional(y, scales, means)
        x_hat = self.g_s(y_hat * inverse, ref, context)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    # ---------------------------------------------------------------- entropy coding

    def _cdf_tables(self) -> Tuple[List[List[int]], List[int], List[int]]:
        gc = self.gaussian_conditional
        if gc.quantized_cdf.numel() == 0:
            raise RuntimeError("PFrameCodec: CDF tables are empty; load weights that include them or call update()")
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    def _context_and_prior(self, ref: Tensor) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tensor]:
        with deterministic_entropy_path(ref.device):
            context = self.context.features(ref.float())
            return context, self._prior(context[2])

    @torch.no_grad()
    def compress(self, x: Tensor, ref: Tensor, rate_level: RateLevel = 0) -> Dict[str, Any]:
        """Code ``x`` [1, 3, H, W] given the decoded ``ref``. Returns ``{"strings": [y, z],
        "shape": z's (h, w), "symbols_crc32", "x_hat"}``; ``x_hat`` (unclamped) is exactly
        what :meth:`decompress` returns on the same machine and thread count."""
        self._check_frames(x, ref)
        if x.shape[0] != 1:
            raise ValueError(f"entropy coding handles one frame at a time (B=1), got B={x.shape[0]}")
        gain, inverse = self.gains(rate_level)
        context, prior = self._context_and_prior(ref)
        y = self.g_a(x, ref, context).float() * gain
        gc = self.gaussian_conditional
        symbols: List[int] = []
        indexes: List[int] = []
        with deterministic_entropy_path(x.device):
            z = self.h_a(y)
            check_z_symbols(self.entropy_bottleneck, z)
            z_strings = self.entropy_bottleneck.compress(z)
            z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
            hyper = self.h_s(z_hat)

            def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                means_sq = squeeze_part(means, anchor)
                part = gc.quantize(squeeze_part(y, anchor), "symbols", means_sq)
                symbols.extend(part.reshape(-1).tolist())
                indexes.extend(scale_indexes(gc, squeeze_part(scales, anchor)).reshape(-1).tolist())
                return unsqueeze_part(part + means_sq, anchor)

            y_hat, _, _ = self._entropy_parameters(hyper, prior, quantize)
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(symbols, indexes, *self._cdf_tables())
            y_string = encoder.flush()
        x_hat = self.g_s(y_hat * inverse, ref, context)
        return {"strings": [y_string, z_strings[0]], "shape": tuple(int(s) for s in z.shape[-2:]),
                "symbols_crc32": symbols_crc32(symbols), "x_hat": x_hat}

    @torch.no_grad()
    def decompress(self, strings: Sequence[bytes], shape: Sequence[int], ref: Tensor,
                   rate_level: RateLevel = 0) -> Dict[str, Any]:
        """Decode :meth:`compress` output given the same ``ref``: ``{"x_hat", "symbols_crc32"}``."""
        self._check_frames(ref)
        if ref.shape[0] != 1:
            raise ValueError(f"entropy decoding handles one frame at a time (B=1), got B={ref.shape[0]}")
        if len(strings) != 2 or not all(isinstance(s, (bytes, bytearray)) for s in strings):
            raise ValueError("strings must be [y_string, z_string]")
        h, w = (int(s) for s in shape)
        if (h * 64, w * 64) != tuple(ref.shape[-2:]):
            raise ValueError(f"z shape {h}x{w} does not match a {tuple(ref.shape[-2:])} reference")
        _, inverse = self.gains(rate_level)
        positions = h * w
        z_string = bytes(strings[1])
        with deterministic_entropy_path(ref.device):
            z_hat = self.entropy_bottleneck.decompress([rans_safe(z_string, self.N * positions)], (h, w))
            check_z_string(self.entropy_bottleneck, z_hat, z_string)
        # the context networks run only for a z string that passed its check
        context, prior = self._context_and_prior(ref)
        gc = self.gaussian_conditional
        symbols: List[int] = []
        with deterministic_entropy_path(ref.device):
            y_string = rans_safe(bytes(strings[0]), self.M * 16 * positions)
            hyper = self.h_s(z_hat)
            cdf = self._cdf_tables()
            decoder = RansDecoder()
            decoder.set_stream(y_string)

            def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                means_sq = squeeze_part(means, anchor)
                values = decoder.decode_stream(scale_indexes(gc, squeeze_part(scales, anchor)).reshape(-1).tolist(), *cdf)
                symbols.extend(values)
                values = torch.tensor(values, dtype=torch.float32, device=ref.device).reshape(means_sq.shape)
                return unsqueeze_part(values + means_sq, anchor)

            y_hat, _, _ = self._entropy_parameters(hyper, prior, quantize)
        x_hat = self.g_s(y_hat * inverse, ref, context)
        return {"x_hat": x_hat, "symbols_crc32": symbols_crc32(symbols)}
