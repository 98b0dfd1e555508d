"""Latent-conditional P-frame codec: the keyframe codec's own latent, entropy coded given
the latent of the reference frame.

Conditional entropy coding of video (Liu, Wang, Mu, Lin and Urtasun, "Conditional Entropy
Coding for Efficient Video Compression", ECCV 2020): every frame goes through the *image*
codec's analysis and synthesis transforms, and the temporal redundancy is removed by the
entropy model alone, whose means and scales see the latent of the previous decoded frame.
Here those transforms are the keyframe codec's (:class:`~ulbcodec.models.anchor_codec.AnchorCodec`),
copied and frozen: a P frame decodes to what a keyframe at its level would, and training
minimises the rate alone, so nothing can trade the latent away for a copy of the
reference (the collapse of every learnt residual so far, docs/training.md).

Data flow (B=1 for entropy coding; H, W multiples of 64)::

            ┌─────┐       ┌───────┐  p [M, H/16] (rounded to 1/32)
    x_ref ─►┤ g_a ├─×gain─┤ round ├──────────────┬───────────────────────┐
            └─────┘       └───────┘              │                       │
            ┌─────┐                               │ ┌─────┐             │
     x ───►─┤ g_a ├─×gain─► y ──┬── cat(y, p) ───┴─┤ h_a ├─ z ···EB··· ẑ ─► h_s ─► hyper
            └─────┘             │                   └─────┘                          │
                                │   ┌────────────────────────────────────────────────┴───┐
                                └─►─┤ checkerboard, 2 parts:                             │
                                    │   σ, Δ = params(hyper, prior_net(p)                │
                                    │                 [, ctx(ŷ − p on the anchors)])     │
                                    │   μ = p + Δ;  ŷ = round(y−μ)+μ  ···rANS(σ)···     │
                                    └───────────────────────┬────────────────────────────┘
                                                            │ ŷ ×inverse_gain
                                              ┌─────┐       │
                                      x̂ ◄────┤ g_s ├───────┘
                                              └─────┘

``···`` is what the bitstream carries (the same layout as
:class:`~ulbcodec.models.pframe_codec.PFrameCodec`: one z string, one y string). ``g_a``,
``g_s`` and the per-level gains are the keyframe codec's, frozen; the hyperprior,
``prior_net``, the spatial context and the parameter networks are trained.
Determinism: ``g_a(x_ref)`` runs in the deterministic entropy path (one thread, float32),
and ``p`` is rounded to 1/32 before anything else sees it
(:mod:`ulbcodec.entropy.conditional_latent_codec`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import conv3x3, subpel_conv3x3
from compressai.models import CompressionModel

from ulbcodec.entropy.checkerboard import checkerboard_mask, keep_part
from ulbcodec.entropy.conditional_latent_codec import ConditionalCheckerboardLatentCodec, round_prior
from ulbcodec.layers import rate_gains
from ulbcodec.models.anchor_codec import AnchorAnalysis, AnchorCodec, AnchorSynthesis, _ste_round, resize_cdf_buffers

__all__ = ["LatentConditionalCodec"]

RateLevel = Union[int, float]
FROZEN_PREFIXES = ("g_a.", "g_s.", "gain", "inverse_gain")  # the keyframe codec's parts
INITIAL_SCALE = 1.0  # σ of an untrained model: about the spread of y − p at low levels


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class LatentConditionalCodec(ConditionalCheckerboardLatentCodec, CompressionModel):
    """Latent-conditional P-frame codec (see the module docstring for the data flow).

    Args:
        N, M, token_channels, num_token_blocks: the keyframe codec's transforms
            (:class:`~ulbcodec.models.anchor_codec.AnchorCodec` without a VAE latent).
        hyper_channels: channels of z.
        num_rate_levels: the keyframe codec's gain-vector rate levels.

    Build one from a trained keyframe codec with :meth:`from_anchor_codec`.
    """

    #: x̂ is the keyframe codec's synthesis of ŷ: the reference steers only the rate (and,
    #: through the means, which side of a rounding boundary ŷ falls on)
    reconstruction_ignores_reference = True

    def __init__(self, N: int = 48, M: int = 96, token_channels: int = 64, num_token_blocks: int = 3,
                 hyper_channels: int = 64, num_rate_levels: int = 6):
        super().__init__()
        for name, value in (("N", N), ("M", M), ("token_channels", token_channels),
                            ("num_token_blocks", num_token_blocks), ("hyper_channels", hyper_channels),
                            ("num_rate_levels", num_rate_levels)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"LatentConditionalCodec: {name} must be an int in 1..4096, got {value!r}")
        self.config: Dict[str, Any] = {"N": N, "M": M, "token_channels": token_channels,
                                       "num_token_blocks": num_token_blocks, "hyper_channels": hyper_channels,
                                       "num_rate_levels": num_rate_levels}
        self.N, self.M, self.num_rate_levels = hyper_channels, M, num_rate_levels
        self.g_a = AnchorAnalysis(N, M, 0, token_channels, num_token_blocks)
        self.g_s = AnchorSynthesis(N, M)
        self.gain = nn.Parameter(torch.ones(num_rate_levels, M))
        self.inverse_gain = nn.Parameter(torch.ones(num_rate_levels, M))
        Nh = hyper_channels
        self.h_a = nn.Sequential(nn.Conv2d(2 * M, Nh, 3, stride=2, padding=1), _act(),
                                 nn.Conv2d(Nh, Nh, 3, stride=2, padding=1))
        self.h_s = nn.Sequential(subpel_conv3x3(Nh, Nh, 2), _act(), subpel_conv3x3(Nh, M, 2), _act(),
                                 conv3x3(M, 2 * M))
        self.entropy_bottleneck = EntropyBottleneck(Nh)
        self.gaussian_conditional = GaussianConditional(None)
        # Two 3x3 layers: each latent position sees ±2 positions (±32 px) of the reference's
        # latent, the motion that the coded mesh warp has not already removed.
        self.prior_net = nn.Sequential(conv3x3(M, M), _act(), conv3x3(M, M), _act())
        self.spatial_context = nn.Conv2d(M, 2 * M, 5, padding=2)
        self.params_anchor = self._parameter_net(3 * M)
        self.params_nonanchor = self._parameter_net(5 * M)
        # Untrained, μ = p and σ = INITIAL_SCALE: the reference's latent as the prediction.
        for net in (self.params_anchor, self.params_nonanchor):
            last = net[-1]
            with torch.no_grad():
                last.weight.mul_(0.01)
                last.bias.zero_()
                last.bias[:M].fill_(INITIAL_SCALE)

    def _parameter_net(self, in_ch: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_ch, 2 * self.M, 1), _act(), nn.Conv2d(2 * self.M, 2 * self.M, 1), _act(),
                             nn.Conv2d(2 * self.M, 2 * self.M, 1))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LatentConditionalCodec":
        return cls(**dict(config))

    @classmethod
    def from_anchor_codec(cls, anchor: AnchorCodec, hyper_channels: int = 64) -> "LatentConditionalCodec":
        """A codec whose transforms and gains are copies of ``anchor``'s (which must have
        rate levels and no VAE latent); its entropy model is untrained."""
        config = anchor.config if hasattr(anchor, "config") else AnchorCodec.infer_config(anchor.state_dict())
        if config.get("vae_channels", 0) or not config.get("num_rate_levels", 0):
            raise ValueError("a latent-conditional codec needs a keyframe codec with rate levels and no VAE latent")
        model = cls(config["N"], config["M"], config["token_channels"], config["num_token_blocks"],
                    hyper_channels, config["num_rate_levels"])
        model.g_a.load_state_dict(anchor.g_a.state_dict())
        model.g_s.load_state_dict(anchor.g_s.state_dict())
        with torch.no_grad():
            model.gain.copy_(anchor.gain)
            model.inverse_gain.copy_(anchor.inverse_gain)
        return model.float()

    def trainable_parameters(self):
        """(name, parameter) of everything but the keyframe codec's frozen parts."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(FROZEN_PREFIXES)]

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Strict loading that first resizes the CDF buffers to the file's shapes."""
        resize_cdf_buffers(self, state_dict)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def gains(self, rate_level: RateLevel) -> Tuple[Tensor, Tensor]:
        """(gain, inverse_gain) [1, M, 1, 1]; fractional levels interpolate in the log domain."""
        if isinstance(rate_level, bool) or not isinstance(rate_level, (int, float)):
            raise ValueError(f"rate_level must be an int or float, got {rate_level!r}")
        return rate_gains(self.gain, self.inverse_gain, rate_level)

    # ---------------------------------------------------------------- hooks of the latent codec

    def _reference_context(self, ref: Tensor, rate_level: RateLevel) -> Tuple[None, Tensor]:
        gain, _ = self.gains(rate_level)
        return None, round_prior(self.g_a(ref) * gain)

    def _analyze(self, x: Tensor, ref: Tensor, context: None) -> Tensor:
        return self.g_a(x)

    def _hyper_input(self, y: Tensor, prior: Tensor) -> Tensor:
        return torch.cat([y, prior], 1)

    def _synthesize(self, y_hat: Tensor, ref: Tensor, context: None) -> Tensor:
        return self.g_s(y_hat)[0]

    def _entropy_parameters(self, hyper: Tensor, prior: Tensor, quantize) -> Tuple[Tensor, Tensor, Tensor]:
        """The two-part checkerboard shared by forward/compress/decompress; ``quantize(anchor,
        scales, means)`` returns that part's ŷ on the full grid (zeros elsewhere)."""
        base = torch.cat([hyper, self.prior_net(prior)], 1)
        scales_a, delta_a = self.params_anchor(base).chunk(2, 1)
        means_a = prior + delta_a
        anchors = quantize(True, scales_a, means_a)
        ctx = self.spatial_context(anchors - keep_part(prior, True))
        scales_n, delta_n = self.params_nonanchor(torch.cat([base, ctx], 1)).chunk(2, 1)
        means_n = prior + delta_n
        y_hat = anchors + quantize(False, scales_n, means_n)
        is_anchor = checkerboard_mask(y_hat.shape[-2], y_hat.shape[-1], True, y_hat.device)
        return y_hat, torch.where(is_anchor, scales_a, scales_n), torch.where(is_anchor, means_a, means_n)

    # ---------------------------------------------------------------- training

    def forward(self, x: Tensor, ref: Tensor, rate_level: RateLevel = 0, with_x_hat: bool = False) -> Dict[str, Any]:
        """Training pass: ``{"likelihoods", "y_hat"[, "x_hat"]}``. The frozen transforms run
        without gradients; the likelihoods follow the entropy models' training flag (uniform
        noise in training mode, Ballé et al. 2017), ŷ is y rounded around the means."""
        self._check_frames(x, ref)
        gain, inverse = self.gains(rate_level)
        with torch.no_grad():
            y = self.g_a(x) * gain
            prior = round_prior(self.g_a(ref) * gain)
        z = self.h_a(self._hyper_input(y, prior))
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck._get_medians()
        hyper = self.h_s(_ste_round(z - medians) + medians)

        def quantize(anchor: bool, scales: Tensor, means: Tensor) -> Tensor:
            return keep_part(_ste_round(y - means) + means, anchor)

        y_hat, scales, means = self._entropy_parameters(hyper, prior, quantize)
        _, y_likelihoods = self.gaussian_conditional(y, scales, means)
        out = {"likelihoods": {"y": y_likelihoods, "z": z_likelihoods}, "y_hat": y_hat}
        if with_x_hat:
            out["x_hat"] = self.g_s(y_hat * inverse)[0]
        return out
