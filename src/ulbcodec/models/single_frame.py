"""One-frame fast path for the causal 3-D convolutions of CogVideoX's VAE.

The image codec runs ``AutoencoderKLCogVideoX`` on one frame at a time. Its causal
convolutions pad time by repeating the first frame ``k − 1`` times (k = 3), so a k×3×3
kernel applied to a one-frame clip sees the same frame at every temporal tap::

    [x, x, x] ─► Conv3d(W[k,3,3]) ─► y        ≡        x ─► Conv2d(Σ_t W[t]) ─► y

The sum over the temporal taps gives the same output with a third of the
multiply-adds (and CPU kernels for 2-D convolutions are the better tuned ones). Only the
order of the additions changes, so outputs agree to float rounding, not bit for bit;
nothing that is entropy coded depends on the VAE, so this is safe for the bitstream.
Clips of more than one frame, a frame with a cache from an earlier chunk, and any
configuration other than CogVideoX's (temporal stride and dilation 1, "constant"
padding) take the module's own forward, unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _causal_conv_class():
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    return CogVideoXCausalConv3d


def _one_frame_forward(self, inputs: Tensor, conv_cache=None):
    conv = self.conv
    if (inputs.shape[2] != 1 or conv_cache is not None or self.pad_mode == "replicate"
            or conv.stride[0] != 1 or conv.dilation[0] != 1 or conv.groups != 1):
        return super(type(self), self).forward(inputs, conv_cache)  # the diffusers forward
    frame = inputs[:, :, 0]
    y = F.conv2d(frame, conv.weight.sum(dim=2), conv.bias, stride=conv.stride[1:], padding=conv.padding[1:],
                 dilation=conv.dilation[1:])
    # The cache the module would hand to the next chunk: its last k−1 padded frames (the
    # whole one-frame input when k = 1), all this frame (a view; the original copies them).
    cache = inputs.expand(-1, -1, max(self.time_kernel_size - 1, 1), -1, -1)
    return y.unsqueeze(2), cache


_FAST_CLASSES: dict = {}


def use_one_frame_convolutions(vae: nn.Module) -> nn.Module:
    """Give every causal convolution of ``vae`` the one-frame fast path, in place
    (idempotent; the weights, state dict and config are untouched). Returns ``vae``."""
    base = _causal_conv_class()
    for module in vae.modules():
        cls = type(module)
        if not isinstance(module, base) or cls in _FAST_CLASSES.values():
            continue
        if cls not in _FAST_CLASSES:
            _FAST_CLASSES[cls] = type(f"OneFrame{cls.__name__}", (cls,), {"forward": _one_frame_forward})
        module.__class__ = _FAST_CLASSES[cls]
    return vae


# --------------------------------------------------------------------------------------
# One-frame inference graph of the whole VAE
#
# The patched convolutions above still run inside diffusers' 5-D graph, whose tensors on
# the CPU are channels-first and, under autocast, change dtype around every GroupNorm.
# For inference on one frame the whole VAE is a 2-D network, and run as one it is faster
# (docs/measurements.md, "One-frame VAE graph"):
#
#   * channels-last activations, which oneDNN's convolutions take without reordering
#     (2x the multiply-adds per second of channels-first at 16-32 channels);
#   * one dtype throughout (the pipeline's), no casts between layers;
#   * the decoder's spatial norms modulate with 1x1 convolutions of the latent ``zq``.
#     diffusers upsamples ``zq`` to every layer's size and convolves there; nearest
#     upsampling commutes with a 1x1 convolution, so the convolutions run at latent size
#     and the modulation reads them widened along W only (1/sh of the layer's size),
#     broadcast over the rows they share, never upsampled to the full size in memory.
#
# It reads the VAE's weights at every call (no cache to go stale while training) and has
# no gradients of its own to offer: callers use it under ``torch.no_grad()`` only.


def _folded_conv(module: nn.Module, x: Tensor) -> Tensor:
    """A causal 3-D convolution, a 1-frame ``Conv3d`` or a ``Conv2d`` on a 2-D frame."""
    conv = module.conv if isinstance(module, _causal_conv_class()) else module
    w = conv.weight.sum(dim=2) if conv.weight.dim() == 5 else conv.weight
    w = w.to(x.dtype).contiguous(memory_format=torch.channels_last)
    b = None if conv.bias is None else conv.bias.to(x.dtype)
    return F.conv2d(x, w, b, stride=conv.stride[-2:], padding=conv.padding[-2:], dilation=conv.dilation[-2:])


def _group_norm(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def _spatial_norm(norm: nn.Module, f: Tensor, zq: Tensor) -> Tensor:
    """``GroupNorm(f) · up(conv_y(zq)) + up(conv_b(zq))`` with ``up`` nearest upsampling
    to f's size, as ``CogVideoXSpatialNorm3D`` computes ``conv(up(zq))`` for one frame."""
    y, b = _folded_conv(norm.conv_y, zq), _folded_conv(norm.conv_b, zq)
    h = _group_norm(norm.norm_layer, f)
    n, c, height, width = h.shape
    sh, sw = height // zq.shape[2], width // zq.shape[3]
    if (sh * zq.shape[2], sw * zq.shape[3]) != (height, width):
        raise ValueError(f"feature size {height}x{width} is not a multiple of the latent size")
    # Channels-last, h is [n, H, W, c] in memory: seen as [n, H/sh, sh, W·c], the sh rows
    # of each latent row share one row of the modulation, which is widened along W only
    # (1/sh of h's size). Broadcast over both sh and sw instead, the innermost loop would
    # run over the c channels alone: at 16 channels that is 2x slower. Same values.
    def rows(t: Tensor) -> Tensor:  # [n,c,hz,wz] -> [n, hz, 1, wz·sw·c], each latent pixel sw times
        t = t.permute(0, 2, 3, 1).unsqueeze(3).expand(n, t.shape[2], t.shape[3], sw, c)
        return t.reshape(n, -1, 1, width * c)

    out = torch.addcmul(rows(b), h.permute(0, 2, 3, 1).reshape(n, height // sh, sh, width * c), rows(y))
    return out.view(n, height, width, c).permute(0, 3, 1, 2)


def _resnet(block: nn.Module, x: Tensor, zq: Optional[Tensor]) -> Tensor:
    """``CogVideoXResnetBlock3D`` without ``temb`` (the VAE passes none)."""
    def norm(layer, t):
        return _group_norm(layer, t) if zq is None else _spatial_norm(layer, t, zq)

    # In place where the tensor is a fresh intermediate: one pass less over memory each.
    h = _folded_conv(block.conv1, F.silu(norm(block.norm1, x), inplace=True))
    h = _folded_conv(block.conv2, F.silu(norm(block.norm2, h), inplace=True))
    if block.in_channels != block.out_channels:
        x = _folded_conv(block.conv_shortcut, x)
    return h.add_(x)


def one_frame_graph_supported(vae: nn.Module) -> bool:
    """Whether :func:`encode_one_frame` / :func:`decode_one_frame` reproduce ``vae``: the
    CogVideoX configuration (SiLU, first-frame causal padding, temporal stride 1, plain
    1-frame ``Conv3d`` elsewhere, 2-D up/downsamplers, no quant convolutions: diffusers'
    own fail for configurations other than the published one); anything else keeps
    diffusers' graph."""
    from diffusers.models.downsampling import CogVideoXDownsample3D
    from diffusers.models.upsampling import CogVideoXUpsample3D

    if vae.quant_conv is not None or vae.post_quant_conv is not None:
        return False
    causal = _causal_conv_class()
    inner = {id(m.conv) for m in vae.modules() if isinstance(m, causal)}
    for m in vae.modules():
        if isinstance(m, causal):
            c = m.conv
            if m.pad_mode == "replicate" or c.stride[0] != 1 or c.dilation[0] != 1 or c.groups != 1:
                return False
        elif isinstance(m, nn.Conv3d) and id(m) not in inner:
            if m.kernel_size[0] != 1 or m.padding[0] != 0 or m.groups != 1:
                return False
        elif isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return False
    blocks = [vae.encoder.mid_block, vae.decoder.mid_block, *vae.encoder.down_blocks, *vae.decoder.up_blocks]
    for block in blocks:
        for r in block.resnets:
            if not isinstance(r.nonlinearity, nn.SiLU) or getattr(r, "temb_proj", None) is not None:
                return False
        for s in getattr(block, "downsamplers", None) or []:
            if not isinstance(s, CogVideoXDownsample3D):
                return False
        for s in getattr(block, "upsamplers", None) or []:
            if not isinstance(s, CogVideoXUpsample3D):
                return False
    return all(isinstance(a, nn.SiLU) for a in (vae.encoder.conv_act, vae.decoder.conv_act))


def encode_one_frame(vae: nn.Module, image: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``vae.encode(image[:, :, None]).latent_dist.mode()[:, :, 0]`` for [B,3,H,W] in [-1, 1]."""
    enc = vae.encoder
    h = _folded_conv(enc.conv_in, image.to(dtype).contiguous(memory_format=torch.channels_last))
    for block in enc.down_blocks:
        for r in block.resnets:
            h = _resnet(r, h, None)
        for down in block.downsamplers or []:
            h = _folded_conv(down.conv, F.pad(h, (0, 1, 0, 1)))
    for r in enc.mid_block.resnets:
        h = _resnet(r, h, None)
    h = _folded_conv(enc.conv_out, F.silu(_group_norm(enc.norm_out, h), inplace=True))
    return h[:, : h.shape[1] // 2]  # the mode of the diagonal Gaussian is its mean


def decode_one_frame(vae: nn.Module, latent: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``vae.decode(latent[:, :, None]).sample[:, :, 0]`` for an unscaled latent [B,C,h,w]."""
    dec = vae.decoder
    zq = latent.to(dtype).contiguous(memory_format=torch.channels_last)
    h = _folded_conv(dec.conv_in, zq)
    for r in dec.mid_block.resnets:
        h = _resnet(r, h, zq)
    for block in dec.up_blocks:
        for r in block.resnets:
            h = _resnet(r, h, zq)
        for up in block.upsamplers or []:
            h = _folded_conv(up.conv, F.interpolate(h, scale_factor=2.0))
    return _folded_conv(dec.conv_out, F.silu(_spatial_norm(dec.norm_out, h, zq), inplace=True))
