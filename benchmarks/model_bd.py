"""BD-rate of one image model against another from two ``benchmarks/color_stats.py --out``
files (same photos and levels): per photograph over the levels, then the mean, for the
files as ``ulbc encode`` writes them (with the ``colr`` chunk; ``--variant off``: without).

    PYTHONPATH=src python benchmarks/model_bd.py ANCHOR_POINTS.json TEST_POINTS.json [--variant on|off]
"""

from __future__ import annotations

import argparse
import json

from ulbcodec.eval.rd import bd_rate

METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg", "ssimulacra2")


def curves(path: str, variant: str) -> dict[str, list[dict]]:
    by_image: dict[str, list[dict]] = {}
    for point in json.load(open(path))["points"]:
        by_image.setdefault(point["image"], []).append(point[variant])
    return {image: sorted(points, key=lambda p: p["bpp"]) for image, points in by_image.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("anchor")
    p.add_argument("test")
    p.add_argument("--variant", choices=("on", "off"), default="on")
    args = p.parse_args(argv)
    anchor, test = curves(args.anchor, args.variant), curves(args.test, args.variant)
    images = sorted(set(anchor) & set(test))
    print("| photo | " + " | ".join(METRICS) + " |\n|---" * 1 + "|---" * len(METRICS) + "|")
    means = {m: [] for m in METRICS}
    for image in images:
        a, t = anchor[image], test[image]
        cells = []
        for m in METRICS:
            value = bd_rate([q["bpp"] for q in a], [q[m] for q in a], [q["bpp"] for q in t], [q[m] for q in t])
            means[m].append(value)
            cells.append(f"{value:+.1f}%")
        print(f"| {image} | " + " | ".join(cells) + " |")
    print("| mean | " + " | ".join(f"{sum(v) / len(v):+.1f}%" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
