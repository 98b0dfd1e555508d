"""Image quality at matched rates: a ulbc model's files against the best AVIF variant, per
photograph, at given bpp (issue 24: "MS-SSIM above the best AVIF variant on every
validation photo at 0.02, 0.035 and 0.05 bpp").

    PYTHONPATH=src python benchmarks/matched_bytes.py ULBC_POINTS.json BASELINE_POINTS.json [--metric ms_ssim]
        [--targets 0.02,0.035,0.05] [--variant on|off] [--baseline avif]

ULBC_POINTS: ``benchmarks/color_stats.py --out`` (files with the ``colr`` chunk unless
``--variant off``); BASELINE_POINTS: ``benchmarks/generative.py``'s points.json (its
baseline rows, every variant). Each side's value at a target is read off its monotone
envelope (``ulbcodec.eval.rd.envelope``), linearly in log bpp between the points around it;
a target outside a curve's span is reported as such, never extrapolated.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional

from model_bd import load_points  # the sibling script: its reader of color_stats files
from ulbcodec.eval.rd import envelope


def at_rate(points: list[dict], metric: str, bpp: float) -> Optional[float]:
    front = envelope(points, metric)
    for lo, hi in zip(front, front[1:]):
        if lo["bpp"] <= bpp <= hi["bpp"]:
            t = (math.log(bpp) - math.log(lo["bpp"])) / (math.log(hi["bpp"]) - math.log(lo["bpp"]))
            return lo[metric] + t * (hi[metric] - lo[metric])
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ulbc_points")
    p.add_argument("baseline_points")
    p.add_argument("--metric", default="ms_ssim")
    p.add_argument("--targets", default="0.02,0.035,0.05")
    p.add_argument("--variant", choices=("on", "off"), default="on")
    p.add_argument("--baseline", default="avif")
    args = p.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",")]
    ulbc: dict[str, list[dict]] = {}
    for point in load_points(args.ulbc_points, args.variant)[1]:
        ulbc.setdefault(point["item"], []).append(point)
    base: dict[str, list[dict]] = {}
    for point in json.load(open(args.baseline_points))["points"]:
        if point["codec"] == args.baseline:
            base.setdefault(point["image"], []).append(point)
    print(f"| photo | bpp | ulbc {args.metric} | best {args.baseline} {args.metric} | ulbc ahead |")
    print("|---|---|---|---|---|")
    wins = total = 0
    for image in sorted(set(ulbc) & set(base)):
        for bpp in targets:
            a, b = at_rate(ulbc[image], args.metric, bpp), at_rate(base[image], args.metric, bpp)
            if a is None or b is None:
                print(f"| {image} | {bpp} | {'outside its span' if a is None else f'{a:.4f}'} | "
                      f"{'outside its span' if b is None else f'{b:.4f}'} | n/a |")
                continue
            total += 1
            wins += a > b
            print(f"| {image} | {bpp} | {a:.4f} | {b:.4f} | {'yes' if a > b else 'no'} |")
    print(f"\nulbc ahead at {wins} of {total} (photograph, rate) points")


if __name__ == "__main__":
    main()
