"""Latent-conditional P frames: the keyframe codec's own symbols, entropy coded given the
latent of the reference frame.

Conditional entropy coding of video (Liu, Wang, Mu, Lin and Urtasun, "Conditional Entropy
Coding for Efficient Video Compression", ECCV 2020): every frame goes through the *image*
codec, and the temporal redundancy is removed by the entropy model alone. Here the image
codec is the video package's keyframe codec (:class:`~ulbcodec.models.anchor_codec.AnchorCodec`)
and its whole latent codec stays as it is — hyperprior, slices, checkerboard, means μ,
latent residual prediction — so a P frame's ŷ, and its decoded frame, are exactly what
the same frame coded as a keyframe would give. Only the distribution that each symbol
``k = round(y − μ)`` is coded with changes: a small network, :class:`TemporalLatentPrior`,
predicts ``k`` from ``r = p − μ``, where ``p`` is the reference's latent, and narrows its
scale where the reference is a good prediction.

Why not the keyframe codec's transforms with a new entropy model (and new means): at
this project's rates its synthesis decodes only latents of the form its own entropy model
produces (ŷ close to its hyperprior's means); the unquantised y decodes 7 dB worse at the
lowest level (docs/training.md). Keeping μ keeps the decoder on its own distribution.

Data flow (B=1 for entropy coding; H, W multiples of 64)::

            ┌─────┐       ┌───────────────┐
    x_ref ─►┤ g_a ├─×gain─┤ round to 1/32 ├─► p [M, H/16]                      (reference)
            └─────┘       └───────────────┘   │
            ┌─────┐                            │    the keyframe codec's latent codec:
     x ───►─┤ g_a ├─×gain─► y ─► h_a ─► z ···EB··· ẑ ─► h_s ─► for each slice, part:
            └─────┘                            │          μ, σ = context models
                                               ▼          k = round(y − μ)
                     ┌────────────────────────────────┐    │
                     │ TemporalLatentPrior[slice,part]│◄───┤ μ, σ
                     │  (r = p − μ, log σ) ─► m, σ'   │    │
                     └──────────────┬─────────────────┘    ▼
                                    └──────► k − round(m) ···rANS(σ')···  ŷ = k + μ (+ LRP)
                                                                            │ ×inverse_gain
                                                                 x̂ ◄── g_s ─┘

``···`` is what the bitstream carries: the keyframe codec's z string and one y string,
whose symbols are offset by ``round(m)`` and coded under σ' with the keyframe codec's
own CDF tables. Untrained (the output layers start at zero), ``m = 0`` and ``σ' = σ``: a
P frame codes exactly as a keyframe.

Determinism: ``p`` comes from ``g_a`` run in the deterministic entropy path (one
thread, float32) and is rounded to 1/32; the prior networks run inside that path too,
so the offsets and scale indexes are the same on both sides; the decoded-symbol CRC
catches any difference.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.layers import conv3x3

from ulbcodec.entropy.checkerboard import checkerboard_mask, keep_part
from ulbcodec.entropy.coding import SCALE_BOUND, deterministic_entropy_path, symbol_likelihood
from ulbcodec.entropy.latent_codec import record_part
from ulbcodec.models.anchor_codec import AnchorCodec, _ste_round

__all__ = ["TemporalLatentPrior", "LatentConditionalCodec", "rdo_symbol_chooser"]

PRIOR_STEP = 1.0 / 32  # grid of the reference's latent as it enters the prior


def on_prior_grid(latent: Tensor) -> Tensor:
    """``latent`` rounded to the grid of :data:`PRIOR_STEP`, as the prior sees it."""
    return torch.round(latent / PRIOR_STEP) * PRIOR_STEP


def rdo_symbol_chooser(rdo_lambda: float):
    """Rate-distortion optimised quantisation towards the prior's prediction (an
    encoder-only choice, :data:`~ulbcodec.entropy.latent_codec.SymbolChooser`): each
    symbol k moves one step towards its offset o where the bits saved under the coding
    scale exceed ``rdo_lambda`` × the squared error added to ŷ (in the gained domain,
    where every channel's quantisation step is 1). Where the reference is a good
    prediction, the ±1 symbols that rounding leaves around it become free zeros."""
    def choose(residuals: Tensor, symbols: Tensor, offsets: Tensor, scales: Tensor) -> Tensor:
        symbols, offsets = symbols.float(), offsets.float()
        moved = symbols + torch.sign(offsets - symbols)
        saved = torch.log2(symbol_likelihood(moved - offsets, scales) / symbol_likelihood(symbols - offsets, scales))
        added = (residuals - moved) ** 2 - (residuals - symbols) ** 2
        return torch.where((moved != symbols) & (saved > rdo_lambda * added), moved, symbols)
    return choose


class TemporalLatentPrior(nn.Module):
    """(offset m, scale σ') of every symbol of the keyframe codec given the reference.

    Per slice and checkerboard part, a small network sees ``r = p − μ`` (where the
    reference's latent lies relative to this frame's means) and ``log σ`` (the context
    model's own uncertainty), over a 3x3 neighbourhood of latent positions (±16 px of
    motion left after the warp), and gives a gate g, a mean shift Δm and a log-scale
    shift Δs per channel: ``m = g·r + Δm``, ``σ' = σ·exp(Δs)`` (g = 1: the reference's
    symbol is the prediction).

    With ``decoded_context`` it also sees how well the reference predicted what is
    already decoded: ``ŷ − p`` of the earlier parts (zeros elsewhere) and its mean
    absolute value over the frame, both on the grid of :data:`PRIOR_STEP` — so that it
    trusts a good reference more and stops trusting a poor one.

    Args:
        M: channels of the keyframe codec's y.
        num_slices: its channel slices (M must divide evenly).
        width: hidden channels of each network.
        decoded_context: condition on the parts decoded before (M + 1 more input channels).
    """

    def __init__(self, M: int = 96, num_slices: int = 4, width: int = 64, decoded_context: bool = False):
        super().__init__()
        for name, value in (("M", M), ("num_slices", num_slices), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"TemporalLatentPrior: {name} must be an int in 1..4096, got {value!r}")
        if M % num_slices:
            raise ValueError(f"TemporalLatentPrior: M={M} is not a multiple of num_slices={num_slices}")
        if not isinstance(decoded_context, bool):
            raise ValueError(f"TemporalLatentPrior: decoded_context must be a bool, got {decoded_context!r}")
        self.config: Dict[str, Any] = {"M": M, "num_slices": num_slices, "width": width}
        if decoded_context:  # older configs have no key: their files decode as before
            self.config["decoded_context"] = True
        self.M, self.num_slices, self.decoded_context = M, num_slices, decoded_context
        C = M // num_slices
        inputs = 2 * C + (M + 1 if decoded_context else 0)
        self.nets = nn.ModuleList(self._net(inputs, C, width) for _ in range(2 * num_slices))  # [slice, anchor first]
        for net in self.nets:  # zero output: m = 0, σ' = σ, a keyframe's coding
            with torch.no_grad():
                net[-1].weight.zero_()
                net[-1].bias.zero_()

    @staticmethod
    def _net(inputs: int, C: int, width: int) -> nn.Module:
        return nn.Sequential(conv3x3(inputs, width), nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(width, width, 1),
                             nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(width, 3 * C, 1))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TemporalLatentPrior":
        return cls(**dict(config))

    @classmethod
    def with_decoded_context(cls, prior: "TemporalLatentPrior") -> "TemporalLatentPrior":
        """``prior`` extended to see the decoded parts, its outputs unchanged: the new
        inputs' weights start at zero (how a trained prior learns to use them)."""
        out = cls(prior.M, prior.num_slices, prior.config["width"], decoded_context=True)
        state = prior.state_dict()
        with torch.no_grad():
            for name, value in out.state_dict().items():
                old = state[name]
                value.zero_()
                value[tuple(slice(0, n) for n in old.shape)] = old
        return out

    def _decoded_context(self, slice_index: int, anchor: bool, prior: Tensor, decoded: Tensor) -> Tensor:
        """[ŷ − p on the grid where decoded, zeros elsewhere; its mean |·| over those
        positions, broadcast] for the part (slice_index, anchor). The mean is an exact sum
        of grid multiples (float64), the same on every CPU."""
        C = self.M // self.num_slices
        done = torch.zeros(1, self.M, *decoded.shape[-2:], dtype=torch.bool, device=decoded.device)
        done[:, :slice_index * C] = True
        if not anchor:
            done[0, slice_index * C:(slice_index + 1) * C] = checkerboard_mask(*decoded.shape[-2:], True, decoded.device)
        error = torch.where(done, on_prior_grid(decoded - prior), torch.zeros((), device=decoded.device))
        steps = (error.abs() / PRIOR_STEP).round().double().flatten(1).sum(1)
        mean = on_prior_grid((steps * PRIOR_STEP / max(int(done.sum()), 1)).float())
        return torch.cat([error, mean[:, None, None, None].expand(-1, 1, *decoded.shape[-2:])], 1)

    def forward(self, slice_index: int, anchor: bool, prior: Tensor, scales: Tensor, means: Tensor,
                decoded: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """(m, σ') on the full grid for one slice part; ``prior`` is the whole p [B, M, h, w],
        ``decoded`` the parts before this one (:data:`~ulbcodec.entropy.latent_codec.SymbolModel`;
        needed with ``decoded_context``)."""
        C = self.M // self.num_slices
        r = prior[:, slice_index * C:(slice_index + 1) * C] - means
        net = self.nets[2 * slice_index + (0 if anchor else 1)]
        inputs = [r, scales.clamp_min(SCALE_BOUND).log()]
        if self.decoded_context:
            if decoded is None:
                raise ValueError("a prior with decoded_context needs the decoded parts")
            inputs.append(self._decoded_context(slice_index, anchor, prior, decoded))
        gate, shift, log_scale = net(torch.cat(inputs, 1)).chunk(3, 1)
        return gate * r + shift, scales.clamp_min(SCALE_BOUND) * log_scale.exp()


class _Recent:
    """The results of the last ``size`` calls of a deterministic computation, by (input
    tensor, key): the same input (compared exactly) and key give the stored result."""

    def __init__(self, size: int):
        self.size, self.entries = size, []

    def get(self, x: Tensor, key: Any, compute: Callable[[], Any]) -> Any:
        value = self.find(x, key)
        if value is None:
            value = compute()
            self.put(x, key, value)
        return value

    def find(self, x: Tensor, key: Any) -> Any:
        """The stored result for (``x``, ``key``), or None."""
        for known, known_key, value in self.entries:
            if known_key == key and known.shape == x.shape and (known is x or torch.equal(known, x)):
                return value
        return None

    def put(self, x: Tensor, key: Any, value: Any) -> None:
        self.entries = [(x, key, value)] + self.entries[:self.size - 1]


class LatentConditionalCodec:
    """A P-frame codec made of the keyframe codec and a :class:`TemporalLatentPrior` (see
    the module docstring). The same interface as
    :class:`~ulbcodec.models.pframe_codec.PFrameCodec`: ``compress(x, ref, level)`` and
    ``decompress(strings, shape, ref, level)`` on [1, 3, H, W] frames in [0, 1] with H, W
    multiples of :attr:`required_multiple`, the reference on uint8 levels."""

    required_multiple = 64
    #: x̂ is what the keyframe codec decodes from ŷ; the reference steers only the rate
    reconstruction_ignores_reference = True
    #: latent positions can be left out of the stream (``skip``), each 16x16 pixels
    skip_block = 16

    def __init__(self, keyframe_codec: AnchorCodec, prior: TemporalLatentPrior):
        if keyframe_codec.num_rate_levels < 1 or keyframe_codec.vae_channels:
            raise ValueError("a latent-conditional codec needs a keyframe codec with rate levels and no VAE latent")
        if (prior.M, prior.num_slices) != (keyframe_codec.M, keyframe_codec.num_slices):
            raise ValueError(f"the temporal prior is for M={prior.M} in {prior.num_slices} slices, the keyframe "
                             f"codec has M={keyframe_codec.M} in {keyframe_codec.num_slices}")
        self.keyframe_codec, self.prior = keyframe_codec, prior
        self.num_rate_levels = keyframe_codec.num_rate_levels
        # an encoder tries one target against several references (its y, and so its ŷ, x̂
        # and everything the keyframe codec's context models compute, are the same each
        # time), and the long-term reference recurs frame after frame
        self._targets, self._references, self._syntheses = _Recent(1), _Recent(3), _Recent(1)
        self._contexts = _Recent(1)

    def _check(self, *frames: Tensor) -> None:
        for x in frames:
            if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[:2] != (1, 3):
                raise ValueError(f"frames must be [1, 3, H, W] tensors, got {getattr(x, 'shape', type(x))}")
            if x.shape[-2] % self.required_multiple or x.shape[-1] % self.required_multiple:
                raise ValueError(f"frame sides must be multiples of {self.required_multiple}, got {tuple(x.shape)}")
        if len({tuple(x.shape) for x in frames}) > 1:
            raise ValueError(f"frame and reference differ in shape: {[tuple(x.shape) for x in frames]}")

    def reference_latent(self, ref: Tensor, rate_level) -> Tensor:
        """p: the reference's gained latent on a grid of 1/32, computed identically on both sides."""
        def compute() -> Tensor:
            with deterministic_entropy_path(ref.device):
                return on_prior_grid(self.keyframe_codec.analyze(ref, rate_level=rate_level))
        return self._references.get(ref, rate_level, compute)

    def _symbol_model(self, prior: Tensor):
        return lambda i, anchor, scales, means, decoded: self.prior(i, anchor, prior, scales, means, decoded)

    @torch.no_grad()
    def compress(self, x: Tensor, ref: Tensor, rate_level=0, rdo_lambda: float = 0.0, skip: Optional[Tensor] = None,
                 position_bits: bool = False) -> Dict[str, Any]:
        """``{"strings": [y, z], "shape": z's (h, w), "symbols_crc32", "x_hat"}``; ``x_hat``
        (unclamped) is exactly what :meth:`decompress` returns on the same thread count.
        ``skip`` [H/16, W/16] (bool) leaves those latent positions out of the stream, their
        symbols set to the prior's prediction; ``position_bits`` adds ``"position_bits"``,
        the estimated bits of each latent position
        (:meth:`~ulbcodec.entropy.latent_codec.CheckerboardSliceLatentCodec.encode_latent`).

        ``rdo_lambda > 0`` moves symbols one step towards the prior's prediction wherever
        that saves more bits than ``rdo_lambda`` times the squared error it adds to ŷ
        (:func:`rdo_symbol_chooser`); 0 codes the keyframe's symbols."""
        self._check(x, ref)
        if not rdo_lambda >= 0:
            raise ValueError(f"rdo_lambda must be non-negative, got {rdo_lambda!r}")
        codec = self.keyframe_codec
        threads = (rate_level, torch.get_num_threads())  # g_a's and g_s's last bits follow the thread count
        y = self._targets.get(x, threads, lambda: codec.analyze(x, rate_level=rate_level))
        prior = self.reference_latent(ref, rate_level)
        chooser = rdo_symbol_chooser(rdo_lambda) if rdo_lambda > 0 else None
        plain = chooser is None and skip is None  # ŷ is the keyframe codec's: its context pass can be reused
        context = self._contexts.find(y, threads) if plain else None
        out = codec.encode_latent(y, symbol_model=self._symbol_model(prior), choose_symbols=chooser, skip=skip,
                                  position_bits=position_bits, context=context, keep_context=plain and context is None)
        if out.get("context") is not None:
            self._contexts.put(y, threads, out["context"])
        x_hat = self._syntheses.get(out["y_hat"], threads,
                                    lambda: codec.synthesize(out["y_hat"], rate_level, with_bypass=False)[0])
        coded = {"strings": [out["strings"][0][0], out["strings"][1][0]], "shape": out["shape"],
                 "symbols_crc32": out["symbols_crc32"], "x_hat": x_hat}
        if position_bits:
            coded["position_bits"] = out["position_bits"]
        return coded

    @torch.no_grad()
    def decompress(self, strings: Sequence[bytes], shape: Sequence[int], ref: Tensor, rate_level=0,
                   skip: Optional[Tensor] = None) -> Dict[str, Any]:
        """Decode :meth:`compress` output given the same ``ref`` (and ``skip`` map):
        ``{"x_hat", "symbols_crc32"}``."""
        self._check(ref)
        if len(strings) != 2 or not all(isinstance(s, (bytes, bytearray)) for s in strings):
            raise ValueError("strings must be [y_string, z_string]")
        h, w = (int(s) for s in shape)
        if (h * self.required_multiple, w * self.required_multiple) != tuple(ref.shape[-2:]):
            raise ValueError(f"z shape {h}x{w} does not match a {tuple(ref.shape[-2:])} reference")
        codec = self.keyframe_codec
        codec._gains(rate_level)  # a bad level is refused before any work
        prior = self.reference_latent(ref, rate_level)
        out = codec.decode_latent([[bytes(strings[0])], [bytes(strings[1])]], (h, w),
                                  symbol_model=self._symbol_model(prior), skip=skip)
        x_hat, _ = codec.synthesize(out["y_hat"], rate_level, with_bypass=False)
        return {"x_hat": x_hat, "symbols_crc32": out["symbols_crc32"]}

    def rates(self, x: Tensor, ref: Tensor, rate_level) -> Tuple[Tensor, Tensor]:
        """Training: (bits with the temporal prior, bits of the keyframe coding) of the y
        symbols of a batch [B, 3, H, W], summed. The keyframe codec runs without
        gradients, rounding as a file does; the bits are exact for the symbols a file
        would hold, differentiable in the prior's outputs (the offset rounds with a
        straight-through gradient)."""
        codec = self.keyframe_codec
        parts = []
        with torch.no_grad():
            y = codec.analyze(x, rate_level=rate_level)
            prior = on_prior_grid(codec.analyze(ref, rate_level=rate_level))
            z = codec.h_a(y)
            medians = codec.entropy_bottleneck._get_medians()
            hyper = codec.h_s(torch.round(z - medians) + medians)
            y_slices = y.chunk(codec.num_slices, dim=1)

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                symbols = torch.round(y_slices[i] - means)
                parts.append((i, anchor, scales, means, symbols))
                return keep_part(symbols + means, anchor)

            codec._run_slices(hyper, quantize)
        conditional = keyframe = x.new_zeros(())
        decoded = torch.zeros_like(y)
        for i, anchor, scales, means, symbols in parts:
            m, coding_scales = self.prior(i, anchor, prior, scales, means, decoded)
            decoded = decoded.clone()
            record_part(decoded, i, keep_part(symbols + means, anchor))
            bits = -torch.log2(symbol_likelihood(symbols - _ste_round(m), coding_scales))
            conditional = conditional + keep_part(bits, anchor).sum()
            keyframe = keyframe + keep_part(-torch.log2(symbol_likelihood(symbols, scales)), anchor).sum()
        return conditional, keyframe
