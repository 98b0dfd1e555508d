"""The latent codec of the anchor codec: the checkerboard x channel-slice autoregression
and its entropy loop (one buffered rANS stream for y, CompressAI's EntropyBottleneck for z).

::

    y ─► h_a ─► z ─► EB (z string) ─► h_s ─► hyper
    for s in slices, for part in (anchor, non-anchor):
        μ, σ = context models (ulbcodec.entropy.context)
        symbols = round(y − μ) ─► rANS (σ index)      (decode: rANS ─► symbols + μ)
    ─► ŷ, symbol CRC

A conditional coding (a :data:`SymbolModel`) may shift each symbol by an offset and
change its scale; a skip map leaves whole latent positions out of the stream, their
symbols set to the offsets on both sides.

:class:`CheckerboardSliceLatentCodec` is a mixin of :class:`~ulbcodec.models.anchor_codec.AnchorCodec`
holding no parameters of its own, so the model's state_dict names stay those of the
released checkpoints. It uses the model's ``h_a``, ``h_s``, ``entropy_bottleneck``,
``gaussian_conditional`` and context module lists.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import BufferedRansEncoder, RansDecoder

from ulbcodec.entropy.checkerboard import checkerboard_mask, keep_part, squeeze_part, unsqueeze_part
from ulbcodec.entropy.coding import (Both, check_z_string, check_z_symbols, deterministic_entropy_path, rans_safe,
                                     scale_indexes, side_thread, symbol_likelihood, symbols_crc32)
from ulbcodec.entropy.context import local_attention_mask

# quantize(slice_index, anchor_part, scales, means) -> quantised part on the full grid
PartQuantizer = Callable[[int, bool, Tensor, Tensor], Tensor]
# symbol_model(slice_index, anchor_part, scales, means, decoded) -> (offsets, scales) on the
# full grid: each symbol k = round(y − μ) is coded as k − offset (offsets integer-valued)
# under a zero-mean Gaussian of the given scale, with the model's own CDF tables. A
# conditional probability model for the same ŷ (ulbcodec.models.latent_conditional_codec).
# ``decoded`` [B, M, h, w]: ŷ of the parts coded before this one (symbols + μ, before the
# latent residual prediction), zeros where nothing is decoded yet.
SymbolModel = Callable[[int, bool, Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]
# choose_symbols(residuals, symbols, offsets, coding_scales) -> symbols, all squeezed parts:
# the encoder's choice of each symbol given y − μ, its rounding, and the distribution it
# is coded with (rate-distortion optimised quantisation; the decoder needs none).
SymbolChooser = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class LatentContext(NamedTuple):
    """What the hyperprior and the context models compute for one y, whatever its symbols
    are coded with: a pass of :meth:`CheckerboardSliceLatentCodec.encode_latent` (without a
    symbol chooser or skip map, which would change ŷ) keeps it, and a coding of the same y
    under another :data:`SymbolModel` reuses it instead of running the networks again."""

    y: Tensor
    z_strings: List[bytes]
    shape: Tuple[int, int]
    parts: List[Tuple[int, bool, Tensor, Tensor]]  # (slice, anchor part, scales, means), coding order
    y_hat: Tensor


def _coding_distribution(symbol_model: Optional[SymbolModel], i: int, anchor: bool, scales: Tensor,
                         means: Tensor, decoded: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(offsets, scales) of one part's symbols, squeezed: zero offsets and the context
    model's scales, or what ``symbol_model`` gives."""
    if symbol_model is None:
        scales = squeeze_part(scales, anchor)
        return torch.zeros(scales.shape, dtype=torch.int32, device=scales.device), scales
    offsets, coding_scales = symbol_model(i, anchor, scales, means, decoded)
    return squeeze_part(offsets, anchor).round().int(), squeeze_part(coding_scales, anchor)


def skipped_part(skip: Optional[Tensor], anchor: bool, shape: torch.Size) -> Optional[Tensor]:
    """The positions of one squeezed part (``shape`` [B, C, h, w/2]) that ``skip`` [h, w]
    (True: not coded) leaves out, every channel of a position alike; None without a map."""
    if skip is None:
        return None
    return squeeze_part(skip.to(torch.float32)[None, None], anchor).bool().expand(shape)


def record_part(decoded: Optional[Tensor], slice_index: int, part: Tensor) -> None:
    """Add one decoded part (full grid, zeros at the other part) to ``decoded``, in place:
    what a :data:`SymbolModel` sees of the parts before the next one (None: nobody looks)."""
    if decoded is not None:
        C = part.shape[1]
        decoded[:, slice_index * C:(slice_index + 1) * C] += part


class CheckerboardSliceLatentCodec:
    """Entropy coding of y [1, M, h, w] with the model's hyperprior and context models
    (mixin: see the module docstring)."""


    def _attention_mask(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            mask = local_attention_mask(h, w, self.context_window, device)
            self._mask_cache[key] = mask
        return mask

    def _run_slices(self, hyper: Tensor, quantize: PartQuantizer, workers: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
        """The checkerboard × channel-slice autoregression shared by forward/compress/decompress.

        ``quantize(slice_index, anchor, scales, means)`` receives full-grid scale/mean maps
        of one slice and must return the quantised values ŷ = round(y−μ)+μ of that part on
        the full grid, zeros at the other part's positions (from y, with STE, or from the
        bitstream). Returns (ŷ, scales, means), each [B, M, h, w].
        """
        with side_thread(workers > 1 and hyper.device.type == "cpu" and not torch.is_grad_enabled()) as both:
            return self._slices(hyper, quantize, workers, both)

    def _slices(self, hyper: Tensor, quantize: PartQuantizer, workers: int,
                both: Both) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`_run_slices` with ``both`` running pairs of independent context networks."""
        hyper_means = hyper.chunk(2, dim=1)[1]
        mask = self._attention_mask(hyper.shape[-2], hyper.shape[-1], hyper.device)
        is_anchor = checkerboard_mask(hyper.shape[-2], hyper.shape[-1], True, hyper.device)
        decoded: List[Tensor] = []
        scales_all: List[Tensor] = []
        means_all: List[Tensor] = []
        for i in range(self.num_slices):
            if i == 0:
                anchor_ctx = hyper
            else:
                previous = torch.cat(decoded, dim=1)
                inter_ctx, channel_ctx = both(lambda: self.global_inter_context[i](previous),
                                              lambda: self.channel_context[i](previous))
                anchor_ctx = torch.cat([inter_ctx, channel_ctx, hyper], dim=1)
            scales_a, means_a = self.entropy_parameters_anchor[i](anchor_ctx).chunk(2, dim=1)
            anchors = quantize(i, True, scales_a, means_a)
            correction = self.lrp_anchor[i](torch.cat([hyper_means, *decoded, anchors], dim=1))
            anchors = anchors + keep_part(correction, anchor=True)

            if i == 0:
                local_ctx = self.local_context[i](anchors, mask, workers=workers)
                nonanchor_ctx = torch.cat([local_ctx, hyper], dim=1)
            else:
                local_ctx, intra_ctx = both(lambda: self.local_context[i](anchors, mask, workers=workers),
                                            lambda: self.global_intra_context[i](decoded[-1], anchors))
                nonanchor_ctx = torch.cat([local_ctx, intra_ctx, inter_ctx, channel_ctx, hyper], dim=1)
            scales_n, means_n = self.entropy_parameters_nonanchor[i](nonanchor_ctx).chunk(2, dim=1)
            y_hat_slice = anchors + quantize(i, False, scales_n, means_n)
            correction = self.lrp_nonanchor[i](torch.cat([hyper_means, *decoded, y_hat_slice], dim=1))
            y_hat_slice = y_hat_slice + keep_part(correction, anchor=False)

            decoded.append(y_hat_slice)
            scales_all.append(torch.where(is_anchor, scales_a, scales_n))
            means_all.append(torch.where(is_anchor, means_a, means_n))
        return torch.cat(decoded, dim=1), torch.cat(scales_all, dim=1), torch.cat(means_all, dim=1)

    def _cdf_tables(self) -> Tuple[List[List[int]], List[int], List[int]]:
        gc = self.gaussian_conditional
        if gc.quantized_cdf.numel() == 0:
            raise RuntimeError("AnchorCodec: CDF tables are empty; load weights that include them or call update()")
        return (
            gc.quantized_cdf.tolist(),
            gc.cdf_length.reshape(-1).int().tolist(),
            gc.offset.reshape(-1).int().tolist(),
        )

    # ---------------------------------------------------------------- entropy coding

    @torch.no_grad()
    def encode_latent(self, y: Tensor, return_symbols: bool = False,
                      symbol_model: Optional[SymbolModel] = None,
                      choose_symbols: Optional[SymbolChooser] = None, skip: Optional[Tensor] = None,
                      position_bits: bool = False, context: Optional[LatentContext] = None,
                      keep_context: bool = False) -> Dict[str, Any]:
        """Entropy-code y [1, M, h, w] (h, w multiples of 4; already gained).

        Returns ``{"strings": [[y_string], [z_string]], "shape": (h/4, w/4),
        "symbols_crc32": int, "y_hat": Tensor}``; ``y_hat`` is exactly what
        :meth:`decode_latent` will reconstruct. With ``return_symbols`` the int32 arrays
        ``"y_symbols"`` and ``"y_indexes"`` given to the rANS coder (coding order) are
        added, for diagnostics and conformance tests. ``symbol_model`` replaces the
        distribution each part's symbols are coded with (not ŷ, which stays
        ``round(y − μ) + μ``): :data:`SymbolModel`. ``choose_symbols`` replaces the
        rounding (ŷ becomes the chosen symbols + μ, still exactly what the decoder
        rebuilds): :data:`SymbolChooser`. ``skip`` [h, w] (bool) leaves the latent positions
        where it is True out of the stream: their symbols are the coding distribution's
        offsets (the symbol model's prediction; 0 without one), which the decoder, given
        the same map, sets alike. ``position_bits`` adds ``"position_bits"`` [h, w]: the
        estimated bits each position's coded symbols cost (all channels), from the coding
        distributions. ``keep_context`` adds ``"context"``, the :class:`LatentContext` of
        this y (None where a chooser or skip map changed ŷ); ``context`` reuses one kept
        for the same y (no chooser or skip map then): the same strings as a whole pass.
        """
        self._check_y(y)
        self._check_skip(skip, y.shape[-2:])
        if context is not None:
            if choose_symbols is not None or skip is not None:
                raise ValueError("a kept context codes its own ŷ: no symbol chooser or skip map with it")
            if context.y is not y and not torch.equal(context.y, y):
                raise ValueError("a kept context belongs to another y")
        if y.shape[0] != 1:
            raise ValueError(f"entropy coding handles one image at a time (B=1), got B={y.shape[0]}")
        self._check_entropy_dtype()
        symbols: List[int] = []
        indexes: List[int] = []
        gc = self.gaussian_conditional
        with deterministic_entropy_path(y.device) as threads:
            original, y = y, y.float()
            if context is None:
                z = self.h_a(y)
                check_z_symbols(self.entropy_bottleneck, z)
                z_strings = self.entropy_bottleneck.compress(z)
                shape = tuple(int(s) for s in z.shape[-2:])
                hyper = self.h_s(self.entropy_bottleneck.decompress(z_strings, shape))
            else:
                z_strings, shape = context.z_strings, context.shape
            y_parts = y.chunk(self.num_slices, dim=1)

            decoded = torch.zeros_like(y) if symbol_model is not None else None
            bits = y.new_zeros(y.shape[-2:]) if position_bits else None

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                values, means_sq = squeeze_part(y_parts[i], anchor), squeeze_part(means, anchor)
                part_symbols = gc.quantize(values, "symbols", means_sq)
                offsets, coding_scales = _coding_distribution(symbol_model, i, anchor, scales, means, decoded)
                if choose_symbols is not None:
                    part_symbols = choose_symbols(values - means_sq, part_symbols, offsets, coding_scales).int()
                part_indexes = scale_indexes(gc, coding_scales)
                skipped = skipped_part(skip, anchor, part_symbols.shape)
                if skipped is None:
                    coded, coded_indexes = part_symbols - offsets, part_indexes
                else:
                    part_symbols = torch.where(skipped, offsets, part_symbols)
                    coded, coded_indexes = (part_symbols - offsets)[~skipped], part_indexes[~skipped]
                symbols.extend(coded.reshape(-1).tolist())
                indexes.extend(coded_indexes.reshape(-1).tolist())
                if bits is not None:
                    part_bits = -torch.log2(symbol_likelihood((part_symbols - offsets).float(), coding_scales))
                    if skipped is not None:
                        part_bits = part_bits.masked_fill(skipped, 0.0)
                    bits.add_(unsqueeze_part(part_bits.sum(dim=1, keepdim=True), anchor)[0, 0])
                part = unsqueeze_part(part_symbols + means_sq, anchor)
                record_part(decoded, i, part)
                return part

            kept: Optional[List[Tuple[int, bool, Tensor, Tensor]]] = None
            if context is not None:
                for part in context.parts:
                    quantize(*part)
                y_hat = context.y_hat
            else:
                kept = [] if keep_context and choose_symbols is None and skip is None else None

                def quantize_and_keep(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                    if kept is not None:
                        kept.append((i, anchor, scales, means))
                    return quantize(i, anchor, scales, means)

                y_hat, _, _ = self._run_slices(hyper, quantize_and_keep, workers=threads)
            cdf, cdf_lengths, offsets = self._cdf_tables()
            y_string = b""  # every position skipped: CompressAI's encoder crashes flushing nothing
            if symbols:
                encoder = BufferedRansEncoder()
                encoder.encode_with_indexes(symbols, indexes, cdf, cdf_lengths, offsets)
                y_string = encoder.flush()
        out = {
            "strings": [[y_string], z_strings],
            "shape": shape,
            "symbols_crc32": symbols_crc32(symbols),
            "y_hat": y_hat,
        }
        if keep_context:
            out["context"] = context or (LatentContext(original, z_strings, shape, kept, y_hat)
                                         if kept is not None else None)
        if bits is not None:
            out["position_bits"] = bits
        if return_symbols:
            out["y_symbols"] = np.asarray(symbols, dtype=np.int32)
            out["y_indexes"] = np.asarray(indexes, dtype=np.int32)
        return out

    @torch.no_grad()
    def decode_latent(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int],
                      symbol_model: Optional[SymbolModel] = None, skip: Optional[Tensor] = None) -> Dict[str, Any]:
        """Entropy-decode ``strings = [[y_string], [z_string]]`` with z of spatial ``shape``
        (and the encoder's ``symbol_model`` and ``skip`` map).

        Returns ``{"y_hat": [1, M, 4·shape], "symbols_crc32": int}`` (ŷ in the gained
        domain: the rate level is not needed here, only by :meth:`synthesize`). Compare
        the CRC with the encoder's to detect a desynchronised or corrupted stream.
        """
        y_string, z_string = self._check_strings(strings)
        if len(shape) != 2 or any(isinstance(s, bool) or int(s) != s or int(s) <= 0 for s in shape):
            raise ValueError(f"shape must be the positive (height, width) of z, got {shape!r}")
        shape = (int(shape[0]), int(shape[1]))
        self._check_skip(skip, (4 * shape[0], 4 * shape[1]))
        positions = shape[0] * shape[1]
        padded_z = rans_safe(z_string, self.entropy_bottleneck.channels * positions)
        self._check_entropy_dtype()
        device = self.h_s.increase[0].weight.device
        gc = self.gaussian_conditional
        symbols: List[int] = []
        with deterministic_entropy_path(device) as threads:
            z_hat = self.entropy_bottleneck.decompress([padded_z], shape)
            check_z_string(self.entropy_bottleneck, z_hat, z_string)
            y_string = rans_safe(y_string, self.M * 16 * positions)
            hyper = self.h_s(z_hat)
            cdf, cdf_lengths, offsets = self._cdf_tables()
            decoder = RansDecoder()
            decoder.set_stream(y_string)

            decoded = hyper.new_zeros(hyper.shape[0], self.M, *hyper.shape[-2:]) if symbol_model is not None else None

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                symbol_offsets, coding_scales = _coding_distribution(symbol_model, i, anchor, scales, means, decoded)
                part_indexes = scale_indexes(gc, coding_scales)
                skipped = skipped_part(skip, anchor, part_indexes.shape)
                coded_indexes = part_indexes if skipped is None else part_indexes[~skipped]
                coded = decoder.decode_stream(coded_indexes.reshape(-1).tolist(), cdf, cdf_lengths, offsets)
                symbols.extend(coded)
                coded = torch.tensor(coded, dtype=torch.float32, device=scales.device)
                means_sq = squeeze_part(means, anchor)
                if skipped is None:
                    values = coded.reshape(means_sq.shape)
                else:
                    values = means_sq.new_zeros(means_sq.shape).masked_scatter(~skipped, coded)
                values = values + symbol_offsets
                part = unsqueeze_part(values + means_sq, anchor)
                record_part(decoded, i, part)
                return part

            y_hat, _, _ = self._run_slices(hyper, quantize, workers=threads)
        return {"y_hat": y_hat, "symbols_crc32": symbols_crc32(symbols)}

    @staticmethod
    def _check_skip(skip: Optional[Tensor], shape: Sequence[int]) -> None:
        if skip is not None and (not isinstance(skip, Tensor) or skip.dtype != torch.bool
                                 or tuple(skip.shape) != tuple(shape)):
            raise ValueError(f"skip must be a bool map of the latent's {tuple(shape)} positions, got "
                             f"{getattr(skip, 'dtype', type(skip))} {tuple(getattr(skip, 'shape', ()))}")

    @staticmethod
    def _check_strings(strings: Sequence[Sequence[bytes]]) -> Tuple[bytes, bytes]:
        ok = (
            isinstance(strings, (list, tuple))
            and len(strings) == 2
            and all(isinstance(s, (list, tuple)) and len(s) == 1 for s in strings)
            and all(isinstance(s[0], (bytes, bytearray)) for s in strings)
        )
        if not ok:
            raise ValueError("strings must be [[y_string], [z_string]] (bytes, one image)")
        return bytes(strings[0][0]), bytes(strings[1][0])
