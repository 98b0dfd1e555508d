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
