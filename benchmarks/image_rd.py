"""Rate-distortion benchmark of ulbc against classical image codecs at ultra-low rates.

    PYTHONPATH=src python benchmarks/image_rd.py --images DIR --out OUT [--no-ulbc]

For every image in DIR it codes
  * every baseline variant of ``ulbcodec.baselines`` -- {jpeg, webp, avif} x downscale
    {1, 2, 4, 8} -- over that codec's quality grid, lowest quality first, until the mean
    rate over the images passes ``--max-bpp`` (that first setting above is kept so the
    curves bracket the range), and
  * ulbc (``ulbcodec.image.ImageCodec``) at each of its rate levels, at full size and
    in its own downscale mode (``ulbc@1/2``, ``ulbc@1/4``: the .ulb file records the
    factor and the decoder upsamples), treated like the baselines' variants,
and measures the rate from the real bytes (``len(stream) * 8 / original pixels``) and
PSNR, MS-SSIM, VMAF and the log-spectrum error (protocols in ``ulbcodec.metrics``).

Curves are averaged per setting: for each variant and quality (or ulbc rate level) the
mean rate and the mean of each metric over all images form one point. A baseline's
"best" curve (``best-avif`` etc.) is the monotone upper envelope of all its downscale
variants' points: at each rate, the best quality any variant reaches at that rate or
less. This is the Pareto front, not the convex hull: an interpolation between two
variants is not something one image's encoder can deliver. BD-rates (PCHIP, log rate,
see ``ulbcodec.eval.rd.bd_rate``) compare ulbc's own monotone envelope with each best-baseline
curve on PSNR, MS-SSIM and VMAF, both restricted to ``[--min-bpp, --max-bpp]`` plus the
nearest point outside each end. Without ulbc (``--no-ulbc``), best-webp and best-avif
are compared with best-jpeg instead. ulbc's envelope is taken over its downscale variants
the same way as a baseline's.

Outputs in OUT: ``points.csv`` / ``points.json`` (one row per image x codec setting,
with the configuration and library versions in the JSON), ``curves.json`` (averaged
curves and envelopes), ``rd_<metric>.png`` (log-rate RD plots) and ``summary.md`` (also
printed to stdout).

The measuring and curve rules (metrics, averaging, envelopes, windows, BD-rates, plots)
are ``ulbcodec.eval``'s, shared with ``ulbc eval``; this script keeps its own sweep
(stopping on the mean rate over all images) and report.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from PIL import Image

from ulbcodec import baselines, metrics
from ulbcodec.eval import ULBC
from ulbcodec.eval.image_sweep import (IMAGE_SUFFIXES, METRICS, average_curves, list_images, load_image, run_baselines,
                                       run_ulbc)
from ulbcodec.eval.rd import bd_cell, family_envelopes
from ulbcodec.eval.report import plot as _plot
from ulbcodec.eval.scoring import LABELS

BD_METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg", "ssimulacra2", "butteraugli")


# ----------------------------------------------------------------------------- plots


def plot(curves: dict[str, list[dict]], metric: str, lo: float, hi: float, path: Path) -> None:
    _plot(curves, metric, lo, hi, path, ylabel=LABELS[metric],
          title=f"{LABELS[metric]} vs rate, mean over images (thin: variants, bold: envelopes)")


# ----------------------------------------------------------------------------- outputs


def summary_markdown(curves, rows, args, have_ulbc: bool) -> str:
    lo, hi = args.min_bpp, args.max_bpp
    n_images = len({r["image"] for r in rows})
    lines = [
        f"# Image RD benchmark: {n_images} images from `{args.images}`",
        "",
        f"Rates are real stream bytes x 8 / original pixels. BD-rates use PCHIP over log10 rate on the "
        f"monotone envelopes of the per-setting mean curves, restricted to {lo:g}-{hi:g} bpp (plus the nearest "
        f"point outside each end). MS-SSIM on RGB, raw values; VMAF vmaf_v0.6.1 on BT.709 limited-range "
        f"yuv420p, one still frame (identical images score ~97.4).",
        "",
    ]
    if have_ulbc:
        tests, anchors = [ULBC], [f"best-{c}" for c in args.codecs]
        lines.append("## BD-rate of ulbc against the best variant of each baseline (negative: ulbc needs fewer bits)")
    else:
        tests, anchors = [f"best-{c}" for c in args.codecs if c != "jpeg"], ["best-jpeg"]
        lines.append("## BD-rate of the best WebP / AVIF variants against the best JPEG variant (no ulbc run)")
    envelopes = {m: family_envelopes(curves, m, lo, hi) for m in BD_METRICS}
    lines += ["", "| test | anchor | " + " | ".join(LABELS[m].split(" [")[0] for m in BD_METRICS) + " |",
              "|---|---|" + "---|" * len(BD_METRICS)]
    for test in tests:
        for anchor in anchors:
            if test == anchor or anchor not in envelopes[BD_METRICS[0]]:
                continue
            cells = [bd_cell(envelopes[m][anchor], envelopes[m][test], m) for m in BD_METRICS]
            lines.append(f"| {test} | {anchor} | " + " | ".join(cells) + " |")
    lines += ["", "## Rate range reached (mean bpp over images)", "",
              "| curve | lowest bpp (setting) | highest bpp (setting) | settings run |",
              "|---|---|---|---|"]
    for name, points in sorted(curves.items()):
        low, high = min(points, key=lambda p: p["bpp"]), max(points, key=lambda p: p["bpp"])
        lines.append(f"| {name} | {low['bpp']:.4f} ({low['setting']}) | {high['bpp']:.4f} ({high['setting']}) "
                     f"| {len(points)} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows, curves, args, have_ulbc: bool) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["image", "curve", "codec", "downscale", "setting", "bytes", "bpp", *METRICS, "encode_s", "decode_s"]
    with open(out / "points.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    versions = {pkg: metadata.version(pkg) for pkg in ("numpy", "pillow", "torch", "pytorch-msssim", "imageio-ffmpeg")}
    environment = {"python": platform.python_version(), **versions, "ffmpeg": metrics.ffmpeg_exe()}
    (out / "points.json").write_text(json.dumps({"config": vars(args), "environment": environment, "points": rows},
                                                indent=1, default=str))
    envelopes = {m: family_envelopes(curves, m, args.min_bpp, args.max_bpp) for m in METRICS}
    (out / "curves.json").write_text(json.dumps({"curves": curves, "envelopes": envelopes}, indent=1))
    for metric in METRICS:
        plot(curves, metric, args.min_bpp, args.max_bpp, out / f"rd_{metric}.png")
    summary = summary_markdown(curves, rows, args, have_ulbc)
    (out / "summary.md").write_text(summary)
    return summary


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="directory of test images (png/jpg/webp/...)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--ulbc-model", default="default", help="ImageCodec.from_pretrained name or path")
    parser.add_argument("--no-ulbc", action="store_true", help="run the baselines only")
    parser.add_argument("--max-bpp", type=float, default=0.15, help="upper end of the evaluated rate range")
    parser.add_argument("--min-bpp", type=float, default=0.005, help="lower end of the evaluated rate range")
    parser.add_argument("--quick", action="store_true", help="every second quality of each baseline grid")
    parser.add_argument("--codecs", default=",".join(baselines.CODECS), help="comma-separated baseline codecs")
    parser.add_argument("--downscales", default=",".join(map(str, baselines.DOWNSCALES)),
                        help="comma-separated downscale factors")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes: ulbc (one per image and downscale) and the baselines (one per variant)")
    args = parser.parse_args(argv)
    args.codecs = [c for c in args.codecs.split(",") if c]
    args.downscales = [int(f) for f in args.downscales.split(",") if f]
    if not 0 < args.min_bpp < args.max_bpp:
        parser.error("need 0 < --min-bpp < --max-bpp")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    paths = list_images(args.images)
    if not paths:
        sys.exit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args.images}")
    small = [Path(p).name for p in paths if min(load_image(p).shape[:2]) < metrics.MS_SSIM_MIN_SIDE]
    if small:
        print(f"note: MS-SSIM is undefined (NaN) for images under {metrics.MS_SSIM_MIN_SIDE} px: {small}",
              file=sys.stderr)
    have_ulbc = not args.no_ulbc
    rows = run_ulbc(args.ulbc_model, paths, jobs=args.jobs) if have_ulbc else []
    rows += run_baselines(paths, args.codecs, args.downscales, args.quick, args.max_bpp, args.jobs)
    summary = write_outputs(rows, average_curves(rows), args, have_ulbc)
    print(summary)


if __name__ == "__main__":
    main()
