"""A pretrained image-to-video diffusion model as the video codec's frame predictor.

The shipped predictor (models/frame_predictor.py) is a small UNet trained here on CPU.
Users with a GPU can put a published image-to-video model in its place: CogVideoX
image-to-video (CogVideoX-5b-I2V, CogVideoX1.5-5B-I2V), loaded from a local diffusers
directory. Why this family: it shares the VAE and transformer classes the image codec's
generative decoder already uses (NeFIC builds on CogVideoX), so one set of code paths,
tiles and dtypes serves both, and its conditioning — the first latent frame given, the
rest generated — is exactly "continue the video from the last decoded frame"::

    last decoded frame ─► VAE.encode (mode × scaling) ─► c            [C,h,w]
    image latents  [c, 0, 0, ..., 0]  (F latent frames)  ─────────┐  channels concatenated
    seeded noise (stream seed, round) ─► x_T  [F,C,h,w]  ─────────┤
                                                                  ▼
      for t in scheduler.timesteps (``steps``, stored in the file):
          v = transformer([x_t ‖ image latents], t, prompt embeddings, RoPE of F frames)
          (classifier-free guidance when the package holds negative embeddings)
          x_{t-1} = scheduler.step(v, t, x_t)
                                                                  ▼
      x_0 ─► / scaling ─► VAE.decode (causal: F latent frames → 1 + 4(F−1) frames)
          ─► drop frame 0 (the conditioning frame again) ─► P = 4(F−1) predicted frames

K = 1 (the model conditions on one image) and P is a multiple of the VAE's temporal
compression (4). The VAE packs 4 frames into one latent frame, so a round's frames are
decoded together: :meth:`predict_latents` returns the P frames already decoded and
:meth:`decode_frame` passes each through (the encoder cannot stop a round's VAE work at
its first rejected frame, as it can with the per-frame UNet predictor).

Seed discipline and determinism are those of the UNet predictor: every round's noise
comes from :func:`~ulbcodec.models.frame_predictor.round_seed` (stream seed, round index)
alone, and everything runs on the fixed thread count of ``fixed_threads``. On a GPU the
transformer and VAE run in bfloat16, as published; encoder and decoder then agree on the
same GPU model and software stack, not across them (docs/bitstream.md).

A package with this predictor is written by
:func:`ulbcodec.importers.i2v.import_i2v_predictor` (``ulbc models import-video-predictor``): the image model's components, plus the
pretrained transformer, VAE and scheduler referenced by path and fingerprint (not
copied), the prompt embeddings as a tensor file, and ``extra.video.predictor =
"cogvideox-i2v"``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ulbcodec.models.frame_predictor import fixed_threads, round_seed, sampling_start
from ulbcodec.models.next_frame import _autocast

KIND = "cogvideox-i2v"
TEMPORAL_COMPRESSION = 4  # frames per latent frame of the CogVideoX VAE (after the first)
OFS_VALUE = 2.0  # CogVideoX 1.5's "ofs" conditioning, the value its pipeline passes


def _crop_region(grid_h: int, grid_w: int, base_w: int, base_h: int):
    """The region of the training grid (base_h x base_w tokens) that a grid_h x grid_w
    grid covers once resized to fit it, centred: CogVideoX 1.0's RoPE coordinates."""
    if grid_h / grid_w > base_h / base_w:
        height, width = base_h, int(round(base_h / grid_h * grid_w))
    else:
        height, width = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - height) / 2.0)), int(round((base_w - width) / 2.0))
    return (top, left), (top + height, left + width)


class ImageToVideoPredictor:
    """Composes a CogVideoX image-to-video transformer, its VAE, a scheduler and fixed
    prompt embeddings into a frame predictor with the interface of
    :class:`~ulbcodec.models.frame_predictor.FramePredictionPipeline`."""

    cond_frames = 1

    def __init__(self, vae, transformer, scheduler, prompt_embeds: Tensor, pred_frames: int,
                 negative_embeds: Optional[Tensor] = None, guidance_scale: float = 1.0,
                 dtype: Optional[torch.dtype] = torch.bfloat16, placement=None):
        from ulbcodec.placement import Placement

        cfg = transformer.config
        c = vae.config.latent_channels
        if cfg.in_channels != 2 * c or cfg.out_channels != c:
            raise ValueError(f"an image-to-video transformer takes {2 * c} input channels (noise and image latents) "
                             f"and gives {c}; this one has {cfg.in_channels} -> {cfg.out_channels}")
        if pred_frames < TEMPORAL_COMPRESSION or pred_frames % TEMPORAL_COMPRESSION:
            raise ValueError(f"predicted frames must be a multiple of {TEMPORAL_COMPRESSION}, got {pred_frames}")
        self.latent_frames = 1 + pred_frames // TEMPORAL_COMPRESSION
        if cfg.patch_size_t is not None and self.latent_frames % cfg.patch_size_t:
            raise ValueError(f"this transformer packs {cfg.patch_size_t} latent frames per token: predicted frames "
                             f"must make 1 + P/4 a multiple of it (P = 4, 12, 20, ...), got {pred_frames}")
        if guidance_scale > 1 and negative_embeds is None:
            raise ValueError("classifier-free guidance needs negative prompt embeddings")
        self.vae, self.transformer, self.scheduler = vae, transformer, scheduler
        self.prompt_embeds, self.negative_embeds, self.guidance_scale = prompt_embeds, negative_embeds, guidance_scale
        self.pred_frames, self.channels, self.dtype = pred_frames, c, dtype
        self.scaling_factor = vae.config.scaling_factor
        self.invert_scale = bool(getattr(vae.config, "invert_scale_latents", False))
        self.placement = placement or Placement(next(transformer.parameters()).device)

    @property
    def multiple(self) -> int:
        """Frames are padded to this many pixels: 8 (VAE) x the transformer's patch size."""
        return 8 * self.transformer.config.patch_size

    # ---------------------------------------------------------------- pieces

    def _scale(self, latent: Tensor) -> Tensor:
        return latent / self.scaling_factor if self.invert_scale else latent * self.scaling_factor

    def _unscale(self, latent: Tensor) -> Tensor:
        return latent * self.scaling_factor if self.invert_scale else latent / self.scaling_factor

    def rotary_embedding(self, h: int, w: int):
        """RoPE of F latent frames of h x w latents, as the CogVideoX pipelines compute it."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        cfg = self.transformer.config
        if not cfg.use_rotary_positional_embeddings:
            return None
        p = cfg.patch_size
        grid, base = (h // p, w // p), (cfg.sample_height // p, cfg.sample_width // p)
        if cfg.patch_size_t is None:  # CogVideoX 1.0
            return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim,
                                           crops_coords=_crop_region(*grid, base[1], base[0]), grid_size=grid,
                                           temporal_size=self.latent_frames)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=self.latent_frames // cfg.patch_size_t, grid_type="slice",
                                       max_size=base)

    def velocity(self, x: Tensor, image_latents: Tensor, t, rope) -> Tensor:
        """x, image latents [1,F,C,h,w] → the model output [1,F,C,h,w] (guided when configured)."""
        inputs = torch.cat([x, image_latents], dim=2)
        prompt = self.prompt_embeds
        if self.guidance_scale > 1:
            inputs, prompt = torch.cat([inputs, inputs]), torch.cat([self.negative_embeds, self.prompt_embeds])
        ofs = None if self.transformer.config.ofs_embed_dim is None else inputs.new_full((1,), OFS_VALUE)
        timestep = torch.as_tensor(t, device=inputs.device).reshape(-1).expand(inputs.shape[0])
        with self.placement.use(self.transformer), _autocast(self.dtype, inputs.device):
            out = self.transformer(hidden_states=inputs, encoder_hidden_states=prompt, timestep=timestep, ofs=ofs,
                                   image_rotary_emb=rope, return_dict=False)[0].float()
        if self.guidance_scale > 1:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out

    def sample(self, image_latents: Tensor, noise: Tensor, steps: int, init: Optional[Tensor] = None,
               start_timestep: Optional[int] = None) -> Tensor:
        """The scheduler's sampler from ``noise`` (or, SDEdit-style, from ``init`` noised
        to the first timestep <= ``start_timestep``)."""
        timesteps, x = sampling_start(self.scheduler, steps, noise, init, start_timestep)
        rope = self.rotary_embedding(*x.shape[-2:])
        if rope is not None:
            rope = tuple(r.to(x.device) for r in rope)
        with self.placement.use(self.transformer):
            return self._denoise(x, image_latents, timesteps, rope)

    def _denoise(self, x: Tensor, image_latents: Tensor, timesteps, rope) -> Tensor:
        from diffusers import CogVideoXDPMScheduler

        previous_x0 = None
        for i, t in enumerate(timesteps):
            v = self.velocity(x, image_latents, int(t), rope)
            if isinstance(self.scheduler, CogVideoXDPMScheduler):  # a second-order step: it keeps its last x0
                x, previous_x0 = self.scheduler.step(v, previous_x0, t, timesteps[i - 1] if i else None, x,
                                                     return_dict=False)
            else:
                x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x

    # ---------------------------------------------------------------- the predictor interface

    @torch.no_grad()
    def encode_frame(self, frame: Tensor) -> Tensor:
        """One decoded frame [3,H,W] in [0,1] → its scaled VAE latent [C,h,w] (the mode)."""
        with fixed_threads(), self.placement.use(self.vae), _autocast(self.dtype, frame.device):
            dist = self.vae.encode((frame[None] * 2 - 1).unsqueeze(2)).latent_dist
        return self._scale(dist.mode()[0, :, 0].float())

    @torch.no_grad()
    def predict_latents(self, cond_latents: Tensor, stream_seed: int, round_index: int, steps: int,
                        guide: Optional[Tensor] = None, guide_timestep: int = 600) -> Tensor:
        """The latent of the last decoded frame ([K=1,C,h,w]) → the next P frames, decoded,
        [P,3,H,W] in [0,1]. ``guide`` (anchored rounds): the latent of a small anchor of the
        round's first frame, every generated latent frame starting from it."""
        with fixed_threads():
            c, h, w = cond_latents.shape[1:]
            g = torch.Generator().manual_seed(round_seed(stream_seed, round_index))
            # drawn on the CPU: the same noise on every device
            noise = torch.randn((1, self.latent_frames, c, h, w), generator=g).to(cond_latents.device)
            padding = noise.new_zeros(1, self.latent_frames - 1, c, h, w)  # the frames to generate
            image_latents = torch.cat([cond_latents[-1][None, None], padding], dim=1)
            init = None if guide is None else guide.expand(1, self.latent_frames, c, h, w)
            x = self.sample(image_latents, noise, steps, init, guide_timestep)
            with self.placement.use(self.vae), _autocast(self.dtype, x.device):
                video = self.vae.decode(self._unscale(x).permute(0, 2, 1, 3, 4)).sample  # [1,3,1+4(F-1),H,W]
            return (video[0, :, 1:].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 0, 2, 3)

    def decode_frame(self, frame: Tensor) -> Tensor:
        """A predicted frame is decoded already (see the module docstring)."""
        return frame


def from_package(package, device="cpu") -> ImageToVideoPredictor:
    """The predictor of a video package with ``extra.video.predictor == "cogvideox-i2v"``
    (``device``: a device name or a :class:`~ulbcodec.placement.Placement`)."""
    from ulbcodec.placement import Placement

    placement = Placement.of(device)
    device = placement.device
    video = package.extra["video"]
    build = lambda name: package.build(name, device=str(placement.home), dtype=placement.diffusers_dtype)  # noqa: E731
    negative = build("predictor_negative_embeds") if "predictor_negative_embeds" in package.components else None
    dtype = {"bfloat16": torch.bfloat16, "float32": None}[video.get("dtype", "bfloat16")]
    return ImageToVideoPredictor(build("predictor_vae"), build("predictor"), build("predictor_scheduler"),
                                 build("predictor_prompt_embeds").to(device), video["pred_frames"],
                                 None if negative is None else negative.to(device), video.get("guidance_scale", 1.0),
                                 dtype, placement)
