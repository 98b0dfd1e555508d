"""Which of VMAF's features does the generative decode win or lose against AVIF?

    PYTHONPATH=src python benchmarks/vmaf_features.py --images DIR --points POINTS_JSON [--model generative]

A diagnostic behind the VMAF column of benchmarks/generative.py. VMAF (v0.6.1) is a
regression on elementary features: information fidelity (VIF) at four scales, the detail
loss measure (ADM) and motion (0 on a still image). For each image and rate level the ulbc
file is coded once and decoded by both decoders; against it stands the AVIF variant and
quality of POINTS_JSON (image_rd.py's or generative.py's points) with the highest VMAF at
no more bits than the ulbc file (AVIF, at matched bpp, the strongest baseline), coded
again here. It prints the mean features per level (libvmaf's own values,
:func:`ulbcodec.metrics.vmaf_features`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ulbcodec.eval.image_sweep import list_images, load_image

FEATURES = ("integer_vif_scale0", "integer_vif_scale1", "integer_vif_scale2", "integer_vif_scale3",
            "integer_adm2", "vmaf")
HEADERS = ("VIF 0", "VIF 1", "VIF 2", "VIF 3", "ADM", "VMAF")


def best_avif_under(points: list[dict], image: str, max_bpp: float) -> dict | None:
    """The AVIF point of ``image`` with the highest VMAF at ``max_bpp`` or fewer bits."""
    under = [p for p in points if p["image"] == image and p["codec"] == "avif" and p["bpp"] <= max_bpp]
    return max(under, key=lambda p: p["vmaf"], default=None)


def features(model: str, paths: list[str], levels: list[int], points: list[dict]) -> list[dict]:
    from ulbcodec import baselines, metrics
    from ulbcodec.image import ImageCodec

    codec = ImageCodec.from_pretrained(model)
    rows = []
    for path in paths:
        ref, name = load_image(path), Path(path).name
        for level in levels:
            stream = codec.encode(ref, rate_level=level).data
            bpp = baselines.bpp(stream, ref.shape)
            avif = best_avif_under(points, name, bpp)
            decoded = {"anchor-only": codec.decode(stream, anchor_only=True), "generative": codec.decode(stream)}
            if avif is not None:
                variant = baselines.Baseline("avif", avif["downscale"])
                decoded["best AVIF at ≤ bpp"] = variant.decode(variant.encode(ref, avif["setting"]))
            for decoder, image in decoded.items():
                rows.append({"image": name, "level": level, "bpp": bpp, "decoder": decoder,
                             **{k: v for k, v in metrics.vmaf_features(ref, image).items() if k in FEATURES}})
            print(f"  {name} level {level}: {bpp:.4f} bpp", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], levels: list[int]) -> str:
    lines = ["| level | mean bpp | decoder | images | " + " | ".join(HEADERS) + " |",
             "|---" * (4 + len(HEADERS)) + "|"]
    for level in levels:
        at_level = [r for r in rows if r["level"] == level]
        bpp = np.mean([r["bpp"] for r in at_level if r["decoder"] == "generative"])
        for decoder in dict.fromkeys(r["decoder"] for r in at_level):
            group = [r for r in at_level if r["decoder"] == decoder]
            means = " | ".join(f"{np.mean([r[f] for r in group]):.{1 if f == 'vmaf' else 3}f}" for f in FEATURES)
            lines.append(f"| {level} | {bpp:.4f} | {decoder} | {len(group)} | {means} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True)
    p.add_argument("--points", required=True, help="points.json of image_rd.py or generative.py over the same images")
    p.add_argument("--model", default="generative")
    p.add_argument("--levels", default="0,1,2,3")
    p.add_argument("--count", type=int, default=0, help="use the first N images (0: all)")
    args = p.parse_args(argv)
    paths = list_images(args.images, args.count)
    levels = [int(v) for v in args.levels.split(",")]
    points = json.loads(Path(args.points).read_text())["points"]
    rows = features(args.model, paths, levels, points)
    print(f"model `{args.model}`, {len(paths)} images; libvmaf's features of vmaf_v0.6.1 (mean over images; "
          "the AVIF row counts the images where some AVIF point fits under the ulbc file's bpp)")
    print()
    print(table(rows, levels))


if __name__ == "__main__":
    main()
