"""Train the video codec's conditional P-frame codec (resumable, CPU) and add it to a video package.

Recipe (docs/training.md has the reasoning and the measured cost):

- data: the training clips of :mod:`ulbcodec.train.video_data` (real clips, pans and zooms
  over training photographs, moving digits), held in memory as uint8; a sample is three
  frames ``t, t+s, t+2s`` (``s`` = 1..3: more motion than the clips have), a random crop,
  flips, time reversal, and — for a third of the samples — a darkening
  ``a·x^γ`` of all three frames, so that low-light scenes are not outside the training
  distribution;
- for the first ``--noise-steps`` steps the decoder sees y + U(−½, ½) instead of the
  rounded y; the first ``--rate-warmup`` steps train on distortion alone and the rate
  term's weight then ramps to 1 over as many (as DCVC trains its contextual coder on
  distortion first): both keep the decoder from learning to ignore a latent that the
  rate term pushes to zero bits (docs/training.md: so far every run still did);
- the first reference stands in for a decoded keyframe: the first frame blurred by a
  random down/up-scaling (the anchor codec's blur at low rates) and rounded to uint8;
- each reference is first warped along the mesh motion the encoder would find
  (:mod:`ulbcodec.motion`, a faster search, bilinear and differentiable here, the HEVC
  filters in the codec) and rounded to uint8: the codec learns to code a frame given
  its motion-compensated prediction, which is what it is given in a file;
- cascaded training, as in DCVC-DC: frame 2 is coded from the *decoded* frame 1 (rounded
  to uint8 with a straight-through gradient), so the model learns to stop its own errors
  from growing along a GOP;
- one model for all rate levels: every batch draws a level l and trains on
  ``R + λ_l·D`` summed over both frames, with the anchor codec's λs and distortion
  (:mod:`ulbcodec.losses.rate_distortion`; MS-SSIM with a 7 px window so that 128 px crops
  keep its five scales), so keyframes and P frames share a quality scale;
- the entropy bottleneck's quantiles are fitted by CompressAI's auxiliary loss;
- a checkpoint (safetensors + JSON) every ``--save-every`` seconds; the same command resumes.

``--validate`` measures the run's checkpoint as a file would see it (eval mode, real
entropy coding, the codec's own motion search and warp) on the first frames of validation
clips, each given a 4x-blurred stand-in for a decoded keyframe, at every rate level: bytes
of y + z, PSNR of the decoded frame, and PSNR of its motion-compensated reference alone.
The training log's bpp comes from the uniform-noise likelihoods and charges a collapsed
latent ~0.06 bpp, so only this tells whether the codec codes anything beyond its
reference (docs/training.md).

``--export DIR`` writes ``--video-model``'s package with the P-frame codec added as the
component ``pframe`` (``PFrameCodec``), every other component unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec.losses.rate_distortion import anchor_distortion, bits_per_pixel
from ulbcodec.models.pframe_codec import PFrameCodec
from ulbcodec.motion.search import estimate_vectors, luma, warp_bilinear
from ulbcodec.train.anchor import DEFAULT_LAMBDAS, round_parameters_to_half
from ulbcodec.train.generative import load_stage, save_stage

DEFAULT_CONFIG = dict(N=64, M=96, context_widths=[32, 48, 64], num_rate_levels=len(DEFAULT_LAMBDAS))
MIN_SIDE = 128  # MS-SSIM's five scales with a 7-px window need > 96 px; smaller clips are upscaled to this
MSSSIM_WINDOW = 7
MOTION_SPACING = 32
# A quicker search than the encoder's (no 1/4-size stage; training crops move less than ±10 px)
MOTION_STAGES = ((2, 8.0, 2.0), (1, 1.0, 1.0), (1, 0.5, 0.25))


def motion_compensated(reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``reference`` warped along the motion that predicts ``target`` best, on uint8 levels."""
    vectors = estimate_vectors(luma(target), luma(reference.detach()), MOTION_SPACING, stages=MOTION_STAGES)
    return quantize_uint8(warp_bilinear(reference, vectors, MOTION_SPACING))


def load_clips(folder: Path, max_frames: int) -> List[np.ndarray]:
    """Every training clip as a uint8 array [T, H, W, 3], small ones upscaled (nearest) to MIN_SIDE."""
    from ulbcodec.train.video_data import read_frames

    clips = []
    for f in sorted(folder.glob("*.mkv")):
        clip = np.stack(list(read_frames(f, stop=max_frames)))
        factor = -(-MIN_SIDE // min(clip.shape[1:3]))
        if factor > 1:
            clip = clip.repeat(factor, axis=1).repeat(factor, axis=2)
        clips.append(clip)
    if not clips:
        raise SystemExit(f"no training clips under {folder}: run `make data` first")
    return clips


def sample_batch(clips: List[np.ndarray], n: int, crop: int, rng: random.Random, frames: int = 3) -> torch.Tensor:
    """[n, ``frames`` frames, 3, crop, crop] in [0, 1]: windows of every 1st to 3rd frame of
    the clips that have that many frames."""
    batch = []
    clips = [c for c in clips if c.shape[0] >= frames]
    if not clips:
        raise ValueError(f"no training clip has {frames} frames")
    # Clips drawn in proportion to the square root of their pixel count: the 40 small
    # digit clips would otherwise make up a third of the draws.
    weights = [float(np.sqrt(c.shape[0] * c.shape[1] * c.shape[2])) for c in clips]
    for clip in rng.choices(clips, weights, k=n):
        step = rng.choice((1, 1, 2, 3))
        step = min(step, (clip.shape[0] - 1) // (frames - 1))
        span = (frames - 1) * step
        t = rng.randrange(clip.shape[0] - span)
        h, w = clip.shape[1:3]
        y, x = rng.randrange(h - crop + 1), rng.randrange(w - crop + 1)
        window = clip[t : t + span + 1 : step, y : y + crop, x : x + crop]
        win = torch.from_numpy(np.ascontiguousarray(window)).permute(0, 3, 1, 2).float() / 255
        if rng.random() < 0.5:
            win = win.flip(-1)
        if rng.random() < 0.2:
            win = win.flip(0)
        if rng.random() < 1 / 3:
            win = rng.uniform(0.25, 0.8) * win.pow(rng.uniform(1.2, 2.2))
        batch.append(win)
    return torch.stack(batch)


def keyframe_like(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """A stand-in for a decoded keyframe: blurred by down/up-scaling, on uint8 levels."""
    if rng.random() < 0.25:
        return quantize_uint8(x)
    factor = rng.choice((2, 3, 4, 6))
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    return quantize_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1))


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """round(255·x)/255 with a straight-through gradient: what the next frame's reference is."""
    x = x.clamp(0, 1)
    return x + (torch.round(x * 255) / 255 - x).detach()


def rate_weight(step: int, warmup: int) -> float:
    """0 for the first ``warmup`` steps, then a linear ramp to 1 over as many: an untrained
    model's latent costs several bits per pixel, and even a tenth of that rate outweighs
    the distortion and collapses y before the decoder has learnt to use it."""
    return min(1.0, max(0.0, step / warmup - 1.0))


def optimizers(model: PFrameCodec, lr: float):
    """Adam for the network, the entropy bottleneck's density at 5x the rate (it is what
    costs the bits of a static scene, and learns slowest), Adam for its quantiles (aux)."""
    density = [p for n, p in model.named_parameters() if n.startswith("entropy_bottleneck.")
               and not n.endswith(".quantiles")]
    ids = {id(p) for p in density}
    rest = [p for n, p in model.named_parameters() if id(p) not in ids and not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    opt = torch.optim.Adam([{"params": rest, "lr": lr}, {"params": density, "lr": 5 * lr}])
    return opt, torch.optim.Adam(aux, lr=1e-3), rest + density


VALIDATION_CLIPS = ("bikes", "city-a", "carphone", "pan-Path-256x256")


@torch.no_grad()
def validate(model: PFrameCodec, folder: Path, frames: int = 3) -> None:
    """Print one JSON line per (clip, level): frame t+1 coded given frame t (t = 0..frames-2)
    as a low-rate keyframe stands in for it (blurred by 4x down/up-scaling, as in
    training), motion-compensated; y + z bytes, PSNR decoded / reference alone."""
    from ulbcodec.image import pad_replicate, to_tensor, to_uint8
    from ulbcodec.motion.field import warp
    from ulbcodec.motion.search import estimate
    from ulbcodec.train.video_data import read_frames

    model.eval().update(force=True)
    psnr = lambda a, b: float(10 * np.log10(255**2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-10)))  # noqa: E731
    for name in VALIDATION_CLIPS:
        path = folder / f"{name}.mkv"
        if not path.exists():
            continue
        clip = [f for _, f in zip(range(frames), read_frames(path))]
        h, w = clip[0].shape[:2]
        pad = lambda f: pad_replicate(to_tensor(f), model.required_multiple)  # noqa: E731
        for level in range(model.num_rate_levels):
            rows = []
            for ref, target in zip(clip, clip[1:]):
                small = F.interpolate(to_tensor(ref), size=(h // 4, w // 4), mode="area")
                ref = to_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))
                ref = warp(ref, estimate(target, ref, MOTION_SPACING))
                out = model.compress(pad(target), pad(ref), level)
                decoded = to_uint8(out["x_hat"][..., :h, :w])
                rows.append((sum(len(s) for s in out["strings"]), psnr(decoded, target), psnr(ref, target)))
            bytes_, coded, reference = np.mean(rows, 0)
            print(json.dumps({"clip": name, "level": level, "bytes": round(float(bytes_), 1),
                              "bpp": round(float(bytes_) * 8 / (h * w), 5), "psnr": round(float(coded), 2),
                              "psnr_reference": round(float(reference), 2)}), flush=True)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments every video-codec trainer shares: data size, threads, seed, logging, checkpoints."""
    p.add_argument("--max-frames", type=int, default=150)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=float, default=300.0)


def start_run(args: argparse.Namespace) -> Path:
    """Threads and seed as ``args`` say; the run's folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return Path(args.run)


def take_step(opt: torch.optim.Optimizer, loss: torch.Tensor, module: torch.nn.Module, meta: dict) -> None:
    """One optimiser step on ``loss`` (gradients clipped to norm 1), and the run's step count advanced."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()
    meta["step"] += 1


def training_record(trainer: str, meta: dict, args: argparse.Namespace, **extra) -> dict:
    """What an export of a video trainer's run records of its training (``extra`` added)."""
    return {"trainer": trainer, "steps": meta["step"], "minutes": round(meta["seconds"] / 60, 1),
            "batch": args.batch, "crop": args.crop, "lr_schedule": meta.get("lr_schedule", [[0, args.lr]]),
            "seed": args.seed, "keyframe_codec_digest": meta["keyframe_codec_digest"], **extra,
            "log_tail": meta["log"][-5:]}


def go_on_at(opt: torch.optim.Optimizer, meta: dict, lr: float) -> None:
    """Every parameter group at ``lr``, recorded in ``meta["lr_schedule"]`` from this step:
    a resumed run goes on at its --lr, which is how the rate decays in steps."""
    for group in opt.param_groups:
        group["lr"] = lr
    meta.setdefault("lr_schedule", []).append([meta["step"], lr])


class RunProgress:
    """The loop bookkeeping every video-codec trainer shares: after each step, a JSON line
    every ``--log-every`` steps (``summary`` of the rows since the last one, appended to
    ``meta["log"]``) and a checkpoint every ``--save-every`` seconds and at the last step."""

    def __init__(self, run: Path, meta: dict, args: argparse.Namespace,
                 summary: Callable[[np.ndarray], Dict[str, float]]):
        self.run, self.meta, self.args, self.summary = run, meta, args, summary
        self.started = self.last_save = time.time()
        self.window: List[tuple] = []

    def step_done(self, row: tuple, modules: Dict[str, torch.nn.Module],
                  optimizers: Dict[str, torch.optim.Optimizer]) -> None:
        meta, args = self.meta, self.args
        self.window.append(row)
        if meta["step"] % args.log_every == 0:
            elapsed = meta["seconds"] + time.time() - self.started
            entry = {"step": meta["step"], "minutes": round(elapsed / 60, 2), **self.summary(np.array(self.window))}
            meta["log"].append(entry)
            print(json.dumps(entry), flush=True)
            self.window = []
        if time.time() - self.last_save > args.save_every or meta["step"] == args.steps:
            meta["seconds"] += time.time() - self.started
            self.started = self.last_save = time.time()
            meta["done"] = meta["step"] >= args.steps
            save_stage(self.run, modules, {}, optimizers, meta)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the ulbc P-frame codec (resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/pframe")
    p.add_argument("--video-model", default="video", help="package the export adds the P-frame codec to")
    p.add_argument("--export", default=None)
    p.add_argument("--validate", action="store_true", help="measure the checkpoint on validation clips and stop")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this package's P-frame codec (fresh optimisers and warm-ups: "
                        "pass --rate-warmup 0 --noise-steps 0 to continue the objective as it was)")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=MIN_SIDE)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lambdas", type=float, nargs="+", default=DEFAULT_LAMBDAS)
    p.add_argument("--noise-steps", type=int, default=3000,
                   help="steps that decode y + uniform noise instead of the rounded y")
    p.add_argument("--rate-warmup", type=int, default=3000,
                   help="steps of distortion alone, then as many over which the rate term's weight ramps to 1")
    p.add_argument("--no-motion", dest="motion", action="store_false",
                   help="condition on the unwarped reference (the codec before coded motion)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    run = start_run(args)
    model = PFrameCodec(**DEFAULT_CONFIG)
    opt, aux_opt, params = optimizers(model, args.lr)
    meta = {"step": 0, "seconds": 0.0, "log": [], "done": False, "config": DEFAULT_CONFIG,
            "lambdas": args.lambdas}
    if (run / "state.json").exists():
        meta = {**meta, **load_stage(run, {"model": model}, {}, {"opt": opt, "aux": aux_opt})}
        print(f"resumed at step {meta['step']}", flush=True)
    elif args.init_from:  # a new run from a package's P-frame codec: how a shipped model trains further
        from ulbcodec import packages

        source = packages.ModelPackage.load_manifest(packages.resolve(args.init_from))
        model.load_state_dict(source.build("pframe").float().state_dict())
        meta["init_from"] = {"package": args.init_from, "digest": source.digest,
                             "steps": source.extra.get("pframe_training", {}).get("steps")}
        print(f"initialised from {args.init_from} ({meta['init_from']['steps']} steps)", flush=True)
    lambdas = meta["lambdas"]
    if args.validate:
        return validate(model, Path(args.data) / "videos" / "val")
    if meta["step"] < args.steps:
        clips = load_clips(Path(args.data) / "videos" / "train", args.max_frames)
        print(f"{len(clips)} clips, {sum(c.shape[0] for c in clips)} frames", flush=True)
    progress = RunProgress(run, meta, args, lambda rows: {
        "bpp1": round(float(rows[:, 1].mean()), 5), "bpp2": round(float(rows[:, 2].mean()), 5),
        "psnr1": round(float(rows[:, 3].mean()), 2), "psnr2": round(float(rows[:, 4].mean()), 2)})
    model.train()
    while meta["step"] < args.steps:
        i = meta["step"]
        rng = random.Random(args.seed * 1_000_003 + i)
        frames = sample_batch(clips, args.batch, args.crop, rng)
        level = rng.randrange(len(lambdas))
        ref = keyframe_like(frames[:, 0], rng)
        loss, bpp, psnr = 0.0, [], []
        for j in (1, 2):
            if args.motion:
                ref = motion_compensated(ref, frames[:, j])
            out = model(frames[:, j], ref, level, noisy=i < args.noise_steps)
            rate = bits_per_pixel(out["likelihoods"], frames.shape[0] * args.crop**2)
            dist, mse, _ = anchor_distortion(out["x_hat"], frames[:, j], win_size=MSSSIM_WINDOW)
            loss = loss + rate_weight(i, args.rate_warmup) * rate + lambdas[level] * dist
            ref = quantize_uint8(out["x_hat"])
            bpp.append(rate.item())
            psnr.append(-10 * np.log10(max(mse.item(), 1e-10)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        aux_opt.zero_grad(set_to_none=True)
        model.aux_loss().backward()
        aux_opt.step()
        meta["step"] = i + 1
        progress.step_done((level, bpp[0], bpp[1], psnr[0], psnr[1]), {"model": model},
                           {"opt": opt, "aux": aux_opt})
    if args.export:
        export(model.eval(), meta, args)


def export(model: PFrameCodec, meta: dict, args) -> None:
    from ulbcodec import packages

    round_parameters_to_half(model)  # stored as float16: the CDF tables are built from what is stored
    model.update(force=True)
    base = packages.ModelPackage.load_manifest(packages.resolve(args.video_model))
    previous = meta.get("init_from", {}).get("steps") or 0
    training = {"steps": previous + meta["step"], "minutes": round(meta["seconds"] / 60, 1),
                "init_from": meta.get("init_from"),
                "batch": args.batch, "crop": args.crop, "lr": args.lr, "seed": args.seed,
                "lambdas": meta["lambdas"], "log_tail": meta["log"][-5:]}
    pkg = packages.save_derived_package(
        base, args.export, {"pframe": model}, {"pframe_training": training},
        description=base.description if "pframe" in base.components else
        base.description + "; conditional P-frame codec trained by ulbcodec.train.pframe")
    print(json.dumps({"exported": str(pkg.root), "digest": pkg.digest[:16], "MB": pkg.size_bytes / 1e6}))


if __name__ == "__main__":
    main()
