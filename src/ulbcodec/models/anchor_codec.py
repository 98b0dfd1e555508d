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

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import conv3x3, subpel_conv3x3
from compressai.models import CompressionModel

from ulbcodec.entropy.checkerboard import keep_part
from ulbcodec.entropy.coding import deterministic_entropy_path
from ulbcodec.entropy.context import (ChannelContextNet, CheckerboardWindowAttention, LinearInterSliceContext,
                                      LinearIntraSliceContext, ParameterNet, ResidualPredictor, inter_context_heads)
from ulbcodec.entropy.latent_codec import CheckerboardSliceLatentCodec
from ulbcodec.layers import (ResidualConvBlock, StridedResidualBlock, UpsamplingResidualBlock, apply_per_pixel,
                             conv_activations, rate_gains, token_stack)

__all__ = [
    "AnchorCodec",
    "pad_to_multiple",
    "crop_to_size",
    "RELEASED_CONFIG",
]

RateLevel = Union[int, float]

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

# CDF buffers whose shapes are data dependent (set by update() or by a loaded file).
_CDF_BUFFERS = {
    EntropyBottleneck: ("_quantized_cdf", "_offset", "_cdf_length"),
    GaussianConditional: ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"),
}


def resize_cdf_buffers(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Resize ``model``'s CDF buffers to the shapes ``state_dict`` holds, so that a strict
    load can follow (torch cannot load a buffer of another shape)."""
    for name, module in model.named_modules():
        for kind, buffer_names in _CDF_BUFFERS.items():
            if not isinstance(module, kind):
                continue
            for buffer_name in buffer_names:
                key = f"{name}.{buffer_name}"
                if key in state_dict:
                    getattr(module, buffer_name).resize_(state_dict[key].shape)


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
        self.information_transformer_layes_en = token_stack(token_channels, num_token_blocks)
        self.spatial_ch_projs_en = nn.Linear(token_channels, N)
        nn.init.zeros_(self.spatial_ch_projs_en.weight)
        nn.init.zeros_(self.spatial_ch_projs_en.bias)

    def forward(self, x: Tensor, vae_latent: Optional[Tensor] = None) -> Tensor:
        feat = self.analysis_transform[0:5](x)
        fusion_in = feat if vae_latent is None else torch.cat((feat, vae_latent), dim=1)
        feat = feat + apply_per_pixel(
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


class AnchorCodec(CheckerboardSliceLatentCodec, CompressionModel):
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
        self.information_transformer_layes = token_stack(token_channels, num_token_blocks)
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
            LinearInterSliceContext(s * i, s * 2, inter_context_heads(s * i)) if i else None
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
        resize_cdf_buffers(self, state_dict)
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
        return rate_gains(self.gain, self.inverse_gain, rate_level)

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
        y = self.g_a(conv_activations(x.to(dtype)), vae_latent).float().contiguous()
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
        anchor_frame, mid = self.g_s(conv_activations(y_hat.to(dtype)))
        anchor_frame, mid = anchor_frame.float().contiguous(), mid.contiguous()
        if not with_bypass:
            return anchor_frame, None
        bypass = apply_per_pixel(mid, self.project_in, self.information_transformer_layes, self.spatial_ch_projs)
        return anchor_frame, bypass.unsqueeze(1).float()

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
        with deterministic_entropy_path(y.device, single_thread=not self.training):
            z = self.h_a(y)
            _, z_likelihoods = self.entropy_bottleneck(z, training=noisy_likelihoods)
            medians = self.entropy_bottleneck._get_medians()
            z_hat = _ste_round(z - medians) + medians
            hyper = self.h_s(z_hat)
            y_parts = y.chunk(self.num_slices, dim=1)

            def quantize(i: int, anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
                return keep_part(_ste_round(y_parts[i] - means) + means, anchor)

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
