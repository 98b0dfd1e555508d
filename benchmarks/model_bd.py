"""BD-rate of one ulbc model (or setting) against another, per item and averaged, from two
benchmark point files of the same items:

* ``benchmarks/color_stats.py --out`` files (images): the files as ``ulbc encode`` writes
  them (with the ``colr`` chunk; ``--variant off``: without);
* ``benchmarks/video_rd.py`` points.json files (clips): the rows of ``--codec``
  (default ``ulbc-no-predictor``, P frames only).

    PYTHONPATH=src python benchmarks/model_bd.py ANCHOR_POINTS.json TEST_POINTS.json... [--variant on|off] [--codec C]
                                                 [--anchor-codec C2]

Each item's curves are its monotone envelopes and the mean is over the items where they
overlap: ``ulbcodec.eval.rd``'s protocol, as in every other BD-rate of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json

from ulbcodec.eval.rd import bd_cell, envelope, mean_bd_rate

METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg", "ssimulacra2")


def load_points(path: str, variant: str = "on", codec: str = "ulbc-no-predictor") -> tuple[str, list[dict]]:
    """("photo" or "clip", every point of one model in a benchmark file, each with its ``item``)."""
    data = json.load(open(path))
    if "points" in data:  # benchmarks/color_stats.py
        return "photo", [{**p[variant], "item": p["image"]} for p in data["points"]]
    return "clip", [{**r, "item": r["clip"]} for r in data["rows"] if r["codec"] == codec]  # benchmarks/video_rd.py


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("anchor")
    p.add_argument("test", nargs="+", help="one file, or several of different items (e.g. clips split over processes)")
    p.add_argument("--variant", choices=("on", "off"), default="on", help="color_stats files: with or without colr")
    p.add_argument("--codec", default="ulbc-no-predictor", help="video_rd files: the curve compared")
    p.add_argument("--anchor-codec", default=None,
                   help="video_rd files: the anchor file's curve, when it is another codec's (e.g. x265)")
    args = p.parse_args(argv)
    kind, anchor = load_points(args.anchor, args.variant, args.anchor_codec or args.codec)
    test = [q for path in args.test for q in load_points(path, args.variant, args.codec)[1]]
    metrics = [m for m in METRICS if all(m in q for q in anchor + test)]
    rows = [{**q, "codec": "anchor"} for q in anchor] + [{**q, "codec": "test"} for q in test]
    print(f"| {kind} | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    for item in sorted({q["item"] for q in anchor} & {q["item"] for q in test}):
        cells = [bd_cell(envelope([q for q in anchor if q["item"] == item], m),
                         envelope([q for q in test if q["item"] == item], m), m) for m in metrics]
        print(f"| {item} | " + " | ".join(cells) + " |")
    means = [mean_bd_rate(rows, "test", "anchor", m) for m in metrics]
    print("| mean | " + " | ".join(f"{bd.value:+.1f}%" if bd.value is not None else "n/a" for bd in means) + " |")


if __name__ == "__main__":
    main()
