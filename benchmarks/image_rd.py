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
see ``metrics.bd_rate``) compare ulbc's own monotone envelope with each best-baseline
curve on PSNR, MS-SSIM and VMAF, both restricted to ``[--min-bpp, --max-bpp]`` plus the
nearest point outside each end. Without ulbc (``--no-ulbc``), best-webp and best-avif
are compared with best-jpeg instead. ulbc's envelope is taken over its downscale variants
the same way as a baseline's.

Outputs in OUT: ``points.csv`` / ``points.json`` (one row per image x codec setting,
with the configuration and library versions in the JSON), ``curves.json`` (averaged
curves and envelopes), ``rd_<metric>.png`` (log-rate RD plots) and ``summary.md`` (also
printed to stdout).

The measuring and curve rules (metrics, averaging, envelopes, windows, BD-rates, plots)
are ``ulbcodec.evaluate``'s, shared with ``ulbc eval``; this script keeps its own sweep
(stopping on the mean rate over all images) and report.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import multiprocessing
import platform
import sys
from collections import defaultdict
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from ulbcodec import baselines, metrics
from ulbcodec.evaluate import HIGHER_IS_BETTER  # noqa: F401  (benchmarks/generative.py reads it here)
from ulbcodec.evaluate import (ULBC, LABELS, average_curves as _average_curves, bd_cell, family_envelopes,
                               image_scores, plot as _plot, timed_round_trip)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm"}
METRICS = ("psnr", "ms_ssim", "vmaf", "log_spectrum_error")
BD_METRICS = ("psnr", "ms_ssim", "vmaf")


# ----------------------------------------------------------------------------- measuring


def list_images(folder: str, count: int = 0) -> list[str]:
    """The images in ``folder`` (by suffix), sorted by name; the first ``count`` when it is > 0."""
    paths = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:count] if count else paths


@functools.lru_cache(maxsize=None)
def load_image(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def measure(ref: np.ndarray, stream: bytes, decoded: np.ndarray) -> dict:
    """Rate and every metric of one coded image (MS-SSIM is NaN below its minimum size)."""
    return {"bytes": len(stream), "bpp": baselines.bpp(stream, ref.shape), **image_scores(ref, decoded, METRICS)}


def _coded_row(path: str, curve: str, codec: str, downscale: int, setting: int, encode, decode) -> dict:
    ref = load_image(path)
    stream, decoded, encode_s, decode_s = timed_round_trip(lambda: encode(ref), decode)
    return {"image": Path(path).name, "curve": curve, "codec": codec, "downscale": downscale, "setting": setting,
            **measure(ref, stream, decoded), "encode_s": encode_s, "decode_s": decode_s}


def run_variant(codec: str, downscale: int, qualities: list[int], image_paths: list[str], max_bpp: float) -> list[dict]:
    """All images through one baseline variant, quality ascending, until mean bpp > max_bpp."""
    variant = baselines.Baseline(codec, downscale)
    rows = []
    for quality in sorted(qualities):
        setting_rows = [_coded_row(path, variant.name, codec, downscale, quality,
                                   lambda ref, q=quality: variant.encode(ref, q), variant.decode)
                        for path in image_paths]
        rows += setting_rows
        mean_bpp = float(np.mean([r["bpp"] for r in setting_rows]))
        print(f"  {variant.name:10s} q={quality:<3d} mean {mean_bpp:.4f} bpp", file=sys.stderr, flush=True)
        if mean_bpp > max_bpp:
            break
    return rows


def rows_from_sweep(points_json: Path, image_paths: list[str], codecs, downscales, max_bpp: float) -> list[dict]:
    """The rows ``run_baselines`` would give, taken from a larger sweep already on disk (this
    script's points.json over the same images, full grids, a higher --max-bpp): each
    variant's settings ascending, up to and including the first whose mean bpp passes
    ``max_bpp``, the rule of :func:`run_variant`. Saves coding them again (AVIF at speed 0
    is the slowest codec here)."""
    stored = json.loads(Path(points_json).read_text())
    config, names = stored["config"], sorted(Path(p).name for p in image_paths)
    if config.get("quick") or config.get("max_bpp", 0) < max_bpp:
        raise ValueError(f"{points_json}: a --quick sweep or one that stops below {max_bpp} bpp cannot stand in")
    by_variant = defaultdict(lambda: defaultdict(list))
    for row in stored["points"]:
        if row["codec"] in codecs and row["downscale"] in downscales:
            by_variant[row["codec"], row["downscale"]][row["setting"]].append(row)
    rows = []
    for codec in codecs:
        for downscale in downscales:
            settings = by_variant[codec, downscale]
            for quality in sorted(settings):
                if sorted(r["image"] for r in settings[quality]) != names:
                    raise ValueError(f"{points_json}: {codec}@1/{downscale} q{quality} was run on other images")
                rows += settings[quality]
                if np.mean([r["bpp"] for r in settings[quality]]) > max_bpp:
                    break
    return rows


def _run_variant_task(task: tuple) -> list[dict]:
    return run_variant(*task)


def run_baselines(image_paths, codecs, downscales, quick: bool, max_bpp: float, jobs: int) -> list[dict]:
    tasks = []
    for codec in codecs:
        grid = list(baselines.QUALITIES[codec])
        if quick:
            grid = grid[::2]
        tasks += [(codec, f, grid, image_paths, max_bpp) for f in downscales]
    if jobs <= 1:
        return [row for task in tasks for row in _run_variant_task(task)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return [row for rows in pool.imap_unordered(_run_variant_task, tasks) for row in rows]


_worker: dict = {}


def _load_codec_in_worker(model: str) -> None:
    import torch

    from ulbcodec.image import ImageCodec

    torch.set_num_threads(1)  # the processes are the parallelism
    _worker["codec"] = ImageCodec.from_pretrained(model)


def _with_worker_codec(task: tuple) -> list[dict]:
    fn, *args = task
    return fn(_worker["codec"], *args)


def map_images(model: str, fn, tasks: list[tuple], jobs: int) -> list[list[dict]]:
    """``[fn(codec, *task) for task in tasks]`` with the ulbc model ``model`` loaded once
    per process: in this process for ``jobs=1``, else in ``jobs`` worker processes of
    one torch thread each (results in task order). ``fn`` must be a module-level function."""
    if jobs <= 1:
        from ulbcodec.image import ImageCodec

        codec = ImageCodec.from_pretrained(model)
        return [fn(codec, *task) for task in tasks]
    with multiprocessing.get_context("spawn").Pool(jobs, _load_codec_in_worker, (model,)) as pool:
        return pool.map(_with_worker_codec, [(fn, *task) for task in tasks], chunksize=1)


def _ulbc_rows(codec, path: str, downscale: int) -> list[dict]:
    # like the baselines: ulbc@1/f codes a 1/f-size image (the .ulb header records f)
    curve = ULBC if downscale == 1 else f"{ULBC}@1/{downscale}"
    return [_coded_row(path, curve, ULBC, downscale, level,
                       lambda ref, lv=level: codec.encode(ref, rate_level=lv, downscale=downscale).data, codec.decode)
            for level in codec.rate_levels]


def run_ulbc(model: str, image_paths: list[str], downscales=(1, 2, 4), jobs: int = 1) -> list[dict]:
    try:
        from ulbcodec.image import ImageCodec

        ImageCodec.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - say why, and how to run without it
        sys.exit(f"cannot load ulbc model {model!r}: {e}\nRun with --no-ulbc for the baselines alone.")
    tasks = [(path, f) for f in downscales for path in image_paths]
    rows = [row for rows in map_images(model, _ulbc_rows, tasks, jobs) for row in rows]
    rows.sort(key=lambda r: (r["downscale"], r["setting"], r["image"]))  # the order of a serial run
    for f in downscales:
        curve = ULBC if f == 1 else f"{ULBC}@1/{f}"
        for level in sorted({r["setting"] for r in rows if r["curve"] == curve}):
            mean_bpp = np.mean([r["bpp"] for r in rows if r["setting"] == level and r["curve"] == curve])
            print(f"  {curve:10s} level={level:<3d} mean {mean_bpp:.4f} bpp", file=sys.stderr, flush=True)
    return rows


# ----------------------------------------------------------------------------- curves (rules in ulbcodec.evaluate)


def average_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """``{curve: [point]}``: per setting, the mean rate and metrics over all images."""
    return _average_curves(rows, METRICS, item_key="image")


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
