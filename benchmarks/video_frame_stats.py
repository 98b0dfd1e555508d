"""Per-frame quality of .ulb video files against their clip: PSNR, the detail + VIF losses
(VMAF's features as the codecs train on them, losses/rate_distortion.py) and the mean
horizontal gradient over the original's (below 1: detail lost, blur). Shows where a
chain of inter frames drifts, which a clip's mean hides.

    PYTHONPATH=src python benchmarks/video_frame_stats.py ~/.cache/ulbc/videos/val/bikes.mkv \
        models/video out/bench/video-k4v-a/bikes-ulbc-no-predictor-q3-t0.0.ulb \
        [MODEL FILE ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ulbcodec.image import to_tensor
from ulbcodec.losses.rate_distortion import perceptual_terms
from ulbcodec.train.video_data import read_frames
from ulbcodec.video import VideoCodec


def _gradient(frame: np.ndarray) -> float:
    return float(np.abs(np.diff(frame.astype(np.float64).mean(2), axis=1)).mean())


def frame_stats(decoded: np.ndarray, original: np.ndarray) -> dict:
    with torch.no_grad():
        terms = float(sum(perceptual_terms(to_tensor(decoded), to_tensor(original))))
    mse = float(np.mean((decoded.astype(np.float64) - original) ** 2))
    return {"psnr": 10 * np.log10(255**2 / max(mse, 1e-10)), "detail_vif": terms,
            "gradient_ratio": _gradient(decoded) / max(_gradient(original), 1e-10)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("clip", type=Path)
    p.add_argument("pairs", nargs="+", help="MODEL FILE pairs: a package and a .ulb file it decodes")
    args = p.parse_args(argv)
    if len(args.pairs) % 2:
        p.error("give MODEL FILE pairs")
    for model, path in zip(args.pairs[0::2], args.pairs[1::2]):
        decoded = list(VideoCodec.from_pretrained(model).decode(Path(path).read_bytes()))
        originals = read_frames(args.clip, stop=len(decoded))
        rows = [frame_stats(d, o) for d, o in zip(decoded, originals)]
        print(f"{path} ({Path(path).stat().st_size} bytes, {model}): mean PSNR "
              f"{np.mean([r['psnr'] for r in rows]):.2f} dB")
        for key in ("psnr", "detail_vif", "gradient_ratio"):
            print(f"  {key:15s} " + " ".join(f"{r[key]:.3f}" if key != "psnr" else f"{r[key]:.2f}" for r in rows))


if __name__ == "__main__":
    main()
