"""Anchor codec of NeFIC: a checkerboard / channel-slice learned image codec.

Implements the *anchor codec* of "Next-Frame Decoding for Ultra-Low-Bitrate Image
Compression" (NeFIC, Chen et al., 2026): a learned image codec whose decoder outputs a
compact reconstruction (the *anchor frame*) plus a *bypass latent* that initialises a
one-step video-diffusion decoder. This is a clean-room re-implementation written from the
published description and layer maths (repository ``UnoC-727/NeFIC``); the parameter names
match the released ``anchor_codec.bin`` state_dict exactly (misspellings such as
``information_transformer_layes`` and ``fushion`` included) so that the official weights
load with ``strict=True`` and produce bit-identical bitstreams.

Data flow (B=1 for entropy coding; H, W multiples of 64)::

              vae_latent [16, H/8]  (encoder side only, optional)
                    │
            ┌───────┴───┐  y ×gain[l]  ┌───┐  z  ┌───┐ z_hat  ┌───┐  hyper [2M, H/16]
     x ──►──┤    g_a    ├──────┬───►───┤h_a├──►──┤ Q ├──····─►┤h_s├─────┐
            └───────────┘      │       └───┘     └───┘   EB   └───┘     │
                               │                                        ▼
                               │   ┌────────────────────────────────────┴─────┐
                               └─►─┤ for each slice s = 0..S-1 and each       │
                                   │ checkerboard part (anchor, non-anchor):  │
                                   │   μ, σ = params(inter/channel/local/     │
                                   │                 intra context, hyper)    │
                                   │   ŷ = round(y−μ)+μ  ···rANS(σ index)···  │
                                   │   ŷ += 0.5·tanh(LRP(hyper μ, ŷ<s, ŷs))   │
                                   └────────────────────┬─────────────────────┘
                                                        │ y_hat ×inverse_gain[l]
                                          ┌───────────┐ │
            anchor_frame [3, H, W] ◄──────┤    g_s    ├─┘
                                          └─────┬─────┘
                                  mid [N, H/8]  │  (after the first upsampling stage)
                                          ┌─────┴─────┐
            bypass_latent [1,16,H/8] ◄────┤ token MLP ├
                                          └───────────┘

``····`` marks what travels in the bitstream: one z string (EntropyBottleneck, quantised
around its medians) and ONE y string (a single buffered rANS stream: slice 0 anchor,
slice 0 non-anchor, slice 1 anchor, ...; each part as the squeezed ``[C, H, W/2]`` grid
in raster order, even rows taking odd columns, odd rows taking even columns).

Extensions over the published model (all off in the released configuration, where the
state_dict is identical to the official one):

* ``vae_channels=0``: the encoder takes no VAE latent (the token-MLP fusion in ``g_a``
  then sees only the image features). With ``vae_channels>0`` the latent is required by
  :meth:`AnchorCodec.forward`, :meth:`AnchorCodec.compress` and :meth:`AnchorCodec.analyze`.
* ``num_rate_levels=L>0``: asymmetric gain vectors (Cui et al., "Asymmetric Gained Deep
  Image Compression With Continuous Rate Adaptation", CVPR 2021) ``gain[L, M]`` and
  ``inverse_gain[L, M]``: ``y ← y·|gain[l]|`` right after ``g_a``, ``ŷ ← ŷ·|inverse_gain[l]|``
  right before ``g_s``; the hyperprior and the entropy model work in the gained domain, so
  entropy decoding does not need ``l``. A higher level index means a larger gain, i.e.
  finer effective quantisation and MORE bytes (the initial gains are 2^-1 … 2^+1).
  Fractional levels interpolate neighbouring gains geometrically (in the log domain).

Determinism: everything between ``y`` and the bitstream (hyper transforms, context models,
mean/scale prediction, rANS) runs in float32 with autocast disabled and with
``torch.set_num_threads(1)`` temporarily in force, so encoder and decoder produce the same
means/scales whatever thread count either side uses (the local context's attention runs
in bands of rows, each computed whole by one thread, which may share them out: the values
are the same for any band size or thread count; context networks that do not depend on
each other run side by side, each on one thread). ``g_a``/``g_s`` run unrestricted and
may be tiled by the caller (see :meth:`AnchorCodec.analyze` / :meth:`AnchorCodec.synthesize`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel

from ulbcodec.threads import torch_threads

__all__ = [
    "AnchorCodec",
    "pad_to_multiple",
    "crop_to_size",
    "RELEASED_CONFIG",
]

RateLevel = Union[int, float]
# quantize(slice_index, anchor_part, scales, means) -> quantised part on the full grid
PartQuantizer = Callable[[int, bool, Tensor, Tensor], Tensor]
# both(f, g) -> (f(), g()) for two networks that do not depend on each other (_side_thread)
Both = Callable[[Callable[[], Tensor], Callable[[], Tensor]], Tuple[Tensor, Tensor]]

#: Configuration of the released NeFIC checkpoints (``checkpoints/nefic_lambda*/anchor_codec.bin``).
RELEASED_CONFIG: Dict[str, int] = {
    "N": 192,
    "M": 320,
    "num_slices": 10,
    "context_window": 5,
    "vae_channels": 16,
    "bypass_channels": 16,
    "num_rate_levels": 0,
    "token_channels": 320,
    "num_token_blocks": 3,
}

# Fixed widths of the published sub-networks (independent of N and M there too).
_PARAM_NET_WIDTHS = (320, 256, 128)  # entropy-parameter 1x1 convs
_CHANNEL_CTX_WIDTHS = (192, 128)  # channel-context 3x3 convs
_LOCAL_HEADS = 2  # heads of the windowed local context
_INTRA_HEADS = 2  # heads of the linear intra-slice context
# The local context attends in bands of about this many latent pixels. Its attention maps
# (w⁴·heads values a pixel) of a whole 12 MP latent take ~240 MB a pass; a band's stay in
# cache, which makes it 3x faster. Each pixel's arithmetic is the same in any band, so
# the band size does not touch the bitstream (tests/test_anchor_codec.py checks it).
BAND_PIXELS = 1024

# CDF buffers whose shapes are data dependent (set by update() or by a loaded file).
_CDF_BUFFERS = {
    EntropyBottleneck: ("_quantized_cdf", "_offset", "_cdf_length"),
    GaussianConditional: ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"),
}


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def pad_to_multiple(x: Tensor, multiple: int = 64) -> Tuple[Tensor, Tuple[int, int]]:
    """Zero-pad ``x`` [B, C, H, W] at the bottom/right so H and W are multiples of ``multiple``.

    Returns the padded tensor and the original ``(H, W)`` (for :func:`crop_to_size`). This is
    the padding the published codec uses (constant zeros, bottom/right only).
    """
    if x.ndim != 4:
        raise ValueError(f"pad_to_multiple expects [B, C, H, W], got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    pad_h = (-h) % multiple
    pad_w = (-w) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="constant", value=0.0)
    return x, (h, w)


def crop_to_size(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Undo :func:`pad_to_multiple`: keep the top-left ``size = (H, W)`` pixels."""
    return x[..., : size[0], : size[1]]


def _ste_round(x: Tensor) -> Tensor:
    """Rounding with a straight-through gradient.

    ``round(x) - x + x`` is exact in float (Sterbenz), so the forward value equals
    ``round(x)`` bit for bit; this is what makes ``forward()`` equal ``decompress()``.
    """
    return torch.round(x) - x.detach() + x


@contextlib.contextmanager
def _deterministic_entropy_path(device: torch.device, single_thread: bool = True) -> Iterator[int]:
    """Run the entropy-parameter path single-threaded, in fp32, without autocast.

    ``single_thread=False`` (training) keeps fp32 but leaves the thread count alone:
    training needs no bit-exactness and one thread would halve its speed.

    The rANS coder needs the encoder and the decoder to compute *identical* scales and
    means. Multi-threaded CPU kernels may split reductions differently for different
    thread counts, so we pin intra-op parallelism to one thread for the duration and
    restore the caller's setting afterwards. (Process-global: not safe to interleave with
    other Python threads that rely on the thread count at the same moment.) Yields the
    caller's thread count: work split into independent pieces, each computed whole by one
    thread (the local context's bands), may still use that many threads.
    """
    with torch_threads(1 if single_thread else None) as previous, \
            torch.autocast(device_type=device.type, enabled=False):
        yield previous


def _without_grad(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """``fn(*args)`` with gradients off: for pool threads, whose grad mode is their own."""
    with torch.no_grad():
        return fn(*args)


@contextlib.contextmanager
def _side_thread(enabled: bool) -> Iterator[Both]:
    """Yields ``both(f, g)`` → (f(), g()): with ``enabled``, g runs on a second thread
    meanwhile, without gradients (grad mode is per thread). Each network still runs whole
    on one thread, so its values are those of a serial run: the entropy path uses this
    for context networks that do not depend on each other."""
    if not enabled:
        yield lambda f, g: (f(), g())
        return

    with ThreadPoolExecutor(max_workers=1) as pool:
        def both(f: Callable[[], Tensor], g: Callable[[], Tensor]) -> Tuple[Tensor, Tensor]:
            side = pool.submit(_without_grad, g)
            return f(), side.result()

        yield both


# Checkerboard helpers. "Anchor" positions are those with (row + col) odd; they are coded
# first, the remaining ("non-anchor") positions second, with the anchors as context.


def _checkerboard_mask(h: int, w: int, anchor: bool, device: torch.device) -> Tensor:
    """Boolean [h, w] mask of anchor (row+col odd) or non-anchor (row+col even) positions."""
    rows = torch.arange(h, device=device)[:, None]
    cols = torch.arange(w, device=device)[None, :]
    odd = (rows + cols) % 2 == 1
    return odd if anchor else ~odd


def _keep(x: Tensor, anchor: bool) -> Tensor:
    """Zero every position of ``x`` [B, C, H, W] that is not of the requested kind."""
    mask = _checkerboard_mask(x.shape[-2], x.shape[-1], anchor, x.device)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _squeeze(x: Tensor, anchor: bool) -> Tensor:
    """Gather one checkerboard part of ``x`` [B, C, H, W] into a dense [B, C, H, W/2] grid.

    Row r keeps the columns of the requested parity: for anchors, even rows take odd
    columns and odd rows take even columns; non-anchors the other way round. This is also
    the order in which the part's symbols go into the bitstream.
    """
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, h, w // 2)
    even_col, odd_col = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2] = x[:, :, 0::2, even_col::2]
    out[:, :, 1::2] = x[:, :, 1::2, odd_col::2]
    return out


def _unsqueeze(x: Tensor, anchor: bool) -> Tensor:
    """Inverse of :func:`_squeeze`: scatter [B, C, H, W/2] back, zeros elsewhere."""
    b, c, h, half_w = x.shape
    out = x.new_zeros(b, c, h, half_w * 2)
    even_col, odd_col = (1, 0) if anchor else (0, 1)
    out[:, :, 0::2, even_col::2] = x[:, :, 0::2]
    out[:, :, 1::2, odd_col::2] = x[:, :, 1::2]
    return out


def _symbols_crc32(symbols: Sequence[int]) -> int:
    """CRC-32 of the coded y symbols as int32 little-endian, in coding order."""
    return zlib.crc32(np.asarray(symbols, dtype="<i4").tobytes()) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Building blocks of the analysis / synthesis transforms
# --------------------------------------------------------------------------------------


class StridedResidualBlock(nn.Module):
    """conv3x3(stride) → GELU → conv3x3 → GDN, plus a strided 1x1 shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.gdn = GDN(out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride) if needs_projection else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.gdn(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        return out + shortcut


class ResidualConvBlock(nn.Module):
    """conv3x3 → GELU → conv3x3 → GELU, plus an identity (or 1x1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.conv2(self.act(self.conv1(x))))
        shortcut = x if self.skip is None else self.skip(x)
        return out + shortcut


class UpsamplingResidualBlock(nn.Module):
    """Sub-pixel ×2 conv → GELU → conv3x3 → inverse GDN, plus a sub-pixel shortcut."""

    def __init__(self, in_ch: int, out_ch: int, factor: int = 2):
        super().__init__()
        self.subpel_conv = subpel_conv3x3(in_ch, out_ch, factor)
        self.act = nn.GELU()
        self.conv = conv3x3(out_ch, out_ch)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = subpel_conv3x3(in_ch, out_ch, factor)

    def forward(self, x: Tensor) -> Tensor:
        out = self.igdn(self.conv(self.act(self.subpel_conv(x))))
        return out + self.upsample(x)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU used by CLIP-style MLPs: x·σ(1.702x)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class TokenMLPBlock(nn.Module):
    """Per-pixel token block: ``x += out(value(ln1(x)))``; ``x += MLP(ln2(x))``.

    Attention-free (each token only mixes its own channels); width d → 2d → d MLP.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(dim, dim * 2)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(dim * 2, dim)),
                ]
            )
        )
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.output_proj(self.value_proj(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


def _token_stack(dim: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[TokenMLPBlock(dim) for _ in range(depth)])


def _apply_per_pixel(feat: Tensor, project_in: nn.Module, blocks: nn.Module, project_out: nn.Module) -> Tensor:
    """Run Linear → token blocks → Linear on every pixel of ``feat`` [B, C, H, W].

    Keeps the exact tensor layout of the published code (flatten, transpose without a
    copy) because the GEMM path, and hence the last bits, can depend on it.
    """
    b, c, h, w = feat.shape
    tokens = feat.reshape(b, c, h * w).transpose(1, 2)
    tokens = project_out(blocks(project_in(tokens)))
    return tokens.transpose(1, 2).reshape(b, -1, h, w)


class AnchorAnalysis(nn.Module):
    """g_a: image → y [B, M, H/16, W/16], with an optional VAE-latent fusion at H/8.

    Stages 0-4 take the image to N channels at H/8. There the features (concatenated
    with the encoder-side VAE latent when ``vae_channels > 0``) go through a per-pixel
    token MLP whose output is *added* back; stages 5-6 finish the last ×2 downsampling.
    The output projection starts at zero so that, untrained, the fusion is an identity.
    """

    def __init__(self, N: int, M: int, vae_channels: int, token_channels: int, num_token_blocks: int):
        super().__init__()
        self.N = N
        self.vae_channels = vae_channels
        self.analysis_transform = nn.Sequential(
            StridedResidualBlock(3, N),
            ResidualConvBlock(N, N),
            StridedResidualBlock(N, N),
            ResidualConvBlock(N, N),
            StridedResidualBlock(N, N),
            ResidualConvBlock(N, N),
            conv3x3(N, M, stride=2),
        )
        # Names ("_en", "layes") follow the released checkpoint.
        self.project_in_en = nn.Linear(N + vae_channels, token_channels)
        self.information_transformer_layes_en = _token_stack(token_channels, num_token_blocks)
        self.spatial_ch_projs_en = nn.Linear(token_channels, N)
        nn.init.zeros_(self.spatial_ch_projs_en.weight)
        nn.init.zeros_(self.spatial_ch_projs_en.bias)

    def forward(self, x: Tensor, vae_latent: Optional[Tensor] = None) -> Tensor:
        feat = self.analysis_transform[0:5](x)
        fusion_in = feat if vae_latent is None else torch.cat((feat, vae_latent), dim=1)
        feat = feat + _apply_per_pixel(
            fusion_in, self.project_in_en, self.information_transformer_layes_en, self.spatial_ch_projs_en
        )
        return self.analysis_transform[5:](feat)


class AnchorSynthesis(nn.Module):
    """g_s: ŷ → anchor frame [B, 3, H, W], also returning the N-channel features at H/8."""

    def __init__(self, N: int, M: int):
        super().__init__()
        self.synthesis_transform = nn.Sequential(
            ResidualConvBlock(M, N),
            UpsamplingResidualBlock(N, N),
            ResidualConvBlock(N, N),
            UpsamplingResidualBlock(N, N),
            ResidualConvBlock(N, N),
            UpsamplingResidualBlock(N, N),
            ResidualConvBlock(N, N),
            subpel_conv3x3(N, 3, 2),
        )

    def forward(self, y_hat: Tensor) -> Tuple[Tensor, Tensor]:
        mid = self.synthesis_transform[1](self.synthesis_transform[0](y_hat))
        return self.synthesis_transform[2:](mid), mid


class HyperAnalysis(nn.Module):
    """h_a: y [M, H/16] → z [N, H/64] (3x3 convs with GELU, two of them strided)."""

    def __init__(self, M: int, N: int):
        super().__init__()
        self.reduction = nn.Sequential(
            conv3x3(M, N),
            nn.GELU(),
            conv3x3(N, N),
            nn.GELU(),
            conv3x3(N, N, stride=2),
            nn.GELU(),
            conv3x3(N, N),
            nn.GELU(),
            conv3x3(N, N, stride=2),
        )

    def forward(self, y: Tensor) -> Tensor:
        return self.reduction(y)


class HyperSynthesis(nn.Module):
    """h_s: ẑ [N, H/64] → hyper features [2M, H/16]; the second half are the hyper means."""

    def __init__(self, M: int, N: int):
        super().__init__()
        wide = M * 3 // 2
        self.increase = nn.Sequential(
            conv3x3(N, M),
            nn.GELU(),
            subpel_conv3x3(M, M, 2),
            nn.GELU(),
            conv3x3(M, wide),
            nn.GELU(),
            subpel_conv3x3(wide, wide, 2),
            nn.GELU(),
            conv3x3(wide, M * 2),
        )

    def forward(self, z_hat: Tensor) -> Tensor:
        return self.increase(z_hat)


# --------------------------------------------------------------------------------------
# Entropy-model sub-networks
# --------------------------------------------------------------------------------------


class ParameterNet(nn.Module):
    """Fuses the available context into Gaussian (scale, mean) maps with 1x1 convs."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        w1, w2, w3 = _PARAM_NET_WIDTHS
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim, w1, 1),
            nn.GELU(),
            nn.Conv2d(w1, w2, 1),
            nn.GELU(),
            nn.Conv2d(w2, w3, 1),
            nn.GELU(),
            nn.Conv2d(w3, out_dim, 1),
        )

    def forward(self, context: Tensor) -> Tensor:
        return self.fusion(context)


class ResidualPredictor(nn.Module):
    """Latent residual prediction: a bounded correction 0.5·tanh(f(·)) of the quantisation error.

    The widths shrink linearly from ``in_dim`` to ``out_dim`` over four 3x3 convs.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        diff = abs(out_dim - in_dim)
        widths = [in_dim, in_dim - diff // 4, in_dim - diff // 2, in_dim - diff * 3 // 4, out_dim]
        layers: List[nn.Module] = []
        for i in range(4):
            layers.append(conv3x3(widths[i], widths[i + 1]))
            if i < 3:
                layers.append(nn.GELU())
        self.lrp_transform = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * torch.tanh(self.lrp_transform(x))


def _relative_position_index(window: int) -> Tensor:
    """[w², w²] index into a (2w-1)² bias table for every (query, key) pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # [2, w²]
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return delta[:, :, 0] * (2 * window - 1) + delta[:, :, 1]


def _local_attention_mask(h: int, w: int, window: int, device: torch.device) -> Tensor:
    """Additive mask [h·w, w², w²]: 0 where query AND key window cells are decoded anchors.

    Cells outside the latent or at non-anchor positions get -100 (the published value, a
    soft mask rather than -inf: a window with no anchors still softmaxes to uniform).
    """
    anchors = _checkerboard_mask(h, w, anchor=True, device=device).float()[None, None]
    cells = F.unfold(anchors, window, padding=(window - 1) // 2)[0].t()  # [L, w²]
    both = cells[:, :, None] * cells[:, None, :]
    zero = torch.zeros((), device=device)
    return torch.where(both == 1, zero, torch.full((), -100.0, device=device))


class _TwoLayerMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CheckerboardWindowAttention(nn.Module):
    """Local spatial context for the non-anchor part: windowed attention over decoded anchors.

    Every latent position attends within its ``window × window`` neighbourhood (relative
    position bias, 2 heads, anchor-only mask); the attended window is then collapsed by a
    ``window × window`` conv into 2·dim channels, followed by a linear layer and a
    residual MLP.
    """

    def __init__(self, dim: int, window: int = 5, mlp_ratio: float = 2.0, num_heads: int = _LOCAL_HEADS):
        super().__init__()
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.relative_position_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv_proj = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim * 2, dim * 2)
        self.mlp = _TwoLayerMLP(dim * 2, int(dim * 2 * mlp_ratio), dim * 2)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim * 2)
        self.fusion = nn.Conv2d(dim, dim * 2, kernel_size=window)

    def forward(self, anchors: Tensor, attn_mask: Tensor, workers: int = 1) -> Tensor:
        """Local context [B, 2C, H, W] of the decoded anchors [B, C, H, W]; ``workers``
        threads may share the bands (on the CPU, without gradients)."""
        b, c, h, w = anchors.shape
        pad = (self.window - 1) // 2
        tokens = self.norm1(anchors.reshape(b, c, h * w).permute(0, 2, 1))
        qkv = self.qkv_proj(tokens).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)
        qkv = F.pad(torch.cat([qkv[0], qkv[1], qkv[2]], dim=1), (pad, pad, pad, pad))  # [B, 3C, H+2p, W+2p]
        # Bands of equal height, as many as a whole number of rounds of the threads needs.
        count = -(-h * w // BAND_PIXELS)
        count = min(h, -(-count // workers) * workers)
        rows = -(-h // count)
        bands = [(qkv[:, :, top:min(h, top + rows) + 2 * pad], attn_mask[top * w:min(h, top + rows) * w])
                 for top in range(0, h, rows)]
        if workers > 1 and len(bands) > 1 and anchors.device.type == "cpu" and not torch.is_grad_enabled():
            # Each band is computed whole by one thread, so its values do not depend on
            # how many threads share the bands.
            with ThreadPoolExecutor(max_workers=workers) as pool:
                fused = torch.cat(list(pool.map(lambda band: _without_grad(self._attend_band, *band), bands)),
                                  dim=1)
        else:
            fused = torch.cat([self._attend_band(*band) for band in bands], dim=1)
        out = self.proj(fused)
        out = out + self.mlp(self.norm2(out))
        return out.permute(0, 2, 1).reshape(b, c * 2, h, w)

    def _attend_band(self, qkv: Tensor, attn_mask: Tensor) -> Tensor:
        """Attention + fusion conv for the latent rows of one band.

        ``qkv`` [B, 3C, rows+2p, W+2p] holds the band's rows with p = (window−1)/2 rows and
        columns of (zero-padded) neighbours around them, ``attn_mask`` the band's rows of
        the mask. Returns the fused windows [B, rows·W, 2C].
        """
        # The reshapes/permutes below reproduce the published memory layout exactly (the
        # 5x5 fusion conv receives a channels-last view, which selects its CPU kernel);
        # note the head split (channel = d·heads + h) differs from the merge (h·hd + d).
        b, c3, rows_padded, w_padded = qkv.shape
        c, ws, ww = c3 // 3, self.window, self.window * self.window
        n_pix = (rows_padded - ws + 1) * (w_padded - ws + 1)
        windows = F.unfold(qkv, ws).permute(0, 2, 1)
        windows = windows.view(b, n_pix, 3, c, ws, ws).permute(2, 0, 1, 3, 4, 5)

        def heads(t: Tensor) -> Tensor:  # [B, L, C, ws, ws] → [B, L, heads, w², head_dim]
            return t.reshape(b, n_pix, self.head_dim, self.num_heads, ww).permute(0, 1, 3, 4, 2)

        q, k, v = heads(windows[0]), heads(windows[1]), heads(windows[2])
        attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, L, heads, w², w²]
        bias = self.relative_position_table[self.relative_position_index.view(-1)].view(ww, ww, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0).unsqueeze(1)
        attn = attn + attn_mask.unsqueeze(0).unsqueeze(2)
        attn = attn.softmax(dim=-1)

        out = (attn @ v).reshape(b, n_pix, self.num_heads, ws, ws, self.head_dim)
        out = out.permute(0, 1, 3, 4, 2, 5).reshape(b * n_pix, ws, ws, c).permute(0, 3, 1, 2)
        return self.fusion(out).reshape(b, n_pix, c * 2)


class ChannelContextNet(nn.Module):
    """Channel context: 3x3 convs over all previously decoded slices → 4·slice channels."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        w1, w2 = _CHANNEL_CTX_WIDTHS
        self.fushion = nn.Sequential(  # (sic) checkpoint name
            nn.Conv2d(in_dim, w1, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(w2, out_dim * 4, 3, padding=1),
        )

    def forward(self, decoded: Tensor) -> Tensor:
        return self.fushion(decoded)


def _pointwise_then_depthwise(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 3, padding=1, groups=dim))


def _linear_attention(keys: Tensor, queries: Tensor, values: Tensor) -> Tensor:
    """Efficient (linear) attention on [B, heads, head_dim, P] maps (softmaxes done by caller)."""
    context = keys @ values.transpose(-2, -1)  # [B, heads, hd, hd]
    return context.transpose(-2, -1) @ queries


class LinearIntraSliceContext(nn.Module):
    """Global context inside the current slice for its non-anchor part.

    Keys come from the anchor positions and queries from the non-anchor positions of the
    *previous* slice; values from the decoded anchors of the *current* slice. Linear
    attention (softmax over positions for keys, over channels for queries) makes it
    global at O(P) cost.
    """

    def __init__(self, dim: int, num_heads: int = _INTRA_HEADS):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.keys = _pointwise_then_depthwise(dim)
        self.queries = _pointwise_then_depthwise(dim)
        self.values = _pointwise_then_depthwise(dim)
        self.reprojection = nn.Conv2d(dim, dim * 2, 5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim * 2, dim * 4, 1),
            nn.GELU(),
            nn.Conv2d(dim * 4, dim * 4, 3, padding=1, groups=dim * 4),
            nn.GELU(),
            nn.Conv2d(dim * 4, dim * 2, 1),
        )

    def forward(self, previous_slice: Tensor, current_anchors: Tensor) -> Tensor:
        b, _, h, w = previous_slice.shape
        hd, half = self.dim // self.num_heads, h * w // 2
        queries = _squeeze(self.queries(_keep(previous_slice, anchor=False)), anchor=False)
        keys = _squeeze(self.keys(_keep(previous_slice, anchor=True)), anchor=True)
        values = _squeeze(self.values(current_anchors), anchor=True)

        keys = keys.reshape(b, self.num_heads, hd, half).softmax(dim=-1)
        queries = queries.reshape(b, self.num_heads, hd, half).softmax(dim=-2)
        values = values.reshape(b, self.num_heads, hd, half)

        # Back on the full grid (zeros in between) before the products: the published
        # code sums over all H·W positions, and we keep its summation length.
        def full(t: Tensor, anchor: bool) -> Tensor:
            t = _unsqueeze(t.reshape(b * self.num_heads, hd, h, w // 2), anchor=anchor)
            return t.reshape(b, self.num_heads, hd, h * w)

        attended = _linear_attention(full(keys, True), full(queries, False), full(values, True))
        attention = self.reprojection(attended.reshape(b, self.dim, h, w))
        return attention + self.mlp(attention)


class LinearInterSliceContext(nn.Module):
    """Global context across slices: linear self-attention over all decoded slices."""

    def __init__(self, dim: int, out_dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"inter-slice context: {dim} channels not divisible by {num_heads} heads")
        self.dim = dim
        self.num_heads = num_heads
        wide = out_dim * 3 // 2
        self.keys = _pointwise_then_depthwise(dim)
        self.queries = _pointwise_then_depthwise(dim)
        self.values = _pointwise_then_depthwise(dim)
        self.reprojection = nn.Conv2d(dim, wide, 5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(wide, out_dim * 2, 1),
            nn.GELU(),
            nn.Conv2d(out_dim * 2, out_dim * 2, 3, padding=1, groups=out_dim * 2),
            nn.GELU(),
            nn.Conv2d(out_dim * 2, out_dim, 1),
        )
        self.skip = nn.Conv2d(wide, out_dim, 1)

    def forward(self, decoded: Tensor) -> Tensor:
        b, _, h, w = decoded.shape
        shape = (b, self.num_heads, self.dim // self.num_heads, h * w)
        queries = self.queries(decoded).reshape(shape).softmax(dim=-2)
        keys = self.keys(decoded).reshape(shape).softmax(dim=-1)
        values = self.values(decoded).reshape(shape)
        attended = _linear_attention(keys, queries, values)
        attention = self.reprojection(attended.reshape(b, self.dim, h, w))
        return self.skip(attention) + self.mlp(attention)


def _inter_context_heads(dim: int) -> int:
    """One head per 32 channels (published rule), at least one, dividing ``dim``."""
    heads = max(1, dim // 32)
    while dim % heads:
        heads -= 1
    return heads


# --------------------------------------------------------------------------------------
# The codec
# --------------------------------------------------------------------------------------



def rans_safe(string: bytes, symbols: int) -> bytes:
    """``string`` followed by enough zero bytes that CompressAI's rANS decoder cannot read
    past the end of its buffer while decoding ``symbols`` symbols.

    Its C++ decoder never checks its read pointer: on a short or corrupted string it reads
    the memory after it (a crash when the string lives on the stack; docs/robustness.md,
    finding 1). Per symbol it reads at most one renormalisation word and, in bypass mode,
    one word for the bypass count; longer bypass runs need 0xF nibbles, of which a string
    of n bytes holds at most 2n (+16 in the state), each asking for 15 nibbles more. Zero
    bytes end every bypass run, so 32 bytes per string byte, 16 per symbol and 4 KiB bound
    every read inside the padded buffer. A valid stream is consumed exactly as before and
    decodes to the same symbols (conformance pins); the padding costs ~16 bytes per symbol
    for the duration of the call (~75 MB at 12 MP with models/default).
    """
    return string + bytes(32 * len(string) + 16 * symbols + 4096)

class AnchorCodec(CompressionModel):
    """NeFIC anchor codec (see the module docstring for the data flow).

    Args:
        N: channels of the transforms and of z (released: 192).
        M: channels of y (released: 320); must split into ``num_slices`` equal slices with
            an even number of channels each.
        num_slices: channel slices of y, coded one after the other (released: 10).
        context_window: side of the local attention window, odd (released: 5; the
            published code hard-wires 5 whatever its config says).
        vae_channels: channels of the encoder-side VAE latent fused into g_a at H/8
            (released: 16, the CogVideoX VAE latent). 0 = no VAE latent: the codec then
            takes images only.
        bypass_channels: channels of the bypass latent (released: 16).
        num_rate_levels: number of gain-vector rate levels (ours; released: 0 = none).
        token_channels, num_token_blocks: width and depth of the per-pixel token MLPs in
            g_a and in the bypass head (released: 320, 3).

    ``self.config`` holds these arguments as a JSON-able dict: ``AnchorCodec(**config)``
    rebuilds the same architecture.

    A freshly built (or trained) model needs ``update(force=True)`` before entropy coding;
    it uses CompressAI's default scale table (64 log-spaced scales 0.11 … 256), the same as
    the published code. Weights loaded with :meth:`load_state_dict` bring their own tables.

    Inputs: RGB in [0, 1], [B, 3, H, W], zero-padded (see :func:`pad_to_multiple`) to a
    multiple of :attr:`required_multiple`. Entropy coding handles B = 1.
    """

    #: H and W of images given to forward()/compress() must be multiples of this.
    required_multiple = 64
    #: total downsampling of y relative to the image.
    latent_stride = 16

    def __init__(
        self,
        N: int = 192,
        M: int = 320,
        num_slices: int = 10,
        context_window: int = 5,
        vae_channels: int = 16,
        bypass_channels: int = 16,
        num_rate_levels: int = 0,
        token_channels: int = 320,
        num_token_blocks: int = 3,
    ):
        super().__init__()
        for name, value, minimum in (
            ("N", N, 1),
            ("M", M, 1),
            ("num_slices", num_slices, 1),
            ("context_window", context_window, 1),
            ("vae_channels", vae_channels, 0),
            ("bypass_channels", bypass_channels, 1),
            ("num_rate_levels", num_rate_levels, 0),
            ("token_channels", token_channels, 1),
            ("num_token_blocks", num_token_blocks, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"AnchorCodec: {name} must be an int >= {minimum}, got {value!r}")
        if M % num_slices:
            raise ValueError(f"AnchorCodec: M={M} is not divisible by num_slices={num_slices}")
        slice_ch = M // num_slices
        if slice_ch % 2:
            raise ValueError(f"AnchorCodec: slice width M/num_slices={slice_ch} must be even (2 attention heads)")
        if context_window % 2 == 0:
            raise ValueError(f"AnchorCodec: context_window must be odd, got {context_window}")

        self.config: Dict[str, int] = {
            "N": N,
            "M": M,
            "num_slices": num_slices,
            "context_window": context_window,
            "vae_channels": vae_channels,
            "bypass_channels": bypass_channels,
            "num_rate_levels": num_rate_levels,
            "token_channels": token_channels,
            "num_token_blocks": num_token_blocks,
        }
        self.N, self.M = N, M
        self.num_slices, self.slice_channels = num_slices, slice_ch
        self.context_window = context_window
        self.vae_channels, self.bypass_channels = vae_channels, bypass_channels
        self.num_rate_levels = num_rate_levels

        # Registration order reproduces the released state_dict order.
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.g_a = AnchorAnalysis(N, M, vae_channels, token_channels, num_token_blocks)
        self.g_s = AnchorSynthesis(N, M)
        # Bypass head (top-level names, as in the checkpoint): g_s features at H/8 → latent.
        self.project_in = nn.Linear(N, token_channels)
        self.information_transformer_layes = _token_stack(token_channels, num_token_blocks)
        self.spatial_ch_projs = nn.Linear(token_channels, bypass_channels)

        self.h_a = HyperAnalysis(M, N)
        self.h_s = HyperSynthesis(M, N)
        self.gaussian_conditional = GaussianConditional(None)

        s = slice_ch
        self.local_context = nn.ModuleList(
            CheckerboardWindowAttention(s, window=context_window) for _ in range(num_slices)
        )
        # Slice 0 has no previously decoded slices: its entries are None (no parameters).
        self.channel_context = nn.ModuleList(
            ChannelContextNet(s * i, s) if i else None for i in range(num_slices)
        )
        self.global_inter_context = nn.ModuleList(
            LinearInterSliceContext(s * i, s * 2, _inter_context_heads(s * i)) if i else None
            for i in range(num_slices)
        )
        self.global_intra_context = nn.ModuleList(
            LinearIntraSliceContext(s) if i else None for i in range(num_slices)
        )
        # Anchor params see [inter 2s, channel 4s, hyper 2M]; non-anchor params additionally
        # [local 2s, intra 2s]. Slice 0 only has hyper (+ local for the non-anchors).
        self.entropy_parameters_anchor = nn.ModuleList(
            ParameterNet(M * 2 + (s * 6 if i else 0), s * 2) for i in range(num_slices)
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            ParameterNet(M * 2 + (s * 10 if i else s * 2), s * 2) for i in range(num_slices)
        )
        # LRP input: hyper means (M) + decoded slices before i + the current slice.
        self.lrp_anchor = nn.ModuleList(ResidualPredictor(M + (i + 1) * s, s) for i in range(num_slices))
        self.lrp_nonanchor = nn.ModuleList(ResidualPredictor(M + (i + 1) * s, s) for i in range(num_slices))

        if num_rate_levels:
            # Level l scales y by 2^e with e from -1 to +1: higher level → more bits.
            exponents = torch.linspace(-1.0, 1.0, num_rate_levels) if num_rate_levels > 1 else torch.zeros(1)
            init = torch.pow(2.0, exponents)[:, None].repeat(1, M)
            self.gain = nn.Parameter(init.clone())
            self.inverse_gain = nn.Parameter(1.0 / init)

        self._mask_cache: Dict[Tuple[int, int, str], Tensor] = {}

    # ---------------------------------------------------------------- construction / IO

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AnchorCodec":
        """Build from a config dict as stored in :attr:`config`."""
        return cls(**dict(config))

    @staticmethod
    def infer_config(state_dict: Mapping[str, Tensor]) -> Dict[str, int]:
        """Read the architecture config off a state_dict (official or ours)."""
        try:
            N = int(state_dict["entropy_bottleneck.quantiles"].shape[0])
            M = int(state_dict["g_a.analysis_transform.6.weight"].shape[0])
            num_slices = sum(
                1 for k in state_dict if k.startswith("local_context.") and k.endswith(".qkv_proj.weight")
            )
            table = int(state_dict["local_context.0.relative_position_table"].shape[0])
            token_channels = int(state_dict["project_in.weight"].shape[0])
            config = {
                "N": N,
                "M": M,
                "num_slices": num_slices,
                "context_window": (math.isqrt(table) + 1) // 2,
                "vae_channels": int(state_dict["g_a.project_in_en.weight"].shape[1]) - N,
                "bypass_channels": int(state_dict["spatial_ch_projs.weight"].shape[0]),
                "num_rate_levels": int(state_dict["gain"].shape[0]) if "gain" in state_dict else 0,
                "token_channels": token_channels,
                "num_token_blocks": sum(
                    1
                    for k in state_dict
                    if k.startswith("information_transformer_layes.") and k.endswith(".value_proj.weight")
                ),
            }
        except KeyError as err:
            raise ValueError(f"not an AnchorCodec state_dict: missing {err}") from None
        return config

    @classmethod
    def load_pretrained_state_dict(
        cls, state_dict: Mapping[str, Tensor], config: Optional[Mapping[str, Any]] = None
    ) -> "AnchorCodec":
        """Build a codec for ``state_dict`` and load it strictly, CDF tables included.

        ``config`` defaults to :meth:`infer_config`. The CDF tables are taken from the file
        as they are (``update()`` is NOT called: the bitstreams of the released model
        depend on exactly those tables). Floating tensors are loaded as float32 (fp16
        files load exactly). Returns the model in eval mode.
        """
        model = cls(**dict(config if config is not None else cls.infer_config(state_dict)))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Strict-by-default loading that first resizes the CDF buffers to the file's shapes.

        (torch cannot load a buffer of a different shape; the CDF tables' shapes depend on
        the data they were built from.) Unlike the published loader, ``strict=True`` is
        the default so that a wrong architecture cannot load silently.
        """
        for name, module in self.named_modules():
            for kind, buffer_names in _CDF_BUFFERS.items():
                if not isinstance(module, kind):
                    continue
                for buffer_name in buffer_names:
                    key = f"{name}.{buffer_name}"
                    if key in state_dict:
                        getattr(module, buffer_name).resize_(state_dict[key].shape)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    # ---------------------------------------------------------------- input checking

    def _check_image(self, x: Tensor, multiple: int, what: str = "x") -> None:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be an RGB tensor [B, 3, H, W], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a floating tensor with values in [0, 1], got {x.dtype}")
        h, w = x.shape[-2:]
        if h == 0 or w == 0 or h % multiple or w % multiple:
            raise ValueError(
                f"{what} height and width must be positive multiples of {multiple}, got {h}x{w}; "
                f"pad with pad_to_multiple(x, {multiple}) first"
            )

    def _check_vae_latent(self, x: Tensor, vae_latent: Optional[Tensor]) -> None:
        if self.vae_channels == 0:
            if vae_latent is not None:
                raise ValueError("this AnchorCodec has vae_channels=0 and takes no vae_latent")
            return
        expected = (x.shape[0], self.vae_channels, x.shape[2] // 8, x.shape[3] // 8)
        if vae_latent is None:
            raise ValueError(
                f"this AnchorCodec needs the encoder-side VAE latent (vae_channels={self.vae_channels}): "
                f"pass vae_latent of shape {list(expected)}"
            )
        if not isinstance(vae_latent, Tensor) or tuple(vae_latent.shape) != expected:
            got = tuple(vae_latent.shape) if isinstance(vae_latent, Tensor) else type(vae_latent).__name__
            raise ValueError(f"vae_latent must have shape {list(expected)} (= [B, C, H/8, W/8]), got {got}")

    def _check_y(self, y: Tensor, name: str = "y") -> None:
        if not isinstance(y, Tensor) or y.ndim != 4 or y.shape[1] != self.M:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{name} must have shape [B, {self.M}, h, w], got {shape}")
        h, w = y.shape[-2:]
        if h == 0 or w == 0 or h % 4 or w % 4:
            raise ValueError(f"{name} height and width must be positive multiples of 4 (image /64), got {h}x{w}")

    def _check_entropy_dtype(self) -> None:
        if self.h_s.increase[0].weight.dtype != torch.float32:
            raise RuntimeError(
                "the entropy-model modules of AnchorCodec must stay float32 "
                f"(found {self.h_s.increase[0].weight.dtype}); convert only g_a/g_s to lower precision"
            )

    # ---------------------------------------------------------------- rate levels

    def _gains(self, rate_level: RateLevel) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(gain, inverse_gain) as [1, M, 1, 1] for ``rate_level``; (None, None) without levels."""
        if isinstance(rate_level, bool) or not isinstance(rate_level, (int, float)):
            raise ValueError(f"rate_level must be an int or float, got {rate_level!r}")
        if self.num_rate_levels == 0:
            if rate_level != 0:
                raise ValueError(
                    f"this AnchorCodec has no rate levels (num_rate_levels=0); got rate_level={rate_level}"
                )
            return None, None
        top = self.num_rate_levels - 1
        if not 0 <= rate_level <= top:
            raise ValueError(f"rate_level must lie in [0, {top}], got {rate_level}")
        low = int(math.floor(rate_level))
        frac = float(rate_level) - low
        gain, inverse = self.gain[low].abs(), self.inverse_gain[low].abs()
        if frac > 0:
            # Geometric interpolation: log-gains are linear in the level (Cui et al. 2021).
            gain = gain.pow(1.0 - frac) * self.gain[low + 1].abs().pow(frac)
            inverse = inverse.pow(1.0 - frac) * self.inverse_gain[low + 1].abs().pow(frac)
        return gain.view(1, -1, 1, 1), inverse.view(1, -1, 1, 1)

    # ---------------------------------------------------------------- transforms

    def analyze(self, x: Tensor, vae_latent: Optional[Tensor] = None, rate_level: RateLevel = 0) -> Tensor:
        """g_a (+ gain): image [B, 3, H, W] → y [B, M, H/16, W/16] (float32).

        Needs H, W multiples of 16 only, so the caller may run it on overlapping tiles and
        stitch y; entropy coding (:meth:`encode_latent`) then runs on the whole y.
        """
        self._check_image(x, self.latent_stride)
        self._check_vae_latent(x, vae_latent)
        gain, _ = self._gains(rate_level)
        dtype = self.g_a.analysis_transform[6].weight.dtype
        if vae_latent is not None:
            vae_latent = vae_latent.to(dtype)
        y = self.g_a(x.to(dtype), vae_latent).float()
        return y if gain is None else y * gain

    def synthesize(
        self, y_hat: Tensor, rate_level: RateLevel = 0, with_bypass: bool = True
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """(inverse gain +) g_s and the bypass head: ŷ → (anchor_frame, bypass_latent), float32.

        ``anchor_frame`` [B, 3, 16h, 16w] is unclamped; ``bypass_latent`` is
        [B, 1, bypass_channels, 2h, 2w], or None with ``with_bypass=False`` (anchor-only
        decoding and anchor-only training skip the bypass head's cost). Purely
        convolutional + per-pixel, so it may be run on overlapping tiles of ŷ.
        """
        if not isinstance(y_hat, Tensor) or y_hat.ndim != 4 or y_hat.shape[1] != self.M:
            shape = tuple(y_hat.shape) if isinstance(y_hat, Tensor) else type(y_hat).__name__
            raise ValueError(f"y_hat must have shape [B, {self.M}, h, w], got {shape}")
        _, inverse_gain = self._gains(rate_level)
        if inverse_gain is not None:
            y_hat = y_hat * inverse_gain
        dtype = self.g_s.synthesis_transform[0].conv1.weight.dtype
        anchor_frame, mid = self.g_s(y_hat.to(dtype))
        if not with_bypass:
            return anchor_frame.float(), None
        bypass = _apply_per_pixel(mid, self.project_in, self.information_transformer_layes, self.spatial_ch_projs)
        return anchor_frame.float(), bypass.unsqueeze(1).float()

    # ---------------------------------------------------------------- entropy model core

    def _attention_mask(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            mask = _local_attention_mask(h, w, self.context_window, device)
            self._mask_cache[key] = mask
        return mask

    def _run_slices(self, hyper: Tensor, quantize: PartQuantizer, workers: int = 1) -> Tuple[Tensor, Tensor, Tensor]:
        """The checkerboard × channel-slice autoregression shared by forward/compress/decompress.

        ``quantize(slice_index, anchor, scales, means)`` receives full-grid scale/mean maps
        of one slice and must return the quantised values ŷ = round(y−μ)+μ of that part on
        the full grid, zeros at the other part's positions (from y, with STE, or from the
        bitstream). Returns (ŷ, scales, means), each [B, M, h, w].
        """
        with _side_thread(workers > 1 and hyper.device.type == "cpu" and not torch.is_grad_enabled()) as both:
            return self._slices(hyper, quantize, workers, both)

    def _slices(self, hyper: Tensor, quantize: PartQuantizer, workers: int,
                both: Both) -> Tuple[Tensor, Tensor, Tensor]:
        """:meth:`_run_slices` with ``both`` running pairs of independent context networks."""
        hyper_means = hyper.chunk(2, dim=1)[1]
        mask = self._attention_mask(hyper.shape[-2], hyper.shape[-1], hyper.device)
        is_anchor = _checkerboard_mask(hyper.shape[-2], hyper.shape[-1], True, hyper.device)
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
            anchors = anchors + _keep(correction, anchor=True)

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
            y_hat_slice = y_hat_slice + _keep(correction, anchor=False)

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
    def encode_latent(self, y: Tensor, return_symbols: bool = False) -> Dict[str, Any]:
        """Entropy-code y [1, M, h, w] (h, w multiples of 4; already gained).

        Returns ``{"strings": [[y_string], [z_string]], "shape": (h/4, w/4),
        "symbols_crc32": int, "y_hat": Tensor}``; ``y_hat`` is exactly what
        :meth:`decode_latent` will reconstruct. With ``return_symbols`` the int32 arrays
        ``"y_symbols"`` and ``"y_indexes"`` given to the rANS coder (coding order) are
        added, for diagnostics and conformance tests.
        """
        self._check_y(y)
        if y.shape[0] != 1:
            raise ValueError(f"entropy coding handles one image at a time (B=1), got B={y.shape[0]}")
        self._check_entropy_dtype()
        symbols: List[int] = []
        indexes: List[int] = []
        gc = self.gaussian_conditional
        with _deterministic_entropy_path(y.device) as threads:
            y = y.float()
            z = self.h_a(y)
            z_strings = self.entropy_bottleneck.compress(z)
            z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
            hyper = self.h_s(z_hat)
            y_parts = y.chunk(self.num_slices, dim=1)

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                values, means_sq = _squeeze(y_parts[i], anchor), _squeeze(means, anchor)
                part_symbols = gc.quantize(values, "symbols", means_sq)
                symbols.extend(part_symbols.reshape(-1).tolist())
                indexes.extend(gc.build_indexes(_squeeze(scales, anchor)).reshape(-1).tolist())
                return _unsqueeze(part_symbols + means_sq, anchor)

            y_hat, _, _ = self._run_slices(hyper, quantize, workers=threads)
            cdf, cdf_lengths, offsets = self._cdf_tables()
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(symbols, indexes, cdf, cdf_lengths, offsets)
            y_string = encoder.flush()
        out = {
            "strings": [[y_string], z_strings],
            "shape": tuple(int(s) for s in z.shape[-2:]),
            "symbols_crc32": _symbols_crc32(symbols),
            "y_hat": y_hat,
        }
        if return_symbols:
            out["y_symbols"] = np.asarray(symbols, dtype=np.int32)
            out["y_indexes"] = np.asarray(indexes, dtype=np.int32)
        return out

    @torch.no_grad()
    def decode_latent(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> Dict[str, Any]:
        """Entropy-decode ``strings = [[y_string], [z_string]]`` with z of spatial ``shape``.

        Returns ``{"y_hat": [1, M, 4·shape], "symbols_crc32": int}`` (ŷ in the gained
        domain: the rate level is not needed here, only by :meth:`synthesize`). Compare
        the CRC with the encoder's to detect a desynchronised or corrupted stream.
        """
        y_string, z_string = self._check_strings(strings)
        if len(shape) != 2 or any(isinstance(s, bool) or int(s) != s or int(s) <= 0 for s in shape):
            raise ValueError(f"shape must be the positive (height, width) of z, got {shape!r}")
        shape = (int(shape[0]), int(shape[1]))
        positions = shape[0] * shape[1]
        z_string = rans_safe(z_string, self.entropy_bottleneck.channels * positions)
        y_string = rans_safe(y_string, self.M * 16 * positions)
        self._check_entropy_dtype()
        device = self.h_s.increase[0].weight.device
        gc = self.gaussian_conditional
        symbols: List[int] = []
        with _deterministic_entropy_path(device) as threads:
            z_hat = self.entropy_bottleneck.decompress([z_string], shape)
            hyper = self.h_s(z_hat)
            cdf, cdf_lengths, offsets = self._cdf_tables()
            decoder = RansDecoder()
            decoder.set_stream(y_string)

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                part_indexes = gc.build_indexes(_squeeze(scales, anchor))
                values = decoder.decode_stream(part_indexes.reshape(-1).tolist(), cdf, cdf_lengths, offsets)
                symbols.extend(values)
                values = torch.tensor(values, dtype=torch.float32, device=scales.device)
                means_sq = _squeeze(means, anchor)
                return _unsqueeze(values.reshape(means_sq.shape) + means_sq, anchor)

            y_hat, _, _ = self._run_slices(hyper, quantize, workers=threads)
        return {"y_hat": y_hat, "symbols_crc32": _symbols_crc32(symbols)}

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

    # ---------------------------------------------------------------- CompressAI API

    def forward(
        self, x: Tensor, vae_latent: Optional[Tensor] = None, rate_level: RateLevel = 0, with_bypass: bool = True
    ) -> Dict[str, Any]:
        """Training / estimation pass with straight-through rounding (as published).

        y and z are rounded around their means/medians with an STE (no additive noise), so
        in eval mode the reconstruction equals :meth:`decompress` of :meth:`compress`;
        the likelihoods follow the entropy models' training flag (uniform noise in
        training mode, rounding in eval mode).

        Returns ``{"anchor_frame": [B, 3, H, W] (unclamped), "bypass_latent":
        [B, 1, bypass_channels, H/8, W/8], "likelihoods": {"y": ..., "z": ...}}``.
        """
        self._check_image(x, self.required_multiple)
        return self.forward_latent(self.analyze(x, vae_latent, rate_level), rate_level, with_bypass)

    def forward_latent(
        self, y: Tensor, rate_level: RateLevel = 0, with_bypass: bool = True, noisy_likelihoods: Optional[bool] = None
    ) -> Dict[str, Any]:
        """:meth:`forward` from an analysed (gained) latent ``y`` onwards, differentiable in
        ``y``: how the encoder refines a latent (:mod:`ulbcodec.refinement`).
        ``noisy_likelihoods`` overrides the entropy models' training flag for the
        likelihoods (``True``: uniform-noise proxies, whose gradient in ``y`` is useful
        where rounded values have none)."""
        self._check_y(y)
        with _deterministic_entropy_path(y.device, single_thread=not self.training):
            z = self.h_a(y)
            _, z_likelihoods = self.entropy_bottleneck(z, training=noisy_likelihoods)
            medians = self.entropy_bottleneck._get_medians()
            z_hat = _ste_round(z - medians) + medians
            hyper = self.h_s(z_hat)
            y_parts = y.chunk(self.num_slices, dim=1)

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                return _keep(_ste_round(y_parts[i] - means) + means, anchor)

            y_hat, scales, means = self._run_slices(hyper, quantize)
            _, y_likelihoods = self.gaussian_conditional(y, scales, means, training=noisy_likelihoods)
        anchor_frame, bypass_latent = self.synthesize(y_hat, rate_level, with_bypass)
        return {
            "anchor_frame": anchor_frame,
            "bypass_latent": bypass_latent,
            "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
        }

    @torch.no_grad()
    def compress(self, x: Tensor, vae_latent: Optional[Tensor] = None, rate_level: RateLevel = 0) -> Dict[str, Any]:
        """Encode one padded image [1, 3, H, W] (H, W multiples of 64).

        Returns ``{"strings": [[y_string], [z_string]], "shape": (H/64, W/64),
        "symbols_crc32": int}``. The rate level is not written anywhere: the caller stores
        it and passes it to :meth:`decompress`.
        """
        self._check_image(x, self.required_multiple)
        if x.shape[0] != 1:
            raise ValueError(f"compress handles one image at a time (B=1), got B={x.shape[0]}")
        out = self.encode_latent(self.analyze(x, vae_latent, rate_level))
        return {"strings": out["strings"], "shape": out["shape"], "symbols_crc32": out["symbols_crc32"]}

    @torch.no_grad()
    def decompress(
        self, strings: Sequence[Sequence[bytes]], shape: Sequence[int], rate_level: RateLevel = 0
    ) -> Dict[str, Any]:
        """Decode :meth:`compress` output: ``{"anchor_frame", "bypass_latent", "symbols_crc32"}``.

        ``anchor_frame`` is unclamped and padded: clamp to [0, 1] and crop to the original
        size (:func:`crop_to_size`).
        """
        self._gains(rate_level)  # validate before the (slow) entropy decoding
        out = self.decode_latent(strings, shape)
        anchor_frame, bypass_latent = self.synthesize(out["y_hat"], rate_level)
        return {
            "anchor_frame": anchor_frame,
            "bypass_latent": bypass_latent,
            "symbols_crc32": out["symbols_crc32"],
        }
