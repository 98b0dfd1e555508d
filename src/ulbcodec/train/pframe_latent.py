"""Train the temporal latent prior of the latent-conditional P frames (resumable, CPU) and
add it to a video package.

Recipe (docs/training.md has the reasoning and the measured cost):

- the video package's keyframe codec is used as it is, without gradients; only the
  :class:`~ulbcodec.models.latent_conditional_codec.TemporalLatentPrior` trains, which
  starts where a P frame codes exactly as a keyframe;
- data: the training clips and samples of :mod:`ulbcodec.train.pframe` (three frames
  ``t, t+s, t+2s``, random crops, flips, time reversal, a third of them darkened);
- the reference of frame ``t+s`` is frame ``t`` *as the keyframe codec decodes it* at the
  batch's rate level, on uint8 levels, and half the time warped along the mesh motion that
  predicts the target best (the encoder tries both); frame ``t+2s`` is coded the same way
  from frame ``t+s``: a P frame decodes exactly as a keyframe at its level would, so a
  keyframe's decode stands in for a decoded P frame;
- the loss is the rate alone: the exact bits of the y symbols a file would hold (the
  decoded frame does not depend on the prior, so there is no trade to collapse);
- every batch draws a rate level, fractional ones included;
- a checkpoint (safetensors + JSON) every ``--save-every`` seconds; the same command resumes.

``--validate`` codes frame t+1 of validation clips given the keyframe codec's decode of
frame t, with real entropy coding, and prints its bytes beside the keyframe codec's own
bytes for that frame (the P frame's saving) at every level.

``--export DIR`` writes ``--video-model``'s package with the prior as its component
``pframe``, every other component unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ulbcodec import packages
from ulbcodec.models.latent_conditional_codec import LatentConditionalCodec, TemporalLatentPrior
from ulbcodec.train.anchor import round_parameters_to_half
from ulbcodec.train.generative import load_stage, save_stage
from ulbcodec.train.pframe import (MIN_SIDE, VALIDATION_CLIPS, RunProgress, add_run_arguments, go_on_at,
                                   load_clips, motion_compensated, quantize_uint8, sample_batch, start_run, take_step,
                                   training_record)


def keyframe_codec(video_model: str):
    """The video package's keyframe codec (float32, eval mode, frozen) and the package."""
    package = packages.ModelPackage.load_manifest(packages.resolve(video_model))
    anchor = package.build("anchor_codec").float().eval().requires_grad_(False)
    return anchor, package


@torch.no_grad()
def decoded_keyframe(anchor, x: torch.Tensor, level: float) -> torch.Tensor:
    """``x`` as the keyframe codec decodes it at ``level`` (eval mode rounds y and z as the
    file does), on uint8 levels."""
    return quantize_uint8(anchor(x, rate_level=level, with_bypass=False)["anchor_frame"])


@torch.no_grad()
def validate(codec: LatentConditionalCodec, folder: Path, frames: int = 3) -> None:
    """One JSON line per (clip, level): frame t+1 coded given the keyframe decode of frame t
    (t = 0..frames-2), its bytes against the keyframe codec's for the same frame (the
    decoded frames are the same)."""
    from ulbcodec.image import pad_replicate, to_tensor
    from ulbcodec.train.video_data import read_frames

    anchor = codec.keyframe_codec
    for name in VALIDATION_CLIPS:
        path = folder / f"{name}.mkv"
        if not path.exists():
            continue
        clip = [pad_replicate(to_tensor(f), codec.required_multiple)
                for _, f in zip(range(frames), read_frames(path))]
        for level in range(codec.num_rate_levels):
            rows = []
            for ref, target in zip(clip, clip[1:]):
                coded = codec.compress(target, decoded_keyframe(anchor, ref, level), level)
                intra = anchor.compress(target, rate_level=level)
                rows.append((sum(len(s) for s in coded["strings"]), sum(len(s[0]) for s in intra["strings"])))
            conditional, keyframe = np.mean(rows, 0)
            print(json.dumps({"clip": name, "level": level, "bytes": round(float(conditional), 1),
                              "keyframe_bytes": round(float(keyframe), 1),
                              "ratio": round(float(conditional / keyframe), 3)}), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the ulbc temporal latent prior (latent-conditional P frames; "
                                            "resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/pframe-latent")
    p.add_argument("--video-model", default="video", help="package whose keyframe codec the prior is for, "
                                                          "and which the export adds it to")
    p.add_argument("--export", default=None)
    p.add_argument("--validate", action="store_true", help="measure the checkpoint on validation clips and stop")
    p.add_argument("--steps", type=int, default=None,
                   help="train up to this step (without it: only --validate or --export the checkpoint)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=MIN_SIDE)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--width", type=int, default=64, help="hidden channels of the prior's networks")
    p.add_argument("--decoded-context", action="store_true",
                   help="a prior that also sees the parts decoded before each one (TemporalLatentPrior)")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this package's prior (with --decoded-context: extended to the "
                        "decoded parts, its outputs unchanged at the start)")
    add_run_arguments(p)
    args = p.parse_args(argv)
    run = start_run(args)
    anchor, package = keyframe_codec(args.video_model)
    init, state = None, run / "state.json"
    if state.exists():  # resumed: the run's own architecture
        prior = TemporalLatentPrior.from_config(json.loads(state.read_text())["config"])
    elif args.init_from:  # a new run from a package's prior
        source = packages.ModelPackage.load_manifest(packages.resolve(args.init_from))
        prior = source.build("pframe").float()
        if args.decoded_context and not prior.decoded_context:
            prior = TemporalLatentPrior.with_decoded_context(prior)
        init = {"package": args.init_from, "digest": source.digest,
                "steps": source.extra.get("pframe_training", {}).get("steps")}
        print(f"initialised from {args.init_from} ({init['steps']} steps)", flush=True)
    else:
        prior = TemporalLatentPrior(anchor.M, anchor.num_slices, args.width, decoded_context=args.decoded_context)
    codec = LatentConditionalCodec(anchor, prior)
    opt = torch.optim.Adam(prior.parameters(), lr=args.lr)
    meta = {"step": 0, "seconds": 0.0, "log": [], "done": False, "config": prior.config,
            "video_model": args.video_model, "keyframe_codec_digest": package.digest[:16],
            **({"init_from": init} if init else {})}
    if state.exists():
        meta = {**meta, **load_stage(run, {"prior": prior}, {}, {"opt": opt})}
        print(f"resumed at step {meta['step']}", flush=True)
    if args.validate:
        return validate(codec, Path(args.data) / "videos" / "val")
    if args.steps is None and not args.export:
        p.error("nothing to do: give --steps, --validate or --export")
    if args.steps is not None and meta["step"] < args.steps:
        go_on_at(opt, meta, args.lr)
        clips = load_clips(Path(args.data) / "videos" / "train", args.max_frames)
        print(f"{len(clips)} clips, {sum(c.shape[0] for c in clips)} frames", flush=True)
    progress = RunProgress(run, meta, args, lambda rows: {
        "bpp": round(float(rows[:, 0::2].mean()), 5), "keyframe_bpp": round(float(rows[:, 1::2].mean()), 5)})
    prior.train()
    top = codec.num_rate_levels - 1
    pixels = args.batch * args.crop**2
    while args.steps is not None and meta["step"] < args.steps:
        i = meta["step"]
        rng = random.Random(args.seed * 1_000_003 + i)
        frames = sample_batch(clips, args.batch, args.crop, rng)
        level = rng.randrange(top + 1) if rng.random() < 0.7 else rng.uniform(0, top)
        loss, row = 0.0, []
        for j in (1, 2):
            ref = decoded_keyframe(anchor, frames[:, j - 1], level)
            if rng.random() < 0.5:
                ref = motion_compensated(ref, frames[:, j])
            bits, keyframe_bits = codec.rates(frames[:, j], ref, level)
            loss = loss + bits / pixels
            row += [bits.item() / pixels, keyframe_bits.item() / pixels]
        take_step(opt, loss, prior, meta)
        progress.step_done(tuple(row), {"prior": prior}, {"opt": opt})
    if args.export:
        export(prior.eval(), package, meta, args)


def export(prior: TemporalLatentPrior, package, meta: dict, args) -> None:
    round_parameters_to_half(prior)  # stored as float16
    training = training_record("ulbcodec.train.pframe_latent", meta, args)
    base = package.description.split("; conditional P-frame codec")[0].split("; P frames:")[0]
    pkg = packages.save_derived_package(package, args.export, {"pframe": prior}, {"pframe_training": training},
                                        description=base + "; P frames: the keyframe codec under a temporal latent "
                                                           "prior trained by ulbcodec.train.pframe_latent")
    print(json.dumps({"exported": str(pkg.root), "digest": pkg.digest[:16], "MB": pkg.size_bytes / 1e6}))


if __name__ == "__main__":
    main()
