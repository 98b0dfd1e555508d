"""Train :class:`~ulbcodec.models.temporal_fusion.TemporalFusion` (resumable), the decoder
side of fused P frames; ``--export`` adds it to the video package as its
``temporal_fusion`` component (docs/training.md, "Fused P frames").

Each step: windows of ``--window`` frames (default 3) of the training clips; frame 0
decoded by the video package's keyframe codec at a level k in [2, 5] (of the shipped
packages' 0-5), the others at a level p 2-5 below it (clamped at 0); each P frame's
decode fused with the previous output warped along the motion that predicts the frame
best (what a coded motion field gives), recursively; MSE to the originals, plus with
``--perceptual-weight`` the detail and VIF losses (VMAF's features) on the scale of the
codecs' own losses. The log compares the fused frames with the P frames' decodes and
the warps.

    python -m ulbcodec.train.temporal_fusion --run runs/temporal-fusion --steps 4000 \
        --video-model models/video --export runs/temporal-fusion/package
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec import packages
from ulbcodec.losses.rate_distortion import MSE_WEIGHT, perceptual_terms
from ulbcodec.models.temporal_fusion import TemporalFusion
from ulbcodec.train.anchor import round_parameters_to_half
from ulbcodec.train.generative import load_stage
from ulbcodec.train.pframe import (RunProgress, add_run_arguments, go_on_at, load_clips, motion_compensated,
                                   quantize_uint8, sample_batch, start_run, take_step, training_record)
from ulbcodec.train.pframe_latent import decoded_keyframe, keyframe_codec


def _psnr(mse: np.ndarray) -> float:
    return round(float(np.mean(-10 * np.log10(mse))), 3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the temporal fusion of low-rate P frames (resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/temporal-fusion")
    p.add_argument("--video-model", default="video", help="package whose keyframe codec decodes the frames")
    p.add_argument("--steps", type=int, default=None,
                   help="train up to this step (without it: only --export the checkpoint)")
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--window", type=int, default=3,
                   help="frames per training window: a keyframe, then window - 1 P frames fused recursively "
                        "(longer windows show the fusion the drift of a long chain)")
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="add w x (detail + VIF losses) per unit of the MSE term (losses/rate_distortion.py): "
                        "VMAF's features, which an MSE-trained fusion trades for blur")
    p.add_argument("--export", default=None, help="write the video package with this fusion to this folder")
    add_run_arguments(p)
    args = p.parse_args(argv)
    if args.steps is None and not args.export:
        p.error("nothing to do: give --steps or --export")
    if args.window < 2:
        p.error("--window needs a keyframe and at least one P frame")
    run = start_run(args)
    anchor, package = keyframe_codec(args.video_model)
    state = run / "state.json"
    if args.steps is None and not state.exists():
        p.error(f"no checkpoint to export in {run}")
    # a run goes on with its own network, whatever --width says
    net = TemporalFusion.from_config(json.loads(state.read_text())["config"]) if state.exists() \
        else TemporalFusion(args.width)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    meta = {"step": 0, "seconds": 0.0, "log": [], "done": False, "config": net.config,
            "video_model": args.video_model, "keyframe_codec_digest": package.digest[:16]}
    if state.exists():
        meta = {**meta, **load_stage(run, {"fusion": net}, {}, {"opt": opt})}
        print(f"resumed at step {meta['step']}", flush=True)
    if args.steps is not None and meta["step"] < args.steps:
        go_on_at(opt, meta, args.lr)
        meta.setdefault("perceptual_schedule", []).append([meta["step"], args.perceptual_weight])
        meta.setdefault("window_schedule", []).append([meta["step"], args.window])
        clips = load_clips(Path(args.data) / "videos" / "train", args.max_frames)
    perceptual = args.perceptual_weight / MSE_WEIGHT  # the losses below are MSE, not MSE_WEIGHT x MSE

    def summary(rows: np.ndarray) -> dict:
        out = {"psnr_fused": _psnr(rows[:, 0]), "psnr_p": _psnr(rows[:, 1]), "psnr_warp": _psnr(rows[:, 2])}
        if perceptual:
            out.update(perceptual_fused=round(float(rows[:, 3].mean()), 4),
                       perceptual_warp=round(float(rows[:, 4].mean()), 4))
        return out

    progress = RunProgress(run, meta, args, summary)
    net.train()
    top = anchor.num_rate_levels - 1
    while args.steps is not None and meta["step"] < args.steps:
        i = meta["step"]
        rng = random.Random(args.seed * 1_000_003 + i)
        frames = sample_batch(clips, args.batch, args.crop, rng, args.window)
        level = rng.uniform(min(2, top), top)
        plevel = max(0.0, level - rng.choice((2, 3, 4, 5)))
        with torch.no_grad():
            decoded = [decoded_keyframe(anchor, frames[:, j], level if j == 0 else plevel)
                       for j in range(args.window)]
        reference, loss, row = decoded[0], 0.0, np.zeros(5)
        for j in range(1, args.window):
            with torch.no_grad():
                reference = motion_compensated(reference, frames[:, j])
            fused = net(decoded[j], reference, plevel, level)
            error = F.mse_loss(fused, frames[:, j])
            loss = loss + error
            row[:3] += [error.item(), F.mse_loss(decoded[j], frames[:, j]).item(),
                        F.mse_loss(reference, frames[:, j]).item()]
            if perceptual:
                terms = sum(perceptual_terms(fused, frames[:, j]))
                loss = loss + perceptual * terms
                with torch.no_grad():
                    row[3:] += [terms.item(), sum(perceptual_terms(reference, frames[:, j])).item()]
            reference = quantize_uint8(fused.detach())  # clamped to [0, 1] there
        take_step(opt, loss, net, meta)
        progress.step_done(tuple(row / (args.window - 1)), {"fusion": net}, {"opt": opt})
    if args.export:
        export(net.eval(), package, meta, args)


def export(net: TemporalFusion, package, meta: dict, args) -> None:
    round_parameters_to_half(net)  # stored as float16
    training = training_record("ulbcodec.train.temporal_fusion", meta, args,
                               perceptual_schedule=meta.get("perceptual_schedule", [[0, args.perceptual_weight]]),
                               window_schedule=meta.get("window_schedule", [[0, args.window]]))
    base = package.description.split("; fused P frames:")[0]
    pkg = packages.save_derived_package(package, args.export, {"temporal_fusion": net},
                                        {"temporal_fusion_training": training},
                                        description=base + "; fused P frames: a temporal fusion trained by "
                                                           "ulbcodec.train.temporal_fusion")
    print(json.dumps({"exported": str(pkg.root), "digest": pkg.digest[:16], "MB": pkg.size_bytes / 1e6}))


if __name__ == "__main__":
    main()
