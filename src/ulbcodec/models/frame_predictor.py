"""Conditional diffusion frame predictor for the video codec.

After "Extreme video compression with prediction using pre-trained diffusion models"
(Li et al. 2024), which predicts 5 future frames from 2 past ones with MCVD; ours works in
the latent space of the image model's VAE (``AutoencoderKLCogVideoX``, 16 channels at
1/8 size), with a diffusers ``UNet2DModel`` as the denoiser::

    last K decoded frames ─► VAE.encode ─► c_1..c_K ──┐  (channels stacked)
    seeded noise (stream seed, round) ─► x_T: P latents ─┤
                                                      ▼
          for t in scheduler.timesteps (``steps``, stored in the file):
              v = UNet([c_1..c_K, x_t], t) ;  x_{t-1} = scheduler.step(v, t, x_t)
                                                      ▼
                    x_0: P latents (residual: c_K + scale · x_0) ─► VAE.decode ─► P predicted frames

Noise: every prediction round draws its noise from a ``torch.Generator`` seeded with
:func:`round_seed` (stream seed, round index) alone, so a decoder reproduces any round
without replaying earlier (even rejected) ones — the published code used one global RNG.

Determinism: prediction runs with a FIXED number of intra-op threads
(:data:`PREDICTION_THREADS`, whatever the machine or ``--jobs``), so the encoder's
predictions, which decide what is accepted, are what the decoder computes on the same
build and CPU: kernels split their work by the thread count, and a fixed count fixes
the split. Two rather than one: the VAE decodes faster, and a one-core machine still
runs two threads, only slower.
"""

from __future__ import annotations

from typing import ContextManager, Optional

import torch
from torch import Tensor

from ulbcodec.models.next_frame import NextFramePipeline
from ulbcodec.threads import torch_threads

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, round) over 63 bits


def round_seed(stream_seed: int, round_index: int) -> int:
    """The noise seed of one prediction round, from the stream seed and the round alone."""
    return (stream_seed * _SEED_MIX + round_index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def sampling_start(scheduler, steps: int, noise: Tensor, init: Optional[Tensor] = None,
                   start_timestep: Optional[int] = None):
    """(timesteps to run, starting sample) of a ``steps``-step sampler: all of them from
    ``noise``; with ``init`` (SDEdit, Meng et al. 2022), ``init`` noised to the first
    timestep <= ``start_timestep`` and only the timesteps from there on."""
    scheduler.set_timesteps(steps)
    timesteps = list(scheduler.timesteps)
    if init is None:
        return timesteps, noise
    timesteps = [t for t in timesteps if int(t) <= start_timestep] or timesteps[-1:]
    ab = float(scheduler.alphas_cumprod[int(timesteps[0])])
    return timesteps, ab ** 0.5 * init + (1 - ab) ** 0.5 * noise


PREDICTION_THREADS = 2


def fixed_threads() -> ContextManager[int]:
    """The predictions' fixed thread count (:func:`ulbcodec.threads.torch_threads`)."""
    return torch_threads(PREDICTION_THREADS)


class FramePredictionPipeline:
    """Composes the image model's VAE, a ``UNet2DModel`` denoiser and a scheduler."""

    def __init__(self, latent: NextFramePipeline, unet, scheduler, cond_frames: int, pred_frames: int,
                 residual_scale: Optional[float] = None):
        self.latent = latent  # encode_latent / decode_latent of the image model
        self.unet = unet
        self.scheduler = scheduler
        self.cond_frames, self.pred_frames = cond_frames, pred_frames
        # Residual parameterisation: the diffusion model generates (x - c_K) / scale, the
        # change from the last conditioning latent, so that an untrained or unsure model
        # falls back to "nothing moves" instead of to noise (cf. residual video diffusion,
        # Yang et al. 2022). None: it generates the latents themselves.
        self.residual_scale = residual_scale
        c = latent.latent_channels
        if unet.config.in_channels != c * (cond_frames + pred_frames) or unet.config.out_channels != c * pred_frames:
            raise ValueError(f"predictor UNet needs {c * (cond_frames + pred_frames)} input and "
                             f"{c * pred_frames} output channels for K={cond_frames}, P={pred_frames}")
        self.channels = c

    @property
    def multiple(self) -> int:
        """Frames are padded to this many pixels so the UNet's downsamplings divide them."""
        return 8 * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def velocity(self, cond: Tensor, x: Tensor, t) -> Tensor:
        """cond [B,K,C,h,w], x [B,P,C,h,w] → v [B,P,C,h,w]."""
        b, _, c, h, w = x.shape
        inputs = torch.cat([cond.reshape(b, -1, h, w), x.reshape(b, -1, h, w)], dim=1)
        t = torch.as_tensor(t, device=inputs.device).reshape(-1).expand(b)
        unet = self.unet
        with self.latent.placement.use(unet):  # float32 on the CPU, bfloat16 weights on a GPU
            out = unet(inputs.to(unet.dtype), t).sample
        return out.reshape(b, self.pred_frames, c, h, w).float()

    def sample(self, cond: Tensor, noise: Tensor, steps: int, init: Optional[Tensor] = None,
               start_timestep: Optional[int] = None) -> Tensor:
        """DDIM-style sampling over ``steps`` scheduler steps from ``noise``; with ``init``
        (SDEdit, Meng et al. 2022), from ``init`` noised to the first timestep <= ``start_timestep``
        instead, and only the remaining steps."""
        timesteps, x = sampling_start(self.scheduler, steps, noise, init, start_timestep)
        with self.latent.placement.use(self.unet):
            for t in timesteps:
                x = self.scheduler.step(self.velocity(cond, x, int(t)), t, x, return_dict=False)[0]
        return x

    # Frames go through the VAE one at a time, on both sides: a batch of another size may
    # take other kernels and round differently, and one at a time lets the encoder stop
    # decoding a round at its first rejected frame and the decoder decode only accepted ones.

    @torch.no_grad()
    def encode_frame(self, frame: Tensor) -> Tensor:
        """One decoded frame [3,H,W] in [0,1] (H, W multiples of ``multiple``) → its latent [C,h,w]."""
        with fixed_threads():
            return self.latent.encode_latent(frame[None])[0]

    @torch.no_grad()
    def predict_latents(self, cond_latents: Tensor, stream_seed: int, round_index: int, steps: int,
                        guide: Optional[Tensor] = None, guide_timestep: int = 600) -> Tensor:
        """Latents of the last K decoded frames [K,C,h,w] → latents of the next P frames [P,C,h,w].

        ``guide`` (the latent [C,h,w] of a small anchor of the round's first frame): every
        predicted frame starts from it, noised to ``guide_timestep``, so that the anchor
        sets the layout and colours and the prediction adds what the history knows."""
        with fixed_threads():
            g = torch.Generator().manual_seed(round_seed(stream_seed, round_index))
            # drawn on the CPU: the same noise on every device
            noise = torch.randn((1, self.pred_frames) + tuple(cond_latents.shape[1:]), generator=g)
            noise = noise.to(cond_latents.device)
            init = None
            if guide is not None:
                target = guide if self.residual_scale is None else (guide - cond_latents[-1]) / self.residual_scale
                init = target.expand_as(noise[0])[None]
            x = self.sample(cond_latents[None], noise, steps, init, guide_timestep)[0]
            return x if self.residual_scale is None else cond_latents[-1] + self.residual_scale * x

    @torch.no_grad()
    def decode_frame(self, latent: Tensor) -> Tensor:
        """One predicted latent [C,h,w] → the frame [3,H,W] in [0,1]."""
        with fixed_threads():
            return self.latent.decode_latent(latent[None])[0]
