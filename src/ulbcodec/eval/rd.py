"""RD curves: per-item points averaged into curves, each codec family's monotone
envelope, rate windows, and Bjøntegaard deltas (one copy, used by ``ulbc eval`` and the
RD benchmarks).

::

    rows (item, codec, setting, bpp, metrics) ─► average_curves ─► envelope (per family)
        ─► in_window(lo, hi) ─► bd_rate / bd_metric (PCHIP over log rate) ─► mean_bd_rate

:func:`bd_rate` and :func:`bd_metric` follow the JCT-VC/JVET common-test-condition
spreadsheets (PCHIP interpolation).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ulbcodec.eval import ULBC
from ulbcodec.eval.scoring import HIGHER_IS_BETTER

# ----------------------------------------------------------------------------- Bjøntegaard deltas


def _rd_curve(rate, metric, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (log10 rate, metric), sorted by rate."""
    rate, metric = np.asarray(rate, dtype=np.float64), np.asarray(metric, dtype=np.float64)
    if rate.ndim != 1 or rate.shape != metric.shape:
        raise ValueError(f"{name}: rate and metric must be 1-D of equal length, got {rate.shape}, {metric.shape}")
    if len(rate) < 2:
        raise ValueError(f"{name}: need at least 2 rate-distortion points, got {len(rate)}")
    if not (np.all(np.isfinite(rate)) and np.all(np.isfinite(metric))):
        raise ValueError(f"{name}: rates and metrics must be finite (a lossless PSNR of inf cannot be interpolated)")
    if np.any(rate <= 0):
        raise ValueError(f"{name}: rates must be positive")
    order = np.argsort(rate)
    rate, metric = rate[order], metric[order]
    if np.any(np.diff(rate) <= 0) or np.any(np.diff(metric) <= 0):
        raise ValueError(
            f"{name}: the metric must increase strictly with the rate (got rate {rate.tolist()}, "
            f"metric {metric.tolist()}); pass the curve's monotone envelope"
        )
    return np.log10(rate), metric


def _mean_gap(x_anchor, y_anchor, x_test, y_test) -> float:
    """Mean of ``f_test - f_anchor`` over the overlap of the x ranges, f = PCHIP(x, y)."""
    from scipy.interpolate import PchipInterpolator

    lo, hi = max(x_anchor[0], x_test[0]), min(x_anchor[-1], x_test[-1])
    if not lo < hi:
        raise ValueError(
            f"the curves do not overlap: anchor covers [{x_anchor[0]:.6g}, {x_anchor[-1]:.6g}], "
            f"test [{x_test[0]:.6g}, {x_test[-1]:.6g}]"
        )
    area_anchor = PchipInterpolator(x_anchor, y_anchor).integrate(lo, hi)
    area_test = PchipInterpolator(x_test, y_test).integrate(lo, hi)
    return float((area_test - area_anchor) / (hi - lo))


def bd_rate(rate_anchor, metric_anchor, rate_test, metric_test) -> float:
    """Bjøntegaard delta rate in percent: the test codec's average rate change at equal quality.

    Negative means the test codec needs fewer bits (-50 = half the rate). Protocol (the
    JCT-VC/JVET CTC spreadsheet and the ``bjontegaard`` package's ``method='pchip'``):
    per curve, ``log10(rate)`` is interpolated as a function of the metric with a
    piecewise cubic Hermite interpolant (PCHIP, scipy's ``PchipInterpolator``); both are
    integrated over the overlap of the two metric ranges; the mean difference ``d``
    (test - anchor) gives ``(10^d - 1) * 100``.

    Any number of points >= 2 per curve (need not match). Each curve must be strictly
    monotone (higher rate, strictly higher metric); pass the monotone envelope of noisy
    curves. Raises ``ValueError`` on fewer than 2 points, non-finite or non-positive
    values, non-monotone curves, or metric ranges that do not overlap.
    """
    lr_a, m_a = _rd_curve(rate_anchor, metric_anchor, "anchor")
    lr_t, m_t = _rd_curve(rate_test, metric_test, "test")
    return (10.0 ** _mean_gap(m_a, lr_a, m_t, lr_t) - 1.0) * 100.0


def bd_metric(rate_anchor, metric_anchor, rate_test, metric_test) -> float:
    """Bjøntegaard delta metric (e.g. BD-PSNR in dB): the test codec's average quality gain at equal rate.

    Positive means the test codec is better. The metric is interpolated as a PCHIP
    function of ``log10(rate)`` per curve, and the mean difference (test - anchor) over
    the overlap of the two log-rate ranges is returned, in the metric's units. Same input
    rules and errors as :func:`bd_rate`.
    """
    lr_a, m_a = _rd_curve(rate_anchor, metric_anchor, "anchor")
    lr_t, m_t = _rd_curve(rate_test, metric_test, "test")
    return _mean_gap(lr_a, m_a, lr_t, m_t)


# ----------------------------------------------------------------------------- curves


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _mean(values: list):
    """Mean, or None when any value is missing (an unavailable metric stays unavailable)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def average_curves(rows: list[dict], metric_names: Sequence[str], item_key: str = "item") -> dict[str, list[dict]]:
    """``{curve: [point]}``: per setting, the mean rate and metrics over the items.

    Only settings that every item of that curve reached are averaged (a baseline's sweep
    stops at a different quality on each item); ``n_items`` says over how many.
    """
    groups = defaultdict(list)
    items_of_curve = defaultdict(set)
    for row in rows:
        groups[row["curve"], row["setting"]].append(row)
        items_of_curve[row["curve"]].add(row[item_key])
    curves = defaultdict(list)
    for (curve, setting), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if {r[item_key] for r in group} != items_of_curve[curve]:
            continue
        point = {"curve": curve, "codec": group[0]["codec"], "downscale": group[0]["downscale"], "setting": setting,
                 "n_items": len(group)}
        for key in ("bpp", *metric_names):
            point[key] = _mean([r.get(key) for r in group])
        curves[curve].append(point)
    return dict(curves)


def envelope(points: list[dict], metric: str) -> list[dict]:
    """Monotone envelope: the points no other point beats at equal or lower rate, by rate."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    usable = [p for p in points if finite(p.get(metric))]
    best, front = -math.inf, []
    for p in sorted(usable, key=lambda p: (p["bpp"], -sign * p[metric])):
        if sign * p[metric] > best:
            best = sign * p[metric]
            front.append(p)
    return front


def in_window(points: list[dict], lo: float, hi: float) -> list[dict]:
    """Points with lo <= bpp <= hi, plus the nearest point below lo and above hi, by rate."""
    points = sorted(points, key=lambda p: p["bpp"])
    below = [p for p in points if p["bpp"] < lo][-1:]
    above = [p for p in points if p["bpp"] > hi][:1]
    return below + [p for p in points if lo <= p["bpp"] <= hi] + above


def envelope_name(codec: str) -> str:
    return codec if codec.startswith(ULBC) else f"best-{codec}"


def family_envelopes(curves: dict[str, list[dict]], metric: str, lo: float, hi: float) -> dict[str, list[dict]]:
    """``{"best-avif": [...], ..., "ulbc": [...]}``: each codec's envelope over all its
    variants (the Pareto front, not the convex hull), windowed."""
    by_codec = defaultdict(list)
    for points in curves.values():
        for p in points:
            by_codec[p["codec"]].append(p)
    return {envelope_name(c): in_window(envelope(pts, metric), lo, hi) for c, pts in by_codec.items()}


def bd_rate_or_reason(anchor: list[dict], test: list[dict], metric: str) -> tuple[Optional[float], Optional[str]]:
    """BD-rate (%) of ``test`` against ``anchor`` on envelopes, or ``(None, reason)``.

    A lower-is-better metric is negated first: BD-rate wants quality rising with rate.
    """
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    try:
        value = bd_rate([p["bpp"] for p in anchor], [sign * p[metric] for p in anchor],
                                [p["bpp"] for p in test], [sign * p[metric] for p in test])
    except ValueError as e:
        return None, "no overlap" if "overlap" in str(e) else "< 2 points" if "at least 2" in str(e) else "invalid"
    return (value, None) if math.isfinite(value) else (None, "invalid")


def bd_cell(anchor: list[dict], test: list[dict], metric: str) -> str:
    value, reason = bd_rate_or_reason(anchor, test, metric)
    return f"{value:+.1f}%" if value is not None else f"n/a ({reason})"


@dataclass
class MeanBD:
    """Per-item BD-rates of one test codec against one anchor codec, averaged."""

    value: Optional[float]  # mean over the items where the curves overlap; None if none did
    items_used: int
    items: int
    reason: Optional[str]  # why no item gave a number (the most common reason)


def mean_bd_rate(rows: list[dict], test: str, anchor: str, metric: str, item_key: str = "item",
                 hi: Optional[float] = None) -> MeanBD:
    """Mean over items of the BD-rate of codec ``test`` against codec ``anchor``, each on
    its per-item monotone envelope (over all its settings and variants), restricted to
    ``<= hi`` bpp plus the nearest point above when ``hi`` is given.

    Per item, then averaged (as the JVET common test conditions do per sequence): a
    mean curve would need every setting on every item, and sweeps stop per item.
    """
    by_item = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_item[r[item_key]][r["codec"]].append(r)
    values, reasons = [], Counter()
    for curves in by_item.values():
        a, t = envelope(curves[anchor], metric), envelope(curves[test], metric)
        if hi is not None:
            a, t = in_window(a, 0, hi), in_window(t, 0, hi)
        value, reason = bd_rate_or_reason(a, t, metric)
        if value is None:
            reasons[reason] += 1
        else:
            values.append(value)
    return MeanBD(float(np.mean(values)) if values else None, len(values), len(by_item),
                  None if values else (reasons.most_common(1)[0][0] if reasons else "no items"))
