"""Next-frame generative decoder: anchor frame + bypass latent -> detailed image.

After "Next-frame decoding for ultra-low-bitrate image compression with video diffusion
priors" (NeFIC, Chen et al. 2026). The image codec's anchor decoder gives a blurry but
faithful *anchor frame* and a 16-channel *bypass latent*; a video diffusion transformer
treats anchor -> image as a next-frame prediction and generates the image in ONE step,
with the bypass latent standing where noise would::

    anchor frame ─► clamp, ×2−1 ─► VAE.encode (mode × scaling_factor) ─► A   [B,16,h,w]
    bypass latent (from the anchor decoder) ───────────────────────────► Z   [B,16,h,w]

    frames [A, A, Z, Z] ─► CogVideoXTransformer3DModel(t = 500, prompt embeddings,
                           RoPE of one frame, used for both temporal tokens) ─► v
    x0 = sqrt(ᾱ_t) · x_t − sqrt(1 − ᾱ_t) · v        (v-prediction; x_t = the input)
    last frame of x0 ─► / scaling_factor ─► VAE.decode ─► ×0.5+0.5 ─► clamp ─► image

(h, w = H/8, W/8.) Each latent is duplicated because the VAE packs 4 frames into one
latent frame and the transformer packs 2 latent frames into one temporal token: [A, A]
and [Z, Z] are then two tokens in time. ᾱ_t comes from the scheduler, so the pipeline
owns no diffusion maths of its own. Nothing random is drawn in one-step decoding.

Output ``"anchor_residual"`` (a ulbc option a package can choose; the published decoder
is ``"latent"``, the default): the image is the anchor frame plus what the prediction
changes in the VAE's pixels, ``anchor + VAE.decode(x0) − VAE.decode(A)``. A small VAE
trained in-project loses more on reconstruction than the anchor codec does; its error
on the anchor is known to the decoder and cancels, so the VAE ceiling no longer caps the
fidelity the anchor already carries, and the prediction only has to add detail (one
more VAE decode)::

    anchor frame ───────────────────────────────────────────┐
    x0 ─► VAE.decode ─┐                                     ├─► + ─► clamp ─► image
    A  ─► VAE.decode ─┴─► − ────────────────────────────────┘

Multi-step decoding (``steps > 1``, the "stage I" model of the paper) starts the target
frames from seeded Gaussian noise and runs the scheduler's sampler conditioned on [A, A].

Large images are decoded in overlapping tiles blended with linear ramps over their
overlap: the transformer's attention and the VAE's GroupNorms are global within a tile,
so a hard stitch would show seams. The transformer's tiles are the size it was trained
on (:func:`ulbcodec.tiling.transformer_tile`): a larger window of attention than it has seen in training
costs detail and fidelity. They keep that full size, so that on images a little over one
tile they overlap by more than the minimum, and go through the transformer in batches.
The VAE's tiles are spread evenly (the least overlapping work).

Packages imported from the published NeFIC checkpoints (``published=True``) decode
instead exactly as the published code does (models/nefic_decode.py): diffusers' own VAE
with its tiling, the whole image in one transformer pass, the published casts.

Floating point: the VAE and transformer run in bfloat16 (as the published models do) on
accelerators and on CPUs that compute bfloat16 natively (AMX), in float32 on the others
(the ``dtype`` the codec passes: ulbcodec/placement.py, ``cpu_compute_dtype``); this
path is NOT bit-exact across machines, unlike entropy decoding. For
inference the VAE runs as a 2-D channels-last graph in that dtype throughout, GroupNorms
included (models/single_frame.py: faster on the CPU); training, which needs
gradients, runs diffusers' own graph under autocast. Where
the modules run and whether they are offloaded to host memory between stages is the
``placement``'s business (ulbcodec/placement.py); the pipeline only says when each
module is in use.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Optional, Tuple

import torch
from torch import Tensor

from ulbcodec import tiling
from ulbcodec.packages import NEXT_FRAME_SETTINGS
from ulbcodec.models.single_frame import (decode_one_frame, encode_one_frame, one_frame_graph_supported,
                                          use_one_frame_convolutions)
from ulbcodec.tiling import blended_tiles, tile_batch, transformer_tile, vae_tile
from ulbcodec.models.rope import rotary_embedding


ONE_STEP_TIMESTEP = 500
# The diffusion schedule of the models trained here (the next-frame decoder, the frame
# predictor), that of the CogVideoX base models: scaled-linear betas, zero terminal SNR, v-prediction.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=True, snr_shift_scale=1.0)


def _autocast(dtype: Optional[torch.dtype], device: torch.device):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class NextFramePipeline:
    """Composes a CogVideoX VAE, a CogVideoX transformer, a scheduler and fixed prompt
    embeddings into the next-frame decoder. Differentiable (training uses the same
    methods); callers choose ``torch.no_grad()``."""

    def __init__(self, vae, transformer, scheduler, prompt_embeds: Tensor,
                 dtype: Optional[torch.dtype] = torch.bfloat16, placement=None, output: str = "latent",
                 published: bool = False):
        from ulbcodec.placement import Placement

        self.placement = placement or Placement(next(transformer.parameters()).device)
        self.published = published  # decode as the published NeFIC code (models/nefic_decode.py)
        if published:
            from ulbcodec.models.nefic_decode import enable_published_vae

            enable_published_vae(vae)
            self.vae, self.one_frame_graph = vae, False
        else:
            # Every VAE call here is on one frame: its causal 3-D convolutions become 2-D ones,
            # and without gradients the whole VAE runs as a 2-D channels-last graph.
            self.vae = use_one_frame_convolutions(vae)
            self.one_frame_graph = one_frame_graph_supported(vae)
        self.transformer = transformer
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds
        self.dtype = dtype
        if output not in NEXT_FRAME_SETTINGS["output"]:
            raise ValueError(f"unknown next-frame output {output!r}")
        self.output = output
        cfg = transformer.config
        self.patch_size = cfg.patch_size
        self.head_dim = cfg.attention_head_dim
        if vae.config.latent_channels != cfg.in_channels or cfg.in_channels != cfg.out_channels:
            raise ValueError("VAE latent channels and transformer in/out channels must agree")
        self.latent_channels = vae.config.latent_channels
        self.scaling_factor = vae.config.scaling_factor
        self.full_resolution_channels = vae.config.block_out_channels[0]
        self.latent_tile, self.latent_overlap = transformer_tile(cfg)

    # ---------------------------------------------------------------- VAE

    def _fast_vae(self) -> bool:
        """The 2-D graph (models/single_frame.py) serves inference; training keeps diffusers'."""
        return self.one_frame_graph and not torch.is_grad_enabled()

    def encode_latent(self, image: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] (H, W multiples of 8) → scaled latent [B,16,H/8,W/8] (the mode)."""
        if self.published:
            from ulbcodec.models import nefic_decode

            return nefic_decode.encode_latent(self, image).float()
        with self.placement.use(self.vae):
            if self._fast_vae():
                mode = encode_one_frame(self.vae, image * 2 - 1, self.dtype or torch.float32)
            else:
                with _autocast(self.dtype, image.device):
                    mode = self.vae.encode((image * 2 - 1).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        return mode.float().contiguous() * self.scaling_factor

    def decode_latent(self, latent: Tensor, clamp: bool = True) -> Tensor:
        """Scaled latent [B,16,h,w] → image [B,3,8h,8w] in [0,1] (unclamped for training losses)."""
        with self.placement.use(self.vae):
            if self._fast_vae():
                frame = decode_one_frame(self.vae, latent / self.scaling_factor, self.dtype or torch.float32)
            else:
                with _autocast(self.dtype, latent.device):
                    frame = self.vae.decode((latent / self.scaling_factor).unsqueeze(2)).sample[:, :, 0]
        image = frame.float().contiguous() * 0.5 + 0.5
        return image.clamp(0, 1) if clamp else image

    # ---------------------------------------------------------------- transformer

    def velocity(self, anchor_latent: Tensor, target_latent: Tensor, timestep) -> Tensor:
        """The transformer on frames [A, A, X, X]; returns v for all four latent frames."""
        anchor_latent, target_latent = anchor_latent.float(), target_latent.float()
        b, _, h, w = anchor_latent.shape
        frames = torch.stack([anchor_latent, anchor_latent, target_latent, target_latent], dim=1)
        rope = rotary_embedding(h, w, self.head_dim, self.patch_size, device=frames.device)
        t = torch.as_tensor(timestep, device=frames.device).reshape(-1).expand(b)
        prompt = self.prompt_embeds.to(frames.device).expand(b, -1, -1)
        with self.placement.use(self.transformer), _autocast(self.dtype, frames.device):
            v = self.transformer(hidden_states=frames, encoder_hidden_states=prompt, timestep=t,
                                 image_rotary_emb=rope, return_dict=False)[0]
        return v.float()

    def alpha_bar(self, timestep: int) -> Tensor:
        return self.scheduler.alphas_cumprod[int(timestep)].float()

    def predict_clean(self, anchor_latent: Tensor, bypass_latent: Tensor, timestep: int = ONE_STEP_TIMESTEP) -> Tensor:
        """One step: the bypass latent stands as x_t of the target frames; x0 from v."""
        ab = self.alpha_bar(timestep)
        v = self.velocity(anchor_latent, bypass_latent, timestep)
        x0 = ab.sqrt() * bypass_latent - (1 - ab).sqrt() * v[:, 3]
        return x0

    def sample(self, anchor_latent: Tensor, noise: Tensor, steps: int) -> Tensor:
        """Multi-step: the target frames from ``noise`` with the scheduler's sampler."""
        x = noise.to(anchor_latent.device)
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            v = self.velocity(anchor_latent, x, int(t))[:, 3]
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        return x

    def to_image(self, latent: Tensor, anchor_frame: Tensor, anchor_latent: Tensor, clamp: bool = True) -> Tensor:
        """The decoded image of the predicted latent, by the pipeline's ``output`` rule."""
        if self.output == "latent":
            return self.decode_latent(latent, clamp)
        image = anchor_frame + self.pixel_change(latent, anchor_latent)
        return image.clamp(0, 1) if clamp else image

    def pixel_change(self, latent: Tensor, anchor_latent: Tensor) -> Tensor:
        """``VAE.decode(x0) − VAE.decode(A)``: what the prediction adds to the anchor frame."""
        # two independent decodes: side by side on the CPU (tiling.in_parallel)
        on_cpu = latent.device.type == "cpu" and not self.placement.offloading
        decode = (lambda z: lambda: self.decode_latent(z, clamp=False))  # noqa: E731
        if on_cpu:
            now, before = tiling.in_parallel(decode(latent), decode(anchor_latent))
        else:
            now, before = decode(latent)(), decode(anchor_latent)()
        return now - before

    # ---------------------------------------------------------------- whole images

    def decode_image(self, anchor_frame: Tensor, bypass_latent: Optional[Tensor], steps: int = 1, seed: int = 0,
                     record: Optional[dict] = None) -> Tensor:
        """Anchor frame [B,3,H,W] (clamped, H, W multiples of 64) + bypass [B,1,16,h,w] → image.

        Every network runs on tiles, so the working memory is that of one tile plus the
        full-size inputs and outputs, whatever the image size. A published NeFIC package
        decodes one step as published instead; ``record`` (a dict) then receives its
        intermediates by name (tests/test_nefic_conformance.py).
        """
        if self.published and steps <= 1 and bypass_latent is not None:
            from ulbcodec.models import nefic_decode

            return nefic_decode.decode_image(self, anchor_frame, bypass_latent, record)
        use = self.placement.use  # with offloading: each module on the device for its whole stage
        # CPU: tiles (batches of tiles) on a pool of the process's threads, one intra-op
        # thread each (tiling.blended_tiles); an accelerator takes them one after another.
        workers = tiling.tile_workers() if anchor_frame.device.type == "cpu" else 1
        tile = vae_tile(self.full_resolution_channels)
        with use(self.vae):
            anchor_latent = blended_tiles(self.encode_latent, anchor_frame, tile=tile, overlap=tiling.VAE_OVERLAP,
                                          scale=Fraction(1, 8), even=True, workers=workers)
        with use(self.transformer):
            if steps <= 1:
                if bypass_latent is None:
                    raise ValueError("one-step decoding needs the bypass latent")
                latent = blended_tiles(self.predict_clean, anchor_latent, bypass_latent[:, 0],
                                       tile=self.latent_tile, overlap=self.latent_overlap,
                                       batch=tile_batch(self.latent_tile), workers=workers)
            else:
                # One seed per tile position would make tiles disagree; noise is drawn for the
                # whole latent first (on the CPU: the same numbers on every device), then tiled.
                g = torch.Generator().manual_seed(seed)
                noise = torch.randn(anchor_latent.shape, generator=g).to(anchor_latent.device)
                latent = blended_tiles(lambda a, n: self.sample(a, n, steps), anchor_latent, noise,
                                       tile=self.latent_tile, overlap=self.latent_overlap,
                                       batch=tile_batch(self.latent_tile))
        with use(self.vae):
            if self.output == "latent":
                return blended_tiles(self.decode_latent, latent, tile=tile // 8, overlap=tiling.VAE_OVERLAP // 8,
                                     scale=Fraction(8), even=True, workers=workers)
            change = blended_tiles(self.pixel_change, latent, anchor_latent, tile=tile // 8,
                                   overlap=tiling.VAE_OVERLAP // 8, scale=Fraction(8), even=True, workers=workers)
            return (anchor_frame + change).clamp(0, 1)
