"""Scoring: the metrics ``ulbc eval`` knows, which of them can run here, and the scores
of one decoded image or clip.

Availability has one source, :func:`ulbcodec.metrics.available_metrics` (packages and
weights present); :func:`metric_problem` adds the metrics that are never computed here
(set-level ones whose weights ulbc does not ship). A metric that cannot run is reported
with its reason; nothing is approximated in its place.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import numpy as np

from ulbcodec import metrics
from ulbcodec.eval import IMAGE, VIDEO, EvalError
from ulbcodec.threads import torch_threads

# Perceptual metrics reported beside PSNR / MS-SSIM / VMAF everywhere (issue 24); the
# block-grid and colour-drift measures are diagnostics: in the points, not in BD-rates.
_PERCEPTUAL = ("vmaf_neg", "ssimulacra2", "butteraugli", "butteraugli_max")
DIAGNOSTICS = ("blockiness", "delta_e", "color_shift")
DEFAULT_METRICS = {IMAGE: ("psnr", "psnr_y", "ms_ssim", "vmaf", *_PERCEPTUAL, "log_spectrum_error", *DIAGNOSTICS),
                   VIDEO: ("psnr", "psnr_y", "ms_ssim", "vmaf", "vmaf_neg")}
HIGHER_IS_BETTER = {"psnr": True, "psnr_y": True, "ms_ssim": True, "vmaf": True, "vmaf_neg": True,
                    "ssimulacra2": True, "butteraugli": False, "butteraugli_max": False,
                    "log_spectrum_error": False, "blockiness": False, "delta_e": False, "color_shift": False,
                    "lpips": False, "dists": False, "fid": False, "kid": False, "fvd": False}
METRICS = DEFAULT_METRICS
LABELS = {"psnr": "PSNR (RGB) [dB]", "psnr_y": "PSNR-Y (BT.601) [dB]", "ms_ssim": "MS-SSIM (RGB)",
          "vmaf": "VMAF v0.6.1", "vmaf_neg": "VMAF NEG (v0.6.1neg)", "ssimulacra2": "SSIMULACRA2",
          "butteraugli": "butteraugli 3-norm, lower is better", "butteraugli_max": "butteraugli max, lower is better",
          "blockiness": "blockiness (8/16 px grid energy / original's), lower is better",
          "delta_e": "mean ΔE*ab (CIE76), lower is better",
          "color_shift": "colour drift (ΔE*ab of 16 px block means), lower is better",
          "log_spectrum_error": "log-spectrum error [dB], lower is better",
          "lpips": "LPIPS (AlexNet), lower is better", "dists": "DISTS, lower is better",
          "fid": "FID, lower is better", "kid": "KID, lower is better", "fvd": "FVD, lower is better"}
VIDEO_LABELS = {**LABELS, "ms_ssim": "MS-SSIM (RGB; SSIM under 161 px)"}
# Set-level metrics: not one number per decoded item but a distance between feature
# distributions, through networks whose weights ulbc does not ship and cannot download.
_SET_METRIC_REASONS = {
    "fid": "FID needs Inception-v3 feature weights (pt_inception-2015-12-05), which ulbc does not ship and "
           "cannot download; not computed",
    "kid": "KID needs Inception-v3 feature weights (pt_inception-2015-12-05), which ulbc does not ship and "
           "cannot download; not computed",
    "fvd": "FVD needs the I3D video network's weights, which ulbc does not ship and cannot download; not computed",
}


def label(metric: str, kind: str = IMAGE) -> str:
    return (VIDEO_LABELS if kind == VIDEO else LABELS)[metric]


def metric_problem(name: str) -> Optional[str]:
    """``None`` when ``name`` can be computed on this machine, otherwise why not."""
    if name not in HIGHER_IS_BETTER:
        raise EvalError(f"unknown metric {name!r} (known: {', '.join(HIGHER_IS_BETTER)})")
    if name in _SET_METRIC_REASONS:
        return _SET_METRIC_REASONS[name]
    status = _metric_status().get(name, "available")
    if status.startswith("unavailable: "):
        return status.removeprefix("unavailable: ")
    if name == "dists":  # package and weights present, but there is no wrapper to call
        return "package and weights are present, but DISTS is not wrapped in ulbcodec.metrics yet; not computed"
    return None


@functools.lru_cache(maxsize=1)
def _metric_status() -> dict:
    return metrics.available_metrics()


def image_scores(ref: np.ndarray, decoded: np.ndarray, names: Iterable[str]) -> dict:
    """``{metric: value}`` of one decoded image; MS-SSIM is NaN under 161 px (undefined)."""
    if decoded.shape != ref.shape or decoded.dtype != np.uint8:
        raise RuntimeError(f"decoder returned {decoded.dtype} {decoded.shape}, expected uint8 {ref.shape}")
    scores = {}
    for name in names:
        if name in ("ms_ssim", "ssimulacra2", "blockiness"):
            try:
                with torch_threads(1):
                    scores[name] = getattr(metrics, name)(ref, decoded)
            except ValueError:  # too small (MS-SSIM: 161 px, SSIMULACRA2: 8, blockiness: 17): undefined, no stand-in
                scores[name] = math.nan
        elif name == "lpips":
            with torch_threads(1):
                scores[name] = metrics.lpips(ref, decoded)
        else:
            scores[name] = getattr(metrics, name)(ref, decoded)
    return scores


def _frame_ssim(ref: np.ndarray, dist: np.ndarray) -> float:
    from ulbcodec.video import frame_distance

    return 1.0 - frame_distance(ref, dist, "ms-ssim")


def video_scores(ref: np.ndarray, decoded: np.ndarray, names: Iterable[str], vmaf_threads: int = 1) -> dict:
    """``{metric: value}`` of a decoded clip [T, H, W, 3]: VMAF over the sequence, every
    other metric the mean over frames (MS-SSIM falls back to SSIM under 161 px, as the
    video codec's own threshold does)."""
    if decoded.shape != ref.shape:
        raise RuntimeError(f"decoder returned frames {decoded.shape}, expected {ref.shape}")
    per_frame = {"ms_ssim": _frame_ssim, "lpips": metrics.lpips}
    scores = {}
    for name in names:
        if name in ("vmaf", "vmaf_neg"):
            scores[name] = getattr(metrics, f"{name}_video")(list(ref), list(decoded), threads=vmaf_threads)
        else:
            score = per_frame.get(name) or getattr(metrics, name)
            with torch_threads(1):
                scores[name] = float(np.mean([score(a, b) for a, b in zip(ref, decoded)]))
    return scores
