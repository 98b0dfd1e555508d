"""Generative (next-frame) decoding vs anchor-only decoding vs AVIF / WebP, 0.005-0.06 bpp.

    PYTHONPATH=src python benchmarks/generative.py --images DIR --out OUT [--model generative]

Every ulbc file is encoded ONCE (each rate level, at full size and in the 1/2 downscale
mode) and decoded twice: by the generative decoder and with ``anchor_only=True``. Both
decodes therefore have exactly the same rate. AVIF and WebP run over their quality grids
with downscaled variants (``ulbcodec.baselines``), as in benchmarks/image_rd.py.
Metrics: PSNR, MS-SSIM, VMAF, VMAF NEG, SSIMULACRA2, butteraugli (3-norm and max) and the
detail measure (log radial power spectrum error: blur shows as missing high-frequency
energy; lower is better); per level, the block-grid measure and colour drift
(``ulbcodec.metrics``: blockiness, delta_e, color_shift).

Outputs in OUT: points.csv / points.json, rd_<metric>.png, summary.md, and a crop sheet
(original / anchor / generative / AVIF at matched bpp, per ``--sheet-bpp`` rate) written to ``--sheet``. It also
measures seams: one image decoded with the normal latent tiles and untiled.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ulbcodec.eval.image_sweep import (METRICS, average_curves, list_images, load_image, map_images, measure,
                                       rows_from_sweep, run_baselines)
from ulbcodec.eval.rd import bd_cell as bd, family_envelopes as envelopes  # the same rules as image_rd.py
from ulbcodec.eval.scoring import HIGHER_IS_BETTER, LABELS
from ulbcodec.refinement import RefineSettings

GEN, ANCHOR = "ulbc-generative", "ulbc-anchor-only"
BD_METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg", "ssimulacra2", "butteraugli", "log_spectrum_error")
# per level, anchor-only / generative (the same files)
LEVEL_METRICS = (("psnr", 2), ("ms_ssim", 4), ("vmaf", 2), ("vmaf_neg", 2), ("ssimulacra2", 2),
                 ("butteraugli", 3), ("log_spectrum_error", 2), ("blockiness", 3), ("delta_e", 2),
                 ("color_shift", 2))


def _both_decoders(codec, path: str, downscale: int, refine_steps: int = 0, levels=None) -> list[dict]:
    """Each rate level of one image: encoded once, decoded by both decoders."""
    rows, ref = [], load_image(path)
    refine = RefineSettings(steps=refine_steps) if refine_steps else None
    for level in levels or codec.rate_levels:
        stream = codec.encode(ref, rate_level=level, downscale=downscale, refine=refine).data
        for curve, anchor_only in ((GEN, False), (ANCHOR, True)):
            t0 = time.perf_counter()
            decoded = codec.decode(stream, anchor_only=anchor_only)
            seconds = time.perf_counter() - t0
            rows.append({"image": Path(path).name, "curve": curve if downscale == 1 else f"{curve}@1/{downscale}",
                         "codec": curve, "downscale": downscale, "setting": level,
                         **measure(ref, stream, decoded), "decode_s": seconds})
    return rows


def run_ulbc(model: str, image_paths, downscales=(1, 2), jobs: int = 1, refine_steps: int = 0,
             levels=None) -> list[dict]:
    from ulbcodec.image import ImageCodec

    if not ImageCodec.from_pretrained(model).is_generative:
        sys.exit(f"model {model!r} has no generative decoder")
    tasks = [(path, f, refine_steps, levels) for f in downscales for path in image_paths]
    rows = [row for rows in map_images(model, _both_decoders, tasks, jobs) for row in rows]
    rows.sort(key=lambda r: (r["downscale"], r["setting"], r["image"], r["codec"] != GEN))  # a serial run's order
    for f in downscales:
        for level in sorted({r["setting"] for r in rows}):
            mean = np.mean([r["bpp"] for r in rows if r["setting"] == level and r["downscale"] == f])
            print(f"  ulbc level {level} 1/{f}: mean {mean:.4f} bpp", file=sys.stderr, flush=True)
    return rows


def plot(curves, metric, lo, hi, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {GEN: "black", ANCHOR: "tab:orange", "webp": "tab:green", "avif": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pts in sorted(envelopes(curves, metric, lo, hi).items()):
        codec = name.removeprefix("best-")
        ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], marker="o", ms=4, lw=2 if "ulbc" in name else 1.5,
                color=colors[codec], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (real bytes / original pixels)")
    ax.set_ylabel(LABELS[metric])
    ax.axvspan(lo, hi, color="0.93", zorder=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{LABELS[metric]}: envelopes over levels and downscale variants")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_sheet(model: str, path: str, target_bpps, out: Path) -> str:
    """Per target rate, two rows of 256² crops: original / anchor-only / generative (one
    file, ``encode_to_bpp``) / AVIF (its best variant at <= that file's bpp)."""
    from ulbcodec import baselines
    from ulbcodec.image import ImageCodec

    codec = ImageCodec.from_pretrained(model)
    ref = load_image(path)
    h, w = ref.shape[:2]
    avif = []  # every AVIF variant once: (bytes, decoded, downscale, quality)
    for f in (1, 2, 4):
        for q in baselines.QUALITIES["avif"]:
            stream, dec = baselines.avif(ref, q, f)
            avif.append((len(stream), dec, f, q))
    s = 256
    crops = [(h // 2 - s // 2, w // 2 - s // 2), (h // 4, w // 8)]
    rows, notes = [], []
    for target in target_bpps:
        result, _ = codec.encode_to_bpp(ref, target, downscales=(1,))
        gen, anchor = codec.decode(result.data), codec.decode(result.data, anchor_only=True)
        fits = [v for v in avif if v[0] * 8 / (h * w) <= result.bpp]
        if fits:
            size, avif_dec, f, q = max(fits, key=lambda v: v[0])
            avif_note = f"AVIF q{q} at 1/{f} size ({size * 8 / (h * w):.4f} bpp)"
        else:
            avif_dec, avif_note = np.full_like(ref, 128), "AVIF (no variant reaches this rate: grey panel)"
        panels = [ref, anchor, gen, avif_dec]
        rows += [np.concatenate([p[y : y + s, x : x + s] for p in panels], axis=1) for y, x in crops]
        notes.append(f"rows {len(rows) - 1}-{len(rows)}: ulbc {result.bpp:.4f} bpp (level {result.rate_level}), "
                     f"{avif_note}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)
    return (f"{Path(path).name}: columns original | ulbc anchor-only | ulbc generative (the same file) | AVIF; "
            + "; ".join(notes))


def _steps(img: np.ndarray, axis: int) -> np.ndarray:
    """Mean |difference| between neighbouring columns (axis 1) or rows (axis 0)."""
    other = (1 - axis, 2)
    return np.abs(np.diff(img.astype(np.float64), axis=axis)).mean(axis=other)


def edge_score(decoded: np.ndarray, original: np.ndarray, edges_px, axis: int) -> tuple[float, float]:
    """How much sharper the decode is at tile edges than around them, against the original.

    Per column (or row) the decode's step size is divided by the original's (content
    cancels); at each edge that ratio is divided by its median over the 64 columns around
    it. Returns the largest such ratio at the edges and, as the noise floor, at columns
    16 px (one transformer patch) beside every edge. A seam shows as an edge score well
    above the floor.
    """
    ratio = _steps(decoded, axis) / np.maximum(_steps(original, axis), 1e-6)
    n = len(ratio)

    def score(columns) -> float:
        values = []
        for c in columns:
            if 32 <= c < n - 32:
                values.append(ratio[c - 1] / np.median(ratio[c - 32:c + 32]))
        return float(max(values)) if values else float("nan")

    return score(edges_px), score(e + 16 for e in edges_px)


def seam_check(model: str, path: str) -> str:
    """Seams of the transformer's tiles (edge score) and of the VAE's (against untiled)."""
    from ulbcodec import metrics
    from ulbcodec.image import ImageCodec
    from ulbcodec import tiling

    codec = ImageCodec.from_pretrained(model)
    ref = load_image(path)
    data = codec.encode(ref, codec.default_level).data
    pipe = codec.next_frame
    tile, overlap = pipe.latent_tile, pipe.latent_overlap

    def decode(**settings):
        saved = {name: getattr(tiling, name) for name in settings}
        for name, value in settings.items():
            setattr(tiling, name, value)
        try:
            return codec.decode(data)
        finally:
            for name, value in saved.items():
                setattr(tiling, name, value)

    tiled = codec.decode(data)
    scores = []
    for axis in (1, 0):  # columns, rows
        latents = -(-ref.shape[axis] // 64) * 8  # the padded image's latent side
        starts = list(tiling.tile_starts(latents, tile, overlap))
        edges = sorted({8 * e for s in starts for e in (s, s + tile)} - {0, 8 * latents})
        scores.append(edge_score(tiled, ref, edges, axis))
    at_edges, floor = max(s[0] for s in scores), max(s[1] for s in scores)

    # The VAE: its tiles (1024 px for the shipped one) cover a 768 px photograph whole, so
    # 256 px tiles are forced and compared with one untiled VAE pass (same transformer tiles).
    whole = decode(VAE_TILE=10**6)
    vae_tiled = decode(VAE_TILE=256, NARROW_VAE_CHANNELS=0)
    column_ratio = float((_steps(vae_tiled, 1) / np.maximum(_steps(whole, 1), 1e-6)).max())
    return (f"{Path(path).name} ({ref.shape[1]}x{ref.shape[0]}). Transformer tiles of {tile} latents with {overlap} "
            f"of overlap: edge score {at_edges:.2f} at the tile edges against {floor:.2f} 16 px beside them (a seam "
            f"would show as a score well above that floor). VAE tiles of 256 px with {tiling.VAE_OVERLAP} "
            f"overlap vs untiled: PSNR {metrics.psnr(whole, vae_tiled):.2f} dB, largest column-step ratio "
            f"{column_ratio:.2f} (a seam: >> 1).")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="generative")
    p.add_argument("--min-bpp", type=float, default=0.005)
    p.add_argument("--max-bpp", type=float, default=0.06)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--sheet", default=None, help="write the crop sheet PNG here")
    p.add_argument("--sheet-bpp", default="0.02,0.055", help="comma list of the crop sheet's target rates")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="encode with latent refinement (ulbcodec.refinement), this many steps")
    p.add_argument("--levels", default=None, help="comma list of rate levels [default: all]")
    p.add_argument("--baselines-from", default=None, metavar="POINTS_JSON",
                   help="take the WebP/AVIF points from image_rd.py's points.json over the same images "
                        "instead of coding them again")
    args = p.parse_args(argv)
    from ulbcodec.resources import keep_freed_memory

    keep_freed_memory()  # decode timings under the allocator settings of the `ulbc` command
    paths = list_images(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(v) for v in args.levels.split(",")] if args.levels else None
    rows = run_ulbc(args.model, paths, jobs=args.jobs, refine_steps=args.refine_steps, levels=levels)
    if args.baselines_from:
        rows += rows_from_sweep(args.baselines_from, paths, ["webp", "avif"], [1, 2, 4], args.max_bpp)
    else:
        rows += run_baselines(paths, ["webp", "avif"], [1, 2, 4], False, args.max_bpp, args.jobs)
    curves = average_curves(rows)
    fields = ["image", "curve", "codec", "downscale", "setting", "bytes", "bpp", *METRICS, "decode_s"]
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "points.json").write_text(json.dumps({"config": vars(args), "points": rows}, indent=1, default=str))
    for metric in METRICS:
        plot(curves, metric, args.min_bpp, args.max_bpp, out / f"rd_{metric}.png")
    lo, hi = args.min_bpp, args.max_bpp
    env = {m: envelopes(curves, m, lo, hi) for m in BD_METRICS}
    lines = [f"{len(paths)} held-out photographs from `{args.images}`, model `{args.model}`"
             + (f", encoded with {args.refine_steps} refinement steps" if args.refine_steps else "") + "; rates "
             f"{lo:g}-{hi:g} bpp (plus the nearest point outside each end). BD-rate: PCHIP over log rate on "
             "monotone envelopes (the detail measure is negated, lower is better). Negative: fewer bits "
             "for the same quality.", "",
             "| test | anchor | " + " | ".join(LABELS[m].split(" [")[0].split(",")[0] for m in BD_METRICS) + " |",
             "|---|---|" + "---|" * len(BD_METRICS)]
    for test, anchor in ((GEN, ANCHOR), (GEN, "best-avif"), (GEN, "best-webp"), (ANCHOR, "best-avif")):
        lines.append(f"| {test} | {anchor} | " + " | ".join(bd(env[m][anchor], env[m][test], m) for m in BD_METRICS)
                     + " |")
    lines += ["", "Same files, two decoders (mean over images, full-size coding):", "",
              "| level | bpp | " + " | ".join(f"{LABELS[m].split(' [')[0].split(',')[0].split(' (')[0]} anchor / gen"
                                         for m, _ in LEVEL_METRICS)
              + f" | decode s anchor / gen{' (1 thread)' if args.jobs > 1 else ''} |",
              "|---|---|" + "---|" * (len(LEVEL_METRICS) + 1)]
    by = {(pt["curve"], pt["setting"]): pt for c in (GEN, ANCHOR) for pt in curves[c]}
    secs = {}
    for r in rows:
        if r["downscale"] == 1 and r["codec"] in (GEN, ANCHOR):
            secs.setdefault((r["codec"], r["setting"]), []).append(r["decode_s"])
    for level in sorted({s for (_, s) in by}):
        a, g = by[(ANCHOR, level)], by[(GEN, level)]
        cells = [f"{a[m]:.{d}f} / {g[m]:.{d}f}" for m, d in LEVEL_METRICS]
        lines.append(f"| {level} | {a['bpp']:.4f} | " + " | ".join(cells) +
                     f" | {np.mean(secs[(ANCHOR, level)]):.2f} / {np.mean(secs[(GEN, level)]):.2f} |")
    # the target's range: the levels whose mean rate lies in [lo, hi]
    in_range = sorted(lv for lv in {s for (_, s) in by} if lo <= by[(ANCHOR, lv)]["bpp"] <= hi)
    wins = {m: [lv for lv in in_range if (by[(GEN, lv)][m] > by[(ANCHOR, lv)][m]) == HIGHER_IS_BETTER[m]]
            for m in ("vmaf", "vmaf_neg", "ssimulacra2", "butteraugli", "log_spectrum_error")}
    lines += ["", f"Generative beats anchor-only at every level in {lo:g}-{hi:g} bpp (levels "
              f"{', '.join(map(str, in_range))}): " + ", ".join(
                  f"{LABELS[m].split(' [')[0].split(',')[0]} {wins[m] == in_range} (at levels "
                  f"{', '.join(map(str, wins[m])) or 'none'})" for m in wins) + "."]
    if args.sheet:
        middle = paths[len(paths) // 2]
        targets = [float(v) for v in args.sheet_bpp.split(",")]
        lines += ["", f"Crop sheet `{args.sheet}`: " + crop_sheet(args.model, middle, targets, Path(args.sheet))]
    lines += ["", "Seams: " + seam_check(args.model, paths[0])]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
