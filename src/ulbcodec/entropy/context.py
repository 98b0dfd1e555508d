"""Context models of the anchor codec's entropy model (NeFIC): what predicts the mean and
scale of each latent part from what is already decoded.

::

    slice s, anchor part:      [inter(ŷ<s), channel(ŷ<s), hyper] ─► ParameterNet ─► μ, σ
    slice s, non-anchor part:  [local(anchors of s), intra(ŷ_{s-1}, anchors of s),
                                inter, channel, hyper]           ─► ParameterNet ─► μ, σ
    after each part:           ŷ += 0.5·tanh(ResidualPredictor(hyper μ, ŷ<s, ŷ_s))

Module names and shapes follow the released state_dict (``fushion`` included).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.layers import conv3x3

from ulbcodec.entropy.checkerboard import checkerboard_mask, keep_part, squeeze_part, unsqueeze_part
from ulbcodec.entropy.coding import without_grad

# Fixed widths of the published sub-networks (independent of N and M there too).
_PARAM_NET_WIDTHS = (320, 256, 128)  # entropy-parameter 1x1 convs
_CHANNEL_CTX_WIDTHS = (192, 128)  # channel-context 3x3 convs
_LOCAL_HEADS = 2  # heads of the windowed local context
_INTRA_HEADS = 2  # heads of the linear intra-slice context

# The local context attends in bands of about this many latent pixels: the attention maps
# (w⁴·heads values a pixel) of a whole large latent do not fit in cache, a band's do.
# Each pixel's arithmetic is the same in any band, so the band size does not touch the
# bitstream (tests/test_anchor_codec.py checks it).
BAND_PIXELS = 1024


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


def local_attention_mask(h: int, w: int, window: int, device: torch.device) -> Tensor:
    """Additive mask [h·w, w², w²]: 0 where query AND key window cells are decoded anchors.

    Cells outside the latent or at non-anchor positions get -100 (the published value, a
    soft mask rather than -inf: a window with no anchors still softmaxes to uniform).
    """
    anchors = checkerboard_mask(h, w, anchor=True, device=device).float()[None, None]
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
                fused = torch.cat(list(pool.map(lambda band: without_grad(self._attend_band, *band), bands)),
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
        queries = squeeze_part(self.queries(keep_part(previous_slice, anchor=False)), anchor=False)
        keys = squeeze_part(self.keys(keep_part(previous_slice, anchor=True)), anchor=True)
        values = squeeze_part(self.values(current_anchors), anchor=True)

        keys = keys.reshape(b, self.num_heads, hd, half).softmax(dim=-1)
        queries = queries.reshape(b, self.num_heads, hd, half).softmax(dim=-2)
        values = values.reshape(b, self.num_heads, hd, half)

        # Back on the full grid (zeros in between) before the products: the published
        # code sums over all H·W positions, and we keep its summation length.
        def full(t: Tensor, anchor: bool) -> Tensor:
            t = unsqueeze_part(t.reshape(b * self.num_heads, hd, h, w // 2), anchor=anchor)
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


def inter_context_heads(dim: int) -> int:
    """One head per 32 channels (published rule), at least one, dividing ``dim``."""
    heads = max(1, dim // 32)
    while dim % heads:
        heads -= 1
    return heads
