"""Train the video codec's frame predictor (resumable, CPU) and export the video package.

Data: the training clips of :mod:`ulbcodec.train.video_data` (real clips, pans and zooms
over training photographs, moving digits). Every frame is VAE-encoded once with the
image model's frozen VAE (``--image-model``, a generative package); training samples are
random windows of K+P consecutive latents, cropped to ``--crop`` latents (random
position, random flips), so the fully convolutional UNet learns local motion.

Objective: v-prediction MSE on the P targets at a uniformly drawn timestep of the
scheduler (CogVideoX's schedule, as the image model's), conditioned on the K clean
latents stacked as channels. The targets are residuals, (x_j - c_K) / ``--residual-scale``:
the model generates the change from the last conditioning latent (a first model that
generated the latents themselves, 1,500 steps, predicted far worse than copying the last
frame: latent MSE 0.31-0.37 against 0.002-0.12). Encoded clips are cached in the run
folder (``latents.safetensors``), so a resumed run starts training at once.

One process or many (``accelerate launch``, :mod:`ulbcodec.train.distributed`): the
main process encodes the clips into the cache while the others wait, then every process
reads the cache and trains on its own windows.

``export`` writes a package holding every component of the image model plus
``predictor`` (UNet2DModel) and ``predictor_scheduler``, with the prediction settings
(K, P, steps, residual scale) in the manifest's ``extra.video``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec import packages
from ulbcodec.train.distributed import TrainRuntime, add_runtime_arguments, training_runtime
from ulbcodec.train.loop import TrainLoop
from ulbcodec.models.next_frame import SCHEDULER_CONFIG
from ulbcodec.train.generative import load_stage, save_stage

COND_FRAMES, PRED_FRAMES = 2, 5
LATENT = 16


def unet_config(cond: int = COND_FRAMES, pred: int = PRED_FRAMES) -> dict:
    return dict(sample_size=32, in_channels=LATENT * (cond + pred), out_channels=LATENT * pred,
                down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"), block_out_channels=(96, 192, 192),
                layers_per_block=1, add_attention=False, norm_num_groups=32)


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config())


@torch.no_grad()
def encode_clips(files: List[Path], pipe, max_frames: int) -> List[torch.Tensor]:
    """Every clip's frames as VAE latents [T, C, h, w] (bf16 to halve memory)."""
    from ulbcodec.train.video_data import read_frames

    out = []
    for f in files:
        frames = []
        for i, frame in enumerate(read_frames(f)):
            if i >= max_frames:
                break
            h, w = frame.shape[:2]
            x = torch.from_numpy(frame[: h // 8 * 8, : w // 8 * 8].copy()).permute(2, 0, 1)[None].float() / 255
            frames.append(pipe.encode_latent(x.to(pipe.vae.device))[0].to("cpu", torch.bfloat16))
        out.append(torch.stack(frames))
        print(f"encoded {f.name}: {tuple(out[-1].shape)}", flush=True)
    return out


def cached_clips(run: Path, args, pipe, rt: TrainRuntime) -> List[torch.Tensor]:
    """The training clips' latents, encoded once per run by the main process and kept in
    ``run/latents.safetensors``; the other processes wait for the file, then read it."""
    from safetensors.torch import load_file, save_file

    cache = run / "latents.safetensors"
    if rt.is_main and not cache.exists():
        files = sorted((Path(args.data) / "videos" / "train").glob("*.mkv"))
        if not files:
            raise SystemExit(f"no training clips under {args.data}/videos/train: run `make data` first")
        clips = encode_clips(files, pipe, args.max_frames)
        run.mkdir(parents=True, exist_ok=True)
        save_file({f"{i:05d}": c.contiguous() for i, c in enumerate(clips)}, str(cache))
    rt.wait_for_everyone()
    stored = load_file(str(cache))
    return [stored[k] for k in sorted(stored)]


def sample_batch(clips, n: int, window: int, crop: int, rng: random.Random) -> torch.Tensor:
    batch = []
    for _ in range(n):
        clip = rng.choice([c for c in clips if c.shape[0] >= window])
        t = rng.randrange(clip.shape[0] - window + 1)
        _, _, h, w = clip.shape
        y, x = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        win = clip[t : t + window, :, y : y + crop, x : x + crop].float()
        if rng.random() < 0.5:
            win = win.flip(-1)
        if rng.random() < 0.2:  # time reversal: motion the other way
            win = win.flip(0)
        batch.append(win)
    return torch.stack(batch)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the ulbc frame predictor (resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/predictor")
    p.add_argument("--image-model", default="generative")
    p.add_argument("--export", default=None)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=16, help="latent crop (x8 pixels)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--residual-scale", type=float, default=0.25, help="targets are (x - c_K) / scale")
    p.add_argument("--sampler-steps", type=int, default=1,
                   help="the exported model's default prediction steps (docs/training.md: why 1)")
    p.add_argument("--max-frames", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=float, default=300.0)
    add_runtime_arguments(p)
    args = p.parse_args(argv)
    from diffusers import CogVideoXDDIMScheduler

    from ulbcodec.image import ImageCodec

    rt = TrainRuntime(args.mixed_precision)
    torch.manual_seed(args.seed)
    image = ImageCodec.from_pretrained(args.image_model, device=str(rt.device))
    pipe = image.next_frame
    unet, scheduler = build_unet().to(rt.device), CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    run = Path(args.run)
    meta = {"step": 0, "seconds": 0.0, "log": [], "done": False}
    if (run / "state.json").exists():
        meta = {**meta, **load_stage(run, {"unet": unet}, {}, {"opt": opt})}
        rt.print(f"resumed at step {meta['step']}")
    meta.setdefault("residual_scale", args.residual_scale)  # a resumed run keeps its own
    rt.record(meta, args.batch)
    rt.sync_replicas(params)
    rt.decorrelate_global_rng(args.seed)
    if meta["step"] < args.steps:  # a finished run only exports: no need to encode the clips
        clips = cached_clips(run, args, pipe, rt)
    ab_all = scheduler.alphas_cumprod.float()
    window = COND_FRAMES + PRED_FRAMES
    loop = TrainLoop(rt, meta, args.steps, args.log_every, args.save_every)
    seed = rt.process_seed(args.seed)  # this process's windows (process 0: args.seed)
    unet.train()
    while meta["step"] < args.steps:
        i = meta["step"]
        rng = random.Random(seed * 1_000_003 + i)
        lat = sample_batch(clips, args.batch, window, args.crop, rng).to(rt.device)
        cond = lat[:, :COND_FRAMES]
        x0 = (lat[:, COND_FRAMES:] - cond[:, -1:]) / meta["residual_scale"]
        # t and noise are drawn on the CPU (the same numbers on any device), then moved
        t = torch.randint(0, 1000, (args.batch,), generator=torch.Generator().manual_seed(rt.process_seed(i)))
        ab = ab_all[t].view(-1, 1, 1, 1, 1).to(rt.device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(rt.process_seed(10**7 + i)))
        noise = noise.to(rt.device)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
        b, _, c, h, w = x0.shape
        with rt.autocast():
            v = unet(torch.cat([cond.reshape(b, -1, h, w), xt.reshape(b, -1, h, w)], 1), t.to(rt.device)).sample
        loss = F.mse_loss(v.float().reshape(x0.shape), target)
        opt.zero_grad(set_to_none=True)
        rt.backward(loss, params)
        rt.clip_grad_norm_(params, 1.0)
        opt.step()
        loop.record(loss.item())
        meta["step"] = i + 1
        logged = loop.flush_log()
        if logged:
            elapsed, losses = logged  # every process's batches
            loop.log(elapsed, v=float(np.mean(losses)))
            rt.print(f"predictor step {meta['step']:5d} {elapsed / 60:6.1f} min v-loss {np.mean(losses):.4f}")
        if loop.checkpoint_due():
            meta["done"] = meta["step"] >= args.steps
            rt.save_checkpoint(lambda: save_stage(run, {"unet": unet}, {}, {"opt": opt}, meta), params, meta["step"])
    if args.export and rt.is_main:
        export(image, unet.cpu().eval(), scheduler, meta, args)  # the package is built and used on the CPU
    rt.end()


def export(image, unet, scheduler, meta: Dict, args) -> None:
    base = image.package
    extra = {"video": {"cond_frames": COND_FRAMES, "pred_frames": PRED_FRAMES, "steps": args.sampler_steps,
                       "residual_scale": meta["residual_scale"]},
             "predictor_training": {"steps": meta["step"], "minutes": round(meta["seconds"] / 60, 1),
                                    "batch": args.batch, "crop_latents": args.crop, "lr": args.lr,
                                    "seed": args.seed, "image_model_digest": base.digest,
                                    **training_runtime(meta, args.batch),
                                    "log_tail": meta["log"][-5:]}}
    pkg = packages.save_derived_package(base, args.export, {"predictor": unet, "predictor_scheduler": scheduler},
                                        extra, name="video",
                                        description="ulbc default video model: the generative image model plus "
                                        "a latent frame predictor trained by ulbcodec.train.predictor")
    print(json.dumps({"exported": str(pkg.root), "digest": pkg.digest[:16], "MB": pkg.size_bytes / 1e6}))


if __name__ == "__main__":
    main()
