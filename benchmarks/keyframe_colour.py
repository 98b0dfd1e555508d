"""Keyframes on dark content: PSNR, mean colour and contrast of the video model's keyframes
(the anchor codec of models/video, anchor-only) on the first frame of validation clips, and
the same after the published colour fix from the original's statistics (ulbcodec.color_stats).

    PYTHONPATH=src python benchmarks/keyframe_colour.py [--clips DIR] [--names city-b city-a bikes] [--levels 0 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ulbcodec.color_stats import ColorStats, color_fix
from ulbcodec.image import ImageCodec, to_tensor, to_uint8
from ulbcodec.metrics import psnr
from ulbcodec.train.video_data import read_frames


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/ulbc/videos/val")
    p.add_argument("--names", nargs="+", default=["city-b", "city-a", "bikes"])
    p.add_argument("--levels", type=int, nargs="+", default=[0, 2])
    p.add_argument("--model", default="video")
    args = p.parse_args(argv)
    codec = ImageCodec.from_pretrained(args.model)
    print("| clip | level | bpp | PSNR | with colour fix | mean RGB original | mean RGB decoded | std original / decoded |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.names:
        frame = next(iter(read_frames(args.clips / f"{name}.mkv")))
        h, w = frame.shape[:2]
        for level in args.levels:
            payload = codec.encode_anchor(frame, level)
            decoded = codec.decode_anchor(payload, w, h, level, anchor_only=True)
            fixed = to_uint8(color_fix(to_tensor(decoded), ColorStats.of_rgb(frame)))
            mean = lambda x: np.round(x.reshape(-1, 3).mean(0)).astype(int).tolist()  # noqa: E731
            print(f"| {name} | {level} | {len(payload.to_bytes()) * 8 / (w * h):.4f} | {psnr(decoded, frame):.2f} | "
                  f"{psnr(fixed, frame):.2f} | {mean(frame)} | {mean(decoded)} | {frame.std():.1f} / {decoded.std():.1f} |")


if __name__ == "__main__":
    main()
