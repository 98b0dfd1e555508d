"""The latent codec of the P-frame codecs: a hyperprior plus a two-part checkerboard whose
entropy parameters also see a *temporal prior* computed from the reference frame.

::

    ref ─► reference context ─► prior (rounded to 1/32)          [deterministic path]
    x ─► analysis(x | context) ×gain ─► y
    hyper input(y, prior) ─► h_a ─► z ─► EB (z string) ─► h_s ─► hyper
    for part in (anchor, non-anchor):
        μ, σ = entropy parameters(hyper, prior [, decoded anchors])
        symbols = round(y − μ) ─► rANS (σ index)      (decode: rANS ─► symbols + μ)
    ŷ ×inverse_gain ─► synthesis(ŷ | context) ─► x̂

:class:`ConditionalCheckerboardLatentCodec` is a mixin holding no parameters of its own.
The model supplies ``gains``, ``h_a``, ``h_s``, ``entropy_bottleneck``,
``gaussian_conditional``, ``N`` (z channels), ``M`` (y channels) and five hooks:
``_reference_context(ref)`` (called inside the deterministic entropy path),
``_analyze``, ``_hyper_input``, ``_entropy_parameters`` and ``_synthesize``. The
bitstream is one z string and one y string (anchor part, then non-anchor part, each as
the squeezed grid in raster order); z lies at 1/64 of the frame, y at 1/16.

Determinism: everything that feeds the means and scales (the reference context up to
the prior, h_a's input on the encoder side, h_s, the parameter networks) runs
single-threaded in float32; the analysis and synthesis transforms run on the caller's
thread count, which the caller keeps equal on both sides so that the encoder's
reconstruction (the next frame's reference) equals the decoder's.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import BufferedRansEncoder, RansDecoder

from ulbcodec.entropy.checkerboard import squeeze_part, unsqueeze_part
from ulbcodec.entropy.coding import check_z_string, check_z_symbols, deterministic_entropy_path, rans_safe, symbols_crc32

PRIOR_STEP = 1.0 / 32  # grid of the temporal prior as it enters the entropy model
Z_STRIDE = 64  # z's positions per side, relative to the frame's pixels
Y_PER_Z = 16  # y positions per z position (y at 1/16 of each side, z at 1/64)


def round_prior(prior: Tensor) -> Tensor:
    """The temporal prior on a grid of :data:`PRIOR_STEP` (straight-through gradient): a
    last-bit difference between CPUs in the network before it moves a value only where
    it lies on a rounding boundary, and the decoded-symbol check catches that."""
    scaled = prior / PRIOR_STEP
    return (scaled + (torch.round(scaled) - scaled).detach()) * PRIOR_STEP


class ConditionalCheckerboardLatentCodec:
    """compress()/decompress() of a frame given its reference (mixin: see the module docstring).

    Frames are RGB in [0, 1], [1, 3, H, W] with H, W multiples of :attr:`required_multiple`
    (the caller pads). The reference must be a decoded frame on uint8 levels
    (``round(255·x)/255``), as the decoder sees it.
    """

    required_multiple = Z_STRIDE

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

    def _cdf_tables(self) -> Tuple[List[List[int]], List[int], List[int]]:
        gc = self.gaussian_conditional
        if gc.quantized_cdf.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}: CDF tables are empty; load weights that include them "
                               "or call update()")
        return gc.quantized_cdf.tolist(), gc.cdf_length.reshape(-1).int().tolist(), gc.offset.reshape(-1).int().tolist()

    def _context_and_prior(self, ref: Tensor, rate_level) -> Tuple[Any, Tensor]:
        with deterministic_entropy_path(ref.device):
            return self._reference_context(ref.float(), rate_level)

    @torch.no_grad()
    def compress(self, x: Tensor, ref: Tensor, rate_level=0) -> Dict[str, Any]:
        """Code ``x`` [1, 3, H, W] given the decoded ``ref``. Returns ``{"strings": [y, z],
        "shape": z's (h, w), "symbols_crc32", "x_hat"}``; ``x_hat`` (unclamped) is exactly
        what :meth:`decompress` returns on the same machine and thread count."""
        self._check_frames(x, ref)
        if x.shape[0] != 1:
            raise ValueError(f"entropy coding handles one frame at a time (B=1), got B={x.shape[0]}")
        gain, inverse = self.gains(rate_level)
        context, prior = self._context_and_prior(ref, rate_level)
        y = self._analyze(x, ref, context).float() * gain
        gc = self.gaussian_conditional
        symbols: List[int] = []
        indexes: List[int] = []
        with deterministic_entropy_path(x.device):
            z = self.h_a(self._hyper_input(y, prior))
            check_z_symbols(self.entropy_bottleneck, z)
            z_strings = self.entropy_bottleneck.compress(z)
            z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
            hyper = self.h_s(z_hat)

            def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                means_sq = squeeze_part(means, anchor)
                part = gc.quantize(squeeze_part(y, anchor), "symbols", means_sq)
                symbols.extend(part.reshape(-1).tolist())
                indexes.extend(gc.build_indexes(squeeze_part(scales, anchor)).reshape(-1).tolist())
                return unsqueeze_part(part + means_sq, anchor)

            y_hat, _, _ = self._entropy_parameters(hyper, prior, quantize)
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(symbols, indexes, *self._cdf_tables())
            y_string = encoder.flush()
        x_hat = self._synthesize(y_hat * inverse, ref, context)
        return {"strings": [y_string, z_strings[0]], "shape": tuple(int(s) for s in z.shape[-2:]),
                "symbols_crc32": symbols_crc32(symbols), "x_hat": x_hat}

    @torch.no_grad()
    def decompress(self, strings: Sequence[bytes], shape: Sequence[int], ref: Tensor, rate_level=0) -> Dict[str, Any]:
        """Decode :meth:`compress` output given the same ``ref``: ``{"x_hat", "symbols_crc32"}``."""
        self._check_frames(ref)
        if ref.shape[0] != 1:
            raise ValueError(f"entropy decoding handles one frame at a time (B=1), got B={ref.shape[0]}")
        if len(strings) != 2 or not all(isinstance(s, (bytes, bytearray)) for s in strings):
            raise ValueError("strings must be [y_string, z_string]")
        h, w = (int(s) for s in shape)
        if (h * Z_STRIDE, w * Z_STRIDE) != tuple(ref.shape[-2:]):
            raise ValueError(f"z shape {h}x{w} does not match a {tuple(ref.shape[-2:])} reference")
        _, inverse = self.gains(rate_level)
        positions = h * w
        z_string = bytes(strings[1])
        with deterministic_entropy_path(ref.device):
            z_hat = self.entropy_bottleneck.decompress([rans_safe(z_string, self.N * positions)], (h, w))
            check_z_string(self.entropy_bottleneck, z_hat, z_string)
        # the reference's networks run only for a z string that passed its check
        context, prior = self._context_and_prior(ref, rate_level)
        gc = self.gaussian_conditional
        symbols: List[int] = []
        with deterministic_entropy_path(ref.device):
            y_string = rans_safe(bytes(strings[0]), self.M * Y_PER_Z * positions)
            hyper = self.h_s(z_hat)
            cdf = self._cdf_tables()
            decoder = RansDecoder()
            decoder.set_stream(y_string)

            def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                means_sq = squeeze_part(means, anchor)
                values = decoder.decode_stream(gc.build_indexes(squeeze_part(scales, anchor)).reshape(-1).tolist(), *cdf)
                symbols.extend(values)
                values = torch.tensor(values, dtype=torch.float32, device=ref.device).reshape(means_sq.shape)
                return unsqueeze_part(values + means_sq, anchor)

            y_hat, _, _ = self._entropy_parameters(hyper, prior, quantize)
        x_hat = self._synthesize(y_hat * inverse, ref, context)
        return {"x_hat": x_hat, "symbols_crc32": symbols_crc32(symbols)}
