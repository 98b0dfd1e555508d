"""The published NeFIC one-step decode, operation for operation (NeFIC packages' default).

ulbc's own next-frame path (models/next_frame.py) tiles the VAE and the transformer its
own way, runs the VAE as a 2-D graph and computes in bfloat16 autocast with float32
arithmetic around the networks (docs/nefic_conformance.md says why). A package imported
from the published checkpoints (``ulbc models import-nefic``) decodes instead exactly as
the published ``NeFICCodec.decompress()`` does, proven against its recorded
intermediates (tests/test_nefic_conformance.py, vectors in tests/data/nefic_e2e/)::

    anchor frame (clamped) ─► ×2−1 in float32 ─► cast to the VAE dtype
      ─► diffusers VAE.encode (tiling enabled, as the published loader sets it:
         diffusers' own tiles above sample_height/2 × sample_width/2) ─► mode() × s ─► A
    Z = bypass latent cast to the transformer dtype
    [A, A, Z, Z] (cast to the prompt dtype) ─► transformer, whole image in ONE pass
      (t = 500 as int64, RoPE of the padded grid for both temporal tokens) ─► v
    x0 = scheduler.get_velocity(v, x_in, t)   (ᾱ cast to the sample dtype before √)
    last frame × (1/s), cast ─► diffusers VAE.decode (tiled likewise; may return more rows
      than 8h, e.g. 131 for h = 16) ─► ×0.5+0.5, clamp ─► top-left crop ─► float32

Everything runs in the dtype the weights were loaded in (ulbcodec/placement.py:
float32 on the CPU, bfloat16 on an accelerator, the published dtype), with no autocast.
The transformer's whole-image pass needs memory growing with the image; when its
estimate exceeds the budget (free device memory, or 3/4 of the host's RAM on the CPU)
the transformer runs in ulbc's blended tiles instead, and one line on stderr says so.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from typing import Dict, Optional

import torch
from torch import Tensor

ONE_STEP_TIMESTEP = 500
# Working set of one transformer pass, in values of its width per token: the block's
# activations and MLP (4x) with attention through SDPA's fused kernels (no scores kept).
VALUES_PER_TOKEN_WIDTH = 12


def is_published(package) -> bool:
    """Whether ``package`` decodes as the published NeFIC (an imported NeFIC package)."""
    return "nefic" in getattr(package, "extra", {})


def enable_published_vae(vae) -> None:
    """What the published ``VideoVAE.from_pretrained`` does to the VAE."""
    vae.enable_slicing()
    vae.enable_tiling()


def _vae_call(vae, fn, x: Tensor, what: str):
    """``fn(x)`` with diffusers' tiling as enabled; where its tile arithmetic leaves an edge
    tile smaller than a kernel (tiny tile sizes only: never with CogVideoX's 240x360 px
    tiles on 64-px-padded images), the whole image untiled, saying so in one line."""
    try:
        return fn(x)
    except RuntimeError as exc:
        if not vae.use_tiling or "Kernel size can't be greater" not in str(exc):
            raise
    print(f"ulbc: diffusers' VAE tiling cannot {what} {x.shape[-1]}x{x.shape[-2]} with this VAE's tile size: "
          "running it untiled", file=sys.stderr)
    vae.disable_tiling()
    try:
        return fn(x)
    finally:
        vae.enable_tiling()


def _put(record: Optional[Dict[str, Tensor]], name: str, value: Tensor) -> None:
    if record is not None:
        record[name] = value.detach().float().cpu().clone()


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def encode_latent(pipe, image: Tensor, record: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """A = VAE.encode(image·2−1).mode() × s, [B,16,h,w] in the VAE dtype (published casts)."""
    vae = pipe.vae
    x = (image.float() * 2 - 1).unsqueeze(2).to(_dtype(vae))
    _put(record, "vae_encode_input", x)
    with pipe.placement.use(vae):
        dist = _vae_call(vae, lambda t: vae.encode(t).latent_dist, x, "encode")
    _put(record, "vae_latent_mean", dist.mean)
    _put(record, "vae_latent_logvar", dist.logvar)
    return dist.mode()[:, :, 0] * vae.config.scaling_factor


def decode_latent(pipe, latent: Tensor, height: int, width: int, record: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """[B,16,h,w] scaled latent → [B,3,height,width] in [0,1] (float32)."""
    vae = pipe.vae
    z = (latent.unsqueeze(2) * (1 / vae.config.scaling_factor)).to(_dtype(vae))
    _put(record, "vae_decode_input", z)
    with pipe.placement.use(vae):
        sample = _vae_call(vae, lambda t: vae.decode(t).sample, z, "decode a latent of")
    _put(record, "vae_decode_sample", sample)
    image = (sample * 0.5 + 0.5).clamp(0, 1)[:, :, 0]
    return image[:, :, :height, :width].float()


def velocity_and_x0(pipe, anchor_latent: Tensor, bypass_latent: Tensor,
                    record: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """x0 of all four frames [B,4,16,h,w] from A and Z ([B,16,h,w] each)."""
    from ulbcodec.models.rope import rotary_embedding

    dtype = _dtype(pipe.transformer)  # the published prompt embeddings are loaded in it
    prompt = pipe.prompt_embeds.to(anchor_latent.device, dtype)
    a = anchor_latent.unsqueeze(1)
    z = bypass_latent.unsqueeze(1).to(_dtype(pipe.vae))
    frames = torch.cat([a, a, z, z], dim=1).to(dtype)
    b, _, _, h, w = frames.shape
    rope = rotary_embedding(h, w, pipe.head_dim, pipe.patch_size, device=frames.device)
    t = torch.full((b,), ONE_STEP_TIMESTEP, dtype=torch.long, device=frames.device)
    _put(record, "transformer_hidden_states", frames)
    _put(record, "rope_cos", rope[0])
    _put(record, "rope_sin", rope[1])
    with pipe.placement.use(pipe.transformer):
        v = pipe.transformer(hidden_states=frames, encoder_hidden_states=prompt.expand(b, -1, -1), timestep=t,
                             image_rotary_emb=rope, return_dict=False)[0]
    _put(record, "v", v)
    x0 = pipe.scheduler.get_velocity(v, frames, t)
    _put(record, "x0_all_frames", x0)
    return x0


def transformer_bytes(pipe, h: int, w: int) -> int:
    """Estimated working set of one whole-image transformer pass on an h×w latent."""
    cfg = pipe.transformer.config
    tokens = 2 * (h // cfg.patch_size) * (w // cfg.patch_size) + cfg.max_text_seq_length
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return VALUES_PER_TOKEN_WIDTH * tokens * width * torch.finfo(_dtype(pipe.transformer)).bits // 8


def memory_budget(pipe) -> Optional[int]:
    """Bytes the whole-image pass may use: ``pipe.transformer_budget`` if set, else the
    device's free memory (accelerators) or 3/4 of the physical memory (CPU)."""
    if getattr(pipe, "transformer_budget", None) is not None:
        return pipe.transformer_budget
    from ulbcodec.placement import free_memory
    from ulbcodec.resources import default_limit

    device = pipe.placement.device
    return free_memory(device) if device.type != "cpu" else default_limit()


def decode_image(pipe, anchor_frame: Tensor, bypass_latent: Tensor, record: Optional[Dict[str, Tensor]] = None) -> Tensor:
    """Anchor frame [B,3,H,W] (clamped, padded) + bypass [B,1,16,h,w] → image [B,3,H,W]."""
    from ulbcodec.tiling import blended_tiles, tile_batch

    height, width = anchor_frame.shape[-2:]
    _put(record, "anchor_frame", anchor_frame)
    anchor_latent = encode_latent(pipe, anchor_frame, record)
    _put(record, "anchor_latent", anchor_latent.unsqueeze(1))
    bypass = bypass_latent[:, 0]
    h, w = bypass.shape[-2:]
    need, budget = transformer_bytes(pipe, h, w), memory_budget(pipe)
    if budget is None or need <= budget:
        target = velocity_and_x0(pipe, anchor_latent, bypass, record)[:, 3]
    else:
        print(f"ulbc: {width}x{height}: one transformer pass needs ~{need / 2**20:.0f} MiB, over the "
              f"{budget / 2**20:.0f} MiB budget: decoding in ulbc's transformer tiles (not the published "
              "whole-image pass)", file=sys.stderr)
        target = blended_tiles(lambda a, z: velocity_and_x0(pipe, a, z)[:, 3], anchor_latent, bypass,
                               tile=pipe.latent_tile, overlap=pipe.latent_overlap, batch=tile_batch(pipe.latent_tile),
                               scale=Fraction(1))
        target = target.to(anchor_latent.dtype)
    _put(record, "target_latent", target.unsqueeze(1))
    return decode_latent(pipe, target, height, width, record)
