"""Decoding speed of a video package on a crop of a clip: each level's file is encoded once
(P frames only), then decoded in this process at each thread count, best of N.

    PYTHONPATH=src python benchmarks/video_decode_speed.py ~/.cache/ulbc/videos/val/bikes.mkv \
        --crop 192 52 256 256 --frames 12 --levels 3 4 --threads 1 2

Issue 23 asks for >= 10 frames/s at 256x256 on 2 cores of an AVX2-only CPU; stop other jobs
first (the figures are wall time).
"""

from __future__ import annotations

import argparse
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ulbcodec.train.video_data import read_frames
from ulbcodec.video import VideoCodec, VideoSettings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("clip", type=Path)
    p.add_argument("--crop", type=int, nargs=4, metavar=("X", "Y", "W", "H"), default=None)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--levels", type=int, nargs="+", default=[3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default="video")
    args = p.parse_args(argv)
    frames = []
    for frame in read_frames(args.clip, stop=args.frames):
        if args.crop:
            x, y, w, h = args.crop
            frame = frame[y : y + h, x : x + w]
        frames.append(np.ascontiguousarray(frame))
    h, w = frames[0].shape[:2]
    codec = VideoCodec.from_pretrained(args.model)
    torch.set_num_threads(1)
    files = {level: codec.encode(iter(frames), Fraction(25), VideoSettings(rate_level=level, predictor=False))
             for level in args.levels}
    print(f"{args.clip.name} {w}x{h}, {len(frames)} frames, model {args.model}\n")
    print("| level | frame types | bpp | threads | frames/s (best of %d) |" % args.repeat)
    print("|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for level, (data, gops) in files.items():
            best = min(_seconds(lambda: list(codec.decode(data))) for _ in range(args.repeat))
            bpp = 8 * len(data) / (len(frames) * w * h)
            print(f"| {level} | {gops.frame_types()} | {bpp:.4f} | {threads} | {len(frames) / best:.1f} |", flush=True)


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
