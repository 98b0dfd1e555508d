"""Outputs of an evaluation: points and aggregates (CSV, JSON), BD-rate tables, RD plots,
a crop sheet of ulbc against the best baseline at matched rate, and summary.md.

Pixels for the crop sheet come from the caller (``original(item)``, ``decoded(row,
item)``), so this module codes nothing itself.
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import math
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ulbcodec import metrics
from ulbcodec.eval import IMAGE, ULBC
from ulbcodec.eval.rd import MeanBD, average_curves, envelope_name, family_envelopes, finite, in_window, mean_bd_rate
from ulbcodec.eval.scoring import DIAGNOSTICS, HIGHER_IS_BETTER, label

CROP_SIDE = 256
CROP_ITEMS = 4
MATCHED_BPP_TOLERANCE = 0.25  # a baseline point within +-25% of ulbc's rate counts as "the same rate"


@dataclass
class EvalReport:
    """What a run did: the CLI prints the summary and exits non-zero on failures."""

    out: Path
    computed: int = 0
    reused: int = 0
    failures: list = dataclasses.field(default_factory=list)  # {"item", "codec", "error"}
    summary: str = ""


def atomic_text(path: Path, text: str) -> None:
    from ulbcodec.io import write_bytes

    write_bytes(path, text.encode(), force=True)


def package_version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


COLORS = {"jpeg": "tab:blue", "webp": "tab:green", "avif": "tab:red", "jxl": "tab:purple", ULBC: "black",
          "x264": "tab:blue", "x265": "tab:green", "svtav1": "tab:red", "vvenc": "tab:purple"}
MARKERS = {1: "o", 2: "s", 4: "^", 8: "D"}


def plot(curves: dict[str, list[dict]], metric: str, lo: float, hi: float, path: Path, *, ylabel: str,
         title: str) -> None:
    """RD plot on log rate: every curve thin, each codec's envelope bold; ``[lo, hi]``
    shaded when ``lo > 0``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, points in sorted(curves.items()):
        pts = sorted((p for p in in_window(points, lo, hi) if finite(p.get(metric))), key=lambda p: p["setting"])
        if pts:
            ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], lw=0.8, alpha=0.45, ms=3, label=name,
                    color=COLORS.get(pts[0]["codec"]), marker=MARKERS.get(pts[0]["downscale"], "o"))
    for name, pts in sorted(family_envelopes(curves, metric, lo, hi).items()):
        ours = name.startswith(ULBC)
        if pts:
            ax.plot([p["bpp"] for p in pts], [p[metric] for p in pts], lw=2.4 if ours else 1.8,
                    color=COLORS.get(ULBC if ours else name.removeprefix("best-")), marker="*" if ours else None,
                    ms=9, label=f"{name} (envelope)" if ours else name)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (real bytes / original pixels)")
    ax.set_ylabel(ylabel)
    if lo > 0:
        ax.axvspan(lo, hi, color="0.93", zorder=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def matched_points(item_rows: list[dict], metric: Optional[str]) -> Optional[tuple[dict, dict]]:
    """(ulbc point, baseline point) of one item at matched rate, or None.

    ulbc's point is its median-rate full-size one; the baseline point is the best by
    ``metric`` among those within +-25% of that rate, else the one closest in log rate.
    """
    ours = sorted((r for r in item_rows if r["codec"] == ULBC and r["downscale"] == 1), key=lambda r: r["bpp"])
    theirs = [r for r in item_rows if r["codec"] != ULBC]
    if not ours or not theirs:
        return None
    target = ours[len(ours) // 2]
    close = [r for r in theirs if abs(r["bpp"] / target["bpp"] - 1) <= MATCHED_BPP_TOLERANCE]
    if metric and any(finite(r.get(metric)) for r in close):
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        best = max((r for r in close if finite(r.get(metric))), key=lambda r: sign * r[metric])
    else:
        best = min(theirs, key=lambda r: abs(math.log(r["bpp"] / target["bpp"])))
    return target, best


def _centre_crop(rgb: np.ndarray, side: int = CROP_SIDE) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = min(side, h), min(side, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[top:top + ch, left:left + cw]


def crop_sheet(rows: list[dict], items: list["Item"], metric: Optional[str], path: Path,
               original: Callable[["Item"], np.ndarray], decoded: Callable[[dict, "Item"], np.ndarray]) -> list[dict]:
    """Original / ulbc / best baseline at matched rate for up to CROP_ITEMS items, centre
    crops of CROP_SIDE px; returns the pairs shown (empty: no sheet written). ``original``
    and ``decoded`` give the pixels (a video's middle frame) of an item and of a row."""
    shown = []
    for item in items:
        pair = matched_points([r for r in rows if r["item"] == item.name], metric)
        if pair is not None:
            shown.append((item, *pair))
        if len(shown) == CROP_ITEMS:
            break
    if not shown:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3.2 * len(shown)), squeeze=False)
    for ax_row, (item, ours, theirs) in zip(axes, shown):
        panels = [(original(item), f"{item.name}\noriginal")]
        for row in (ours, theirs):
            score = f", {metric} {row[metric]:.3f}" if metric and finite(row.get(metric)) else ""
            panels.append((decoded(row, item),
                           f"{row['curve']} setting {row['setting']}\n{row['bpp']:.4f} bpp{score}"))
        for ax, (rgb, text) in zip(ax_row, panels):
            ax.imshow(_centre_crop(rgb), interpolation="nearest")
            ax.set_title(text, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return [{"item": item.name, "ulbc": _point_id(ours), "baseline": _point_id(theirs)}
            for item, ours, theirs in shown]


def _point_id(row: dict) -> dict:
    return {k: row[k] for k in ("codec", "curve", "setting", "bpp")}


def _environment() -> dict:
    versions = {pkg: package_version(pkg) for pkg in ("ulbc", "numpy", "pillow", "torch", "pytorch-msssim",
                                                "imageio-ffmpeg")}
    return {"python": platform.python_version(), **versions, "ffmpeg": metrics.ffmpeg_exe()}


def _status(problem: Optional[str]) -> dict:
    return {"status": "available"} if problem is None else {"status": "unavailable", "reason": problem}


def _csv_text(rows: list[dict], fields: list[str]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if finite(value) else "n/a"


def write_outputs(out: Path, inputs, items, rows, config: "EvalConfig", kinds, metric_status, codec_status, digests,
                  report: EvalReport, notes, original: Callable[["Item"], np.ndarray],
                  decoded: Callable[[dict, "Item"], np.ndarray]) -> str:
    """points, aggregate, bd_rates (CSV and JSON), RD plots, crop sheets (pixels from
    ``original`` and ``decoded``, see :func:`crop_sheet`), summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    all_metrics = list(dict.fromkeys(m for kind in kinds for m in config.metrics_for(kind)))
    status = {
        "metrics": {kind: {m: _status(metric_status[kind, m]) for m in config.metrics_for(kind)} for kind in kinds},
        "codecs": {kind: {c: {**_status(codec_status[kind, c]),
                              **({"model": config.image_model if kind == IMAGE else config.video_model,
                                  "model_digest": digests[kind]} if c == ULBC else {})}
                          for c in config.codecs_for(kind)} for kind in kinds},
    }
    head = {"config": dataclasses.asdict(config), "inputs": list(map(str, inputs)), "environment": _environment(),
            **status, "failures": report.failures, "notes": notes}
    fields = ["kind", "item", "codec", "curve", "downscale", "setting", "width", "height", "frames", "bytes", "bpp",
              *all_metrics, "encode_s", "decode_s", "level", "frame_types", "container_bytes", "stream"]
    atomic_text(out / "points.csv", _csv_text(rows, fields))
    atomic_text(out / "points.json", json.dumps({**head, "points": rows}, indent=1))

    aggregate, mean_points, bd_rows, sections = {}, [], [], []
    for kind in kinds:
        kind_rows = [r for r in rows if r["kind"] == kind]
        names = config.metrics_for(kind)
        available = [m for m in names if not metric_status[kind, m]]
        hi = config.max_bpp_for(kind)
        curves = average_curves(kind_rows, names)
        envelopes = {m: family_envelopes(curves, m, 0, hi) for m in available}
        bd = []
        for codec in config.codecs_for(kind):
            if codec == ULBC or ULBC not in config.codecs_for(kind):
                continue
            for m in names:
                if m in DIAGNOSTICS:  # not a quality scale: no Bjøntegaard delta
                    continue
                if metric_status[kind, m]:
                    cell = MeanBD(None, 0, 0, f"metric unavailable: {metric_status[kind, m]}")
                elif codec_status[kind, codec] or codec_status[kind, ULBC]:
                    cell = MeanBD(None, 0, 0, f"codec unavailable: {codec_status[kind, codec]}")
                else:
                    cell = mean_bd_rate(kind_rows, ULBC, codec, m, hi=hi)
                bd.append({"kind": kind, "test": ULBC, "anchor": envelope_name(codec), "metric": m,
                           "bd_rate_percent": cell.value, "items_used": cell.items_used, "items": cell.items,
                           "reason": cell.reason})
        bd_rows += bd
        mean_points += [{"kind": kind, **p} for pts in curves.values() for p in pts]
        for m in available:
            if any(finite(p.get(m)) for pts in curves.values() for p in pts):
                plot(curves, m, 0, hi, out / f"rd_{kind}_{m}.png", ylabel=label(m, kind),
                     title=f"{label(m, kind)} vs rate, mean over {kind}s (thin: variants, bold: envelopes)")
        primary = next((m for m in available if any(finite(r.get(m)) for r in kind_rows)), None)
        kind_items = [i for i in items if i.kind == kind]
        crops = crop_sheet(kind_rows, kind_items, primary, out / f"crops_{kind}.png", original, decoded)
        aggregate[kind] = {"max_bpp": hi, "curves": curves, "envelopes": envelopes, "bd_rates": bd, "crops": crops}
        sections.append(_summary_section(kind, kind_items, curves, bd, config, metric_status, codec_status, hi,
                                         crops))
    atomic_text(out / "aggregate.json", json.dumps({**head, "kinds": aggregate}, indent=1))
    atomic_text(out / "aggregate.csv", _csv_text(mean_points, ["kind", "curve", "codec", "downscale", "setting",
                                                                "n_items", "bpp", *all_metrics]))
    atomic_text(out / "bd_rates.csv", _csv_text(bd_rows, ["kind", "test", "anchor", "metric", "bd_rate_percent",
                                                           "items_used", "items", "reason"]))
    summary = _summary(inputs, items, sections, report, notes)
    atomic_text(out / "summary.md", summary)
    return summary


def _summary_section(kind, items, curves, bd, config, metric_status, codec_status, hi, crops) -> str:
    names = config.metrics_for(kind)
    codecs = config.codecs_for(kind)
    lines = [f"## {kind.capitalize()}s: {len(items)}", ""]
    ran = [c for c in codecs if not codec_status[kind, c]]
    lines.append(f"Codecs: {', '.join(ran) or 'none'}." + "".join(
        f" Unavailable: {c} ({codec_status[kind, c]})." for c in codecs if codec_status[kind, c]))
    lines.append(f"Metrics: {', '.join(m for m in names if not metric_status[kind, m]) or 'none'}." + "".join(
        f" Unavailable: {m} ({metric_status[kind, m]})." for m in names if metric_status[kind, m]))
    if bd:
        lines += ["", f"### BD-rate of ulbc against each baseline's best envelope (up to {hi:g} bpp plus the nearest "
                      "point above; per item, mean over the items where the curves overlap; negative: ulbc needs "
                      "fewer bits)", "",
                  "| anchor | " + " | ".join(label(m, kind).split(" [")[0].split(",")[0] for m in names) + " |",
                  "|---|" + "---|" * len(names)]
        for anchor in dict.fromkeys(r["anchor"] for r in bd):
            cells = [f"{r['bd_rate_percent']:+.1f}% ({r['items_used']}/{r['items']})" if r["bd_rate_percent"]
                     is not None else f"n/a ({r['reason'].split(':')[0]})" for r in bd if r["anchor"] == anchor]
            lines.append(f"| {anchor} | " + " | ".join(cells) + " |")
    if curves:
        lines += ["", "### Rate range reached (mean bpp over items)", "",
                  "| curve | lowest bpp (setting) | highest bpp (setting) | settings |", "|---|---|---|---|"]
        for name, points in sorted(curves.items()):
            low, high = min(points, key=lambda p: p["bpp"]), max(points, key=lambda p: p["bpp"])
            lines.append(f"| {name} | {_fmt(low['bpp'])} ({low['setting']}) | {_fmt(high['bpp'])} "
                         f"({high['setting']}) | {len(points)} |")
    if crops:
        lines += ["", f"Crop sheet crops_{kind}.png: " + "; ".join(
            f"{c['item']}: {c['ulbc']['curve']} {c['ulbc']['setting']} at {c['ulbc']['bpp']:.4f} bpp vs "
            f"{c['baseline']['curve']} {c['baseline']['setting']} at {c['baseline']['bpp']:.4f} bpp" for c in crops)]
    return "\n".join(lines)


def _summary(inputs, items, sections, report: EvalReport, notes) -> str:
    lines = [f"# ulbc eval: {len(items)} items from {', '.join(f'`{i}`' for i in inputs)}", "",
             "Rates are the real bytes of each complete file x 8 / original pixels (x frames); video baselines are "
             "charged for their elementary stream without SEI. Per-item rows: points.csv; mean curves: "
             "aggregate.csv; BD-rates: bd_rates.csv; everything with reasons: aggregate.json.", "",
             f"Tasks: {report.computed} computed, {report.reused} reused from earlier runs, "
             f"{len(report.failures)} failed.", "", *sections]
    if report.failures:
        lines += ["", "## Failures", ""] + [f"- {f['item']}" + (f" ({f['codec']})" if f["codec"] else "")
                                            + f": {f['error']}" for f in report.failures]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
