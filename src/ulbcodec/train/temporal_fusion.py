"""Train :class:`~ulbcodec.models.temporal_fusion.TemporalFusion` (resumable; an experiment,
docs/training.md "Tried, not built: a decoder-side temporal fusion of P frames").

Each step: 3-frame windows of the training clips; frame 0 decoded by the video package's
keyframe codec at a level k in [2, 5], frames 1 and 2 at a level p 2-5 below it (clamped at
0); each P frame's decode fused with the previous output warped along the motion that
predicts the frame best (what a coded motion field gives), recursively; MSE to the
originals. The log compares the fused frames with the P frames' decodes and the warps.

    python -m ulbcodec.train.temporal_fusion --run runs/temporal-fusion --steps 4000
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec.models.temporal_fusion import TemporalFusion
from ulbcodec.train.generative import load_stage
from ulbcodec.train.pframe import (RunProgress, add_run_arguments, go_on_at, load_clips, motion_compensated,
                                   quantize_uint8, sample_batch, start_run)
from ulbcodec.train.pframe_latent import decoded_keyframe, keyframe_codec


def _psnr(mse: np.ndarray) -> float:
    return round(float(np.mean(-10 * np.log10(mse))), 3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the temporal fusion of low-rate P frames (resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/temporal-fusion")
    p.add_argument("--video-model", default="video", help="package whose keyframe codec decodes the frames")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32)
    add_run_arguments(p)
    args = p.parse_args(argv)
    run = start_run(args)
    anchor, package = keyframe_codec(args.video_model)
    state = run / "state.json"
    net = TemporalFusion(args.width)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    meta = {"step": 0, "seconds": 0.0, "log": [], "done": False, "config": net.config,
            "video_model": args.video_model, "keyframe_codec_digest": package.digest[:16]}
    if state.exists():
        meta = {**meta, **load_stage(run, {"fusion": net}, {}, {"opt": opt})}
        print(f"resumed at step {meta['step']}", flush=True)
    go_on_at(opt, meta, args.lr)
    clips = load_clips(Path(args.data) / "videos" / "train", args.max_frames)
    progress = RunProgress(run, meta, args, lambda rows: {
        "psnr_fused": _psnr(rows[:, 0]), "psnr_p": _psnr(rows[:, 1]), "psnr_warp": _psnr(rows[:, 2])})
    net.train()
    while meta["step"] < args.steps:
        i = meta["step"]
        rng = random.Random(args.seed * 1_000_003 + i)
        frames = sample_batch(clips, args.batch, args.crop, rng)
        level = rng.uniform(2, 5)
        plevel = max(0.0, level - rng.choice((2, 3, 4, 5)))
        with torch.no_grad():
            decoded = [decoded_keyframe(anchor, frames[:, j], level if j == 0 else plevel) for j in range(3)]
        reference, loss, row = decoded[0], 0.0, np.zeros(3)
        for j in (1, 2):
            with torch.no_grad():
                reference = motion_compensated(reference, frames[:, j])
            fused = net(decoded[j], reference, plevel, level)
            error = F.mse_loss(fused, frames[:, j])
            loss = loss + error
            row += [error.item(), F.mse_loss(decoded[j], frames[:, j]).item(),
                    F.mse_loss(reference, frames[:, j]).item()]
            reference = quantize_uint8(fused.detach())  # clamped to [0, 1] there
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        meta["step"] = i + 1
        progress.step_done(tuple(row / 2), {"fusion": net}, {"opt": opt})


if __name__ == "__main__":
    main()
