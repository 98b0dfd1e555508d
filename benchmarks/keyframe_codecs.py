"""Two packages' anchor codecs as keyframe codecs: bpp, PSNR and MS-SSIM of the first frame
of validation clips, anchor-only, at every rate level, and the BD-rate of the second
package's against the first's (how models/video's keyframe codec was chosen).

    PYTHONPATH=src python benchmarks/keyframe_codecs.py /tmp/video-old video [--clips DIR] [--names bikes city-a]

Clips under 161 px on a side are skipped (MS-SSIM's five scales need that size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ulbcodec.eval.rd import bd_rate
from ulbcodec.image import ImageCodec
from ulbcodec.metrics import ms_ssim, psnr
from ulbcodec.train.video_data import read_frames


def curve(codec: ImageCodec, frame: np.ndarray) -> list[tuple[float, float, float]]:
    """(bpp of the entropy-coded anchor, PSNR, MS-SSIM) at each of the codec's rate levels."""
    h, w = frame.shape[:2]
    points = []
    for level in codec.rate_levels:
        payload = codec.encode_anchor(frame, level)
        decoded = codec.decode_anchor(payload, w, h, level, anchor_only=True)
        bits = 8 * (len(payload.y_string) + len(payload.z_string))
        points.append((bits / (h * w), psnr(frame, decoded), ms_ssim(frame, decoded)))
    return points


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("anchor_model", help="the package compared against (name or path)")
    p.add_argument("test_model", help="the package tested (name or path)")
    p.add_argument("--clips", type=Path, default=Path.home() / ".cache/ulbc/videos/val")
    p.add_argument("--names", nargs="+", default=["bikes", "city-a", "pan-Path-256x256"])
    args = p.parse_args(argv)
    codecs = [ImageCodec.from_pretrained(m) for m in (args.anchor_model, args.test_model)]
    print("| clip | level | anchor: bpp / PSNR / MS-SSIM | test: bpp / PSNR / MS-SSIM |")
    print("|---|---|---|---|")
    summary = []
    for name in args.names:
        frame = next(iter(read_frames(args.clips / f"{name}.mkv")))
        if min(frame.shape[:2]) < 161:
            print(f"| {name} | skipped: under 161 px | | |")
            continue
        old, new = (curve(c, frame) for c in codecs)
        for level, a, b in zip(codecs[0].rate_levels, old, new):
            print(f"| {name} | {level} | {a[0]:.4f} / {a[1]:.2f} / {a[2]:.3f} | {b[0]:.4f} / {b[1]:.2f} / {b[2]:.3f} |")
        summary.append((name, *(bd_rate([q[0] for q in old], [q[i] for q in old], [q[0] for q in new],
                                        [q[i] for q in new]) for i in (1, 2))))
    print("\n| clip | BD-rate PSNR | BD-rate MS-SSIM |\n|---|---|---|")
    for name, d_psnr, d_msssim in summary:
        print(f"| {name} | {d_psnr:+.1f}% | {d_msssim:+.1f}% |")


if __name__ == "__main__":
    main()
