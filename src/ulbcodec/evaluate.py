"""Rate-distortion evaluation of ulbc against classical codecs: the engine of ``ulbc eval``.

It measures, for every image or video it is given, how many bits each codec spends
(the real bytes of the complete file x 8 / original pixels, times frames for a video)
and how close the decoded pixels are to the original under each metric of
``ulbcodec.metrics``; then it averages the points into curves, takes each codec's
monotone envelope, and compares ulbc with each baseline by BD-rate. The RD benchmarks
(benchmarks/image_rd.py, video_rd.py) use the same curve rules from here.

::

    INPUTS (files, folders) ──► find_items ──► Item(path, kind=image|video, sha256)
                                                    │
                      tasks = items x codecs        ▼           RESULTS_DIR/items/
    ┌───────────────────────── run_task (--jobs workers) ────┐  NAME--CODEC--KEY.json
    │ for each setting (quality | rate level x downscale |   │──► (KEY hashes the file's
    │   level x threshold): encode ─► bytes ─► decode ─►     │     content and every
    │   score(metrics) ─► one row; baselines stop once       │     setting: a rerun skips
    │   bpp > --max-bpp                                      │     finished tasks)
    └────────────────────────────────────────────────────────┘
                                                    │ rows
                 ┌──────────────────────────────────┼──────────────────────────────┐
                 ▼                                  ▼                              ▼
     points.csv / points.json          average_curves ─► envelope ─►     crops_<kind>.png
                                       in_window ─► mean_bd_rate         (original / ulbc /
                                                    │                     best baseline at
                                   aggregate.csv/.json, bd_rates.csv,     matched bpp)
                                   rd_<kind>_<metric>.png, summary.md

A metric or codec that cannot run here (no weights, an ffmpeg built without the
encoder) is reported as unavailable, with the reason, in the JSON outputs, the summary
and on stderr; its CSV cells stay empty. Nothing is approximated in its place.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io as _io
import json
import math
import platform
import re
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ulbcodec import baselines, metrics, video_baselines

ULBC = "ulbc"
IMAGE, VIDEO = "image", "video"
KINDS = (IMAGE, VIDEO)
CODECS = {IMAGE: (ULBC, *baselines.CODECS), VIDEO: (ULBC, *video_baselines.CODECS)}
ULBC_IMAGE_DOWNSCALES = (1, 2, 4)  # the .ulb header records the factor; the decoder upsamples
DEFAULT_MAX_BPP = {IMAGE: 0.15, VIDEO: 0.1}
DEFAULT_THRESHOLDS = (0.3, 0.5)
DEFAULT_FRAMES = 30
DEFAULT_METRICS = {IMAGE: ("psnr", "psnr_y", "ms_ssim", "vmaf", "log_spectrum_error"),
                   VIDEO: ("psnr", "psnr_y", "ms_ssim", "vmaf")}
HIGHER_IS_BETTER = {"psnr": True, "psnr_y": True, "ms_ssim": True, "vmaf": True, "log_spectrum_error": False,
                    "lpips": False, "dists": False, "fid": False, "kid": False, "fvd": False}
METRICS = tuple(HIGHER_IS_BETTER)
LABELS = {"psnr": "PSNR (RGB) [dB]", "psnr_y": "PSNR-Y (BT.601) [dB]", "ms_ssim": "MS-SSIM (RGB)",
          "vmaf": "VMAF v0.6.1", "log_spectrum_error": "log-spectrum error [dB], lower is better",
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
CROP_SIDE = 256
CROP_ITEMS = 4
MATCHED_BPP_TOLERANCE = 0.25  # a baseline point within +-25% of ulbc's rate counts as "the same rate"
# Bump when a change makes stored item results incomparable with new ones.
RESULTS_VERSION = 1


class EvalError(ValueError):
    """Bad input or settings for the whole evaluation: one line, nothing is run."""


def label(metric: str, kind: str = IMAGE) -> str:
    return (VIDEO_LABELS if kind == VIDEO else LABELS)[metric]


# ----------------------------------------------------------------------------- metrics


@contextlib.contextmanager
def single_threaded_torch():
    """Run one small torch computation on one thread, restoring the previous setting.

    MS-SSIM of one image is too little work for torch's thread pool: on a busy machine
    the pool's synchronisation made it ~100x slower (1.4 s instead of 15 ms at 256x192).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def metric_problem(name: str) -> Optional[str]:
    """``None`` when ``name`` can be computed on this machine, otherwise why not."""
    if name not in HIGHER_IS_BETTER:
        raise EvalError(f"unknown metric {name!r} (known: {', '.join(METRICS)})")
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
        if name == "ms_ssim":
            try:
                with single_threaded_torch():
                    scores[name] = metrics.ms_ssim(ref, decoded)
            except ValueError:  # under 161 px: a 5-scale MS-SSIM does not exist, no stand-in
                scores[name] = math.nan
        elif name == "lpips":
            with single_threaded_torch():
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
        if name == "vmaf":
            scores[name] = metrics.vmaf_video(list(ref), list(decoded), threads=vmaf_threads)
        else:
            score = per_frame.get(name) or getattr(metrics, name)
            with single_threaded_torch():
                scores[name] = float(np.mean([score(a, b) for a, b in zip(ref, decoded)]))
    return scores


# ----------------------------------------------------------------------------- coding


def timed_round_trip(encode: Callable[[], bytes], decode: Callable[[bytes], np.ndarray]):
    """``(stream, decoded, encode_s, decode_s)`` of one encode and one decode."""
    t0 = time.perf_counter()
    stream = encode()
    t1 = time.perf_counter()
    decoded = decode(stream)
    return stream, decoded, t1 - t0, time.perf_counter() - t1


def ulbc_video_round_trip(codec, frames: np.ndarray, fps: Fraction, settings, path: Path):
    """Encode to ``path``, decode from the file alone, and check that the decoder's frames
    equal the encoder's reconstruction bit for bit: ``(data, gops, decoded, enc_s, dec_s)``."""
    from ulbcodec.io import write_bytes

    seen = []
    t0 = time.perf_counter()
    data, gops = codec.encode(iter(frames), fps, settings, reconstruction=seen.append)
    encode_s = time.perf_counter() - t0
    write_bytes(path, data, force=True)
    t0 = time.perf_counter()
    decoded = np.stack(list(codec.decode(path.read_bytes())))
    decode_s = time.perf_counter() - t0
    if len(seen) != len(decoded) or not all(np.array_equal(a, b) for a, b in zip(seen, decoded)):
        raise RuntimeError(f"{path}: decoded frames differ from the encoder's reconstruction")
    return data, gops, decoded, encode_s, decode_s


def read_clip(path, frames: int) -> tuple[np.ndarray, Fraction]:
    """The first ``frames`` frames of a video as [T, H, W, 3] uint8, and its frame rate."""
    from ulbcodec.io import VideoReader

    reader = VideoReader(path)
    out = []
    try:
        for frame in reader:
            out.append(frame.copy())
            if len(out) == frames:
                break
    finally:
        reader.close()
    return np.stack(out), reader.fps


@functools.lru_cache(maxsize=4)
def _load_item(path: str, kind: str, frames: int):
    """``(pixels, fps, notes)``: HxWx3 for an image (fps None), [T, H, W, 3] for a video."""
    from ulbcodec.io import read_image

    if kind == IMAGE:
        rgb, notes = read_image(path)
        return rgb, None, notes
    clip, fps = read_clip(path, frames)
    return clip, fps, []


@functools.lru_cache(maxsize=2)
def _image_codec(model: str):
    from ulbcodec.image import ImageCodec

    return ImageCodec.from_pretrained(model)


@functools.lru_cache(maxsize=2)
def _video_codec(model: str):
    from ulbcodec.video import VideoCodec

    return VideoCodec.from_pretrained(model)


def _probe_clip() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    frame = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)
    return np.stack([frame, np.roll(frame, 2, axis=1)])


@functools.lru_cache(maxsize=None)
def codec_problem(kind: str, codec: str) -> Optional[str]:
    """``None`` if a baseline codes a tiny probe here, otherwise the first line of why not
    (e.g. an ffmpeg built without libjxl). Probing is the only honest test: a listed
    encoder can still lack its decoder."""
    try:
        if kind == IMAGE:
            baselines.Baseline(codec, 1)(_probe_clip()[0], baselines.QUALITIES[codec][-1])
        else:
            video_baselines.encode_decode(_probe_clip(), codec, video_baselines.QUALITIES[codec][0])
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"
        text = str(exc).strip().splitlines()
        return text[0] if text else exc.__class__.__name__
    return None


# ----------------------------------------------------------------------------- items and tasks


@dataclass(frozen=True)
class Item:
    path: str
    name: str
    kind: str  # IMAGE or VIDEO
    sha256: str = ""  # of the file's bytes: stored results follow the content, not the name


@dataclass(frozen=True)
class EvalConfig:
    """What ``ulbc eval`` runs. ``None`` means the default of each media kind."""

    codecs: Optional[tuple] = None
    metrics: Optional[tuple] = None
    max_bpp: Optional[float] = None
    thresholds: tuple = DEFAULT_THRESHOLDS
    levels: Optional[tuple] = None  # video keyframe levels; images always run every level
    image_model: str = "default"
    video_model: str = "video"
    frames: int = DEFAULT_FRAMES
    quality_step: int = 1  # every n-th quality of each baseline grid (1: the full sweep)
    jobs: int = 1
    force: bool = False

    def max_bpp_for(self, kind: str) -> float:
        return DEFAULT_MAX_BPP[kind] if self.max_bpp is None else self.max_bpp

    def codecs_for(self, kind: str) -> tuple:
        return CODECS[kind] if self.codecs is None else tuple(c for c in self.codecs if c in CODECS[kind])

    def metrics_for(self, kind: str) -> tuple:
        return DEFAULT_METRICS[kind] if self.metrics is None else self.metrics

    def check(self) -> None:
        known = set(CODECS[IMAGE]) | set(CODECS[VIDEO])
        for name in self.codecs or ():
            if name not in known:
                raise EvalError(f"unknown codec {name!r} (images: {', '.join(CODECS[IMAGE])}; "
                                f"videos: {', '.join(CODECS[VIDEO])})")
        for name in self.metrics or ():
            metric_problem(name)  # raises on an unknown name
        if self.codecs is not None and not self.codecs:
            raise EvalError("--codecs names no codec")
        if self.metrics is not None and not self.metrics:
            raise EvalError("--metrics names no metric")


@dataclass(frozen=True)
class Task:
    """One codec's whole sweep over one item: the unit that is stored, skipped or rerun."""

    item: Item
    codec: str
    key: str  # hash of everything that affects the rows
    sweep: dict  # the settings to run (JSON-able, part of the key)
    metrics: tuple  # the metrics that can be computed here
    stream_dir: str  # where ulbc's .ulb files are kept
    frames: int = DEFAULT_FRAMES  # of a video: the first N are evaluated

    @property
    def result_name(self) -> str:
        return f"{_safe(self.item.name)}--{self.codec}--{self.key}.json"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def find_items(inputs: Sequence[str]) -> list[Item]:
    """Every image or video among ``inputs``: files as given, folders by extension
    (not recursive, dot files skipped). A path that does not exist is an error."""
    from ulbcodec.io import READ_EXTENSIONS, VIDEO_EXTENSIONS, is_video_path

    if not inputs:
        raise EvalError("no input given")
    paths = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            paths += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in READ_EXTENSIONS | VIDEO_EXTENSIONS)
        elif path.exists():
            paths.append(path)
        else:
            raise EvalError(f"{path}: no such file or folder")
    if not paths:
        raise EvalError(f"no images or videos in {', '.join(map(str, inputs))}")
    items, names = [], {}
    for path in paths:
        if path.name in names and names[path.name] != path.resolve():
            raise EvalError(f"{names[path.name]} and {path} have the same name; results are kept by name")
        if path.name not in names:
            names[path.name] = path.resolve()
            items.append(Item(str(path), path.name, VIDEO if is_video_path(path) else IMAGE))
    return items


def _sweep(kind: str, codec: str, config: EvalConfig, ulbc_levels: Sequence[int]) -> dict:
    if codec == ULBC and kind == IMAGE:
        return {"model": config.image_model, "levels": list(ulbc_levels), "downscales": list(ULBC_IMAGE_DOWNSCALES)}
    if codec == ULBC:
        return {"model": config.video_model, "levels": list(ulbc_levels), "thresholds": list(config.thresholds),
                "frames": config.frames}
    if kind == IMAGE:
        return {"qualities": sorted(baselines.QUALITIES[codec])[::config.quality_step],
                "downscales": list(baselines.DOWNSCALES), "max_bpp": config.max_bpp_for(kind)}
    return {"qualities": list(video_baselines.QUALITIES[codec])[::config.quality_step], "frames": config.frames,
            "max_bpp": config.max_bpp_for(kind)}


def _task_key(item: Item, codec: str, sweep: dict, metric_names: Sequence[str], model_digest: Optional[str]) -> str:
    """Changes whenever the rows could: the file's content, the settings, the metrics, the
    model, and the libraries that code the baselines."""
    libraries = {pkg: _version(pkg) for pkg in ("ulbc", "pillow", "imageio-ffmpeg")}
    spec = {"version": RESULTS_VERSION, "item": item.sha256, "kind": item.kind, "codec": codec, "sweep": sweep,
            "metrics": list(metric_names), "model": model_digest, "libraries": libraries}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- running one task


def _row(task: Task, pixels: np.ndarray, **fields) -> dict:
    frames, height, width = (pixels.shape[:3] if task.item.kind == VIDEO else (1, *pixels.shape[:2]))
    nbytes = fields.pop("bytes")
    return {"kind": task.item.kind, "item": task.item.name, "codec": task.codec, **fields,
            "width": width, "height": height, "frames": frames, "bytes": nbytes,
            "bpp": nbytes * 8 / (width * height * frames)}


def _finite_or_none(scores: dict) -> dict:
    # JSON has no NaN: an undefined value (MS-SSIM under 161 px) is null, an empty CSV cell.
    return {k: (v if v is None or math.isfinite(v) or v == math.inf else None) for k, v in scores.items()}


def run_task(task: Task) -> dict:
    """Every setting of one codec on one item: ``{"rows": [...], "notes": [...]}``."""
    item, sweep = task.item, task.sweep
    pixels, fps, notes = _load_item(item.path, item.kind, task.frames)
    notes = list(notes)
    if item.kind == IMAGE and "ms_ssim" in task.metrics and min(pixels.shape[:2]) < metrics.MS_SSIM_MIN_SIDE:
        notes.append(f"MS-SSIM is undefined under {metrics.MS_SSIM_MIN_SIDE} px (left empty, not replaced)")
    rows = []
    if item.kind == IMAGE and task.codec == ULBC:
        from ulbcodec.io import write_bytes

        codec = _image_codec(sweep["model"])
        for downscale in sweep["downscales"]:
            for level in sweep["levels"]:
                stream, decoded, encode_s, decode_s = timed_round_trip(
                    lambda lv=level, f=downscale: codec.encode(pixels, rate_level=lv, downscale=f).data, codec.decode)
                # kept so that the reader can decode it: the row's bytes are this file's size
                path = Path(task.stream_dir) / f"{_safe(item.name)}--ulbc-l{level}-d{downscale}--{task.key}.ulb"
                write_bytes(path, stream, force=True)
                rows.append(_row(task, pixels, curve=ULBC if downscale == 1 else f"{ULBC}@1/{downscale}",
                                 downscale=downscale, setting=level, bytes=len(stream),
                                 **_finite_or_none(image_scores(pixels, decoded, task.metrics)),
                                 encode_s=encode_s, decode_s=decode_s, stream=path.name))
    elif item.kind == IMAGE:
        for downscale in sweep["downscales"]:
            variant = baselines.Baseline(task.codec, downscale)
            for quality in sweep["qualities"]:  # lowest rate first
                stream, decoded, encode_s, decode_s = timed_round_trip(lambda q=quality: variant.encode(pixels, q),
                                                                       variant.decode)
                rows.append(_row(task, pixels, curve=variant.name, downscale=downscale, setting=quality,
                                 bytes=len(stream), **_finite_or_none(image_scores(pixels, decoded, task.metrics)),
                                 encode_s=encode_s, decode_s=decode_s))
                if rows[-1]["bpp"] > sweep["max_bpp"]:  # that first point above is kept: curves bracket the range
                    break
    elif task.codec == ULBC:
        from ulbcodec.video import VideoSettings

        codec = _video_codec(sweep["model"])
        for level in sweep["levels"]:
            for threshold in sweep["thresholds"]:
                path = Path(task.stream_dir) / f"{_safe(item.name)}--ulbc-l{level}-t{threshold}--{task.key}.ulb"
                data, gops, decoded, encode_s, decode_s = ulbc_video_round_trip(
                    codec, pixels, fps, VideoSettings(threshold=threshold, rate_level=level), path)
                rows.append(_row(task, pixels, curve=f"{ULBC} q{level}", downscale=1, setting=threshold,
                                 bytes=path.stat().st_size, **_finite_or_none(video_scores(pixels, decoded,
                                                                                            task.metrics)),
                                 encode_s=encode_s, decode_s=decode_s, stream=path.name, level=level,
                                 frame_types=gops.frame_types()))
    else:
        for quality in sweep["qualities"]:  # highest quantiser (lowest rate) first
            t0 = time.perf_counter()
            result = video_baselines.encode_decode(pixels, task.codec, quality, float(fps))
            seconds = time.perf_counter() - t0
            # encode_decode is one ffmpeg round trip: its time is reported as encode_s
            rows.append(_row(task, pixels, curve=task.codec, downscale=1, setting=quality,
                             bytes=result.charged_bytes, **_finite_or_none(video_scores(pixels, result.decoded,
                                                                                        task.metrics)),
                             encode_s=seconds, decode_s=None, container_bytes=result.mp4_bytes))
            if rows[-1]["bpp"] > sweep["max_bpp"]:
                break
    return {"rows": rows, "notes": notes}


def _init_worker() -> None:
    import torch

    from ulbcodec.resources import keep_freed_memory

    torch.set_num_threads(1)  # the pool is the parallelism
    keep_freed_memory()


# ----------------------------------------------------------------------------- curves


def _finite(value) -> bool:
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
    usable = [p for p in points if _finite(p.get(metric))]
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
        value = metrics.bd_rate([p["bpp"] for p in anchor], [sign * p[metric] for p in anchor],
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


# ----------------------------------------------------------------------------- plots


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
        pts = sorted((p for p in in_window(points, lo, hi) if _finite(p.get(metric))), key=lambda p: p["setting"])
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


# ----------------------------------------------------------------------------- crop sheet


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
    if metric and any(_finite(r.get(metric)) for r in close):
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        best = max((r for r in close if _finite(r.get(metric))), key=lambda r: sign * r[metric])
    else:
        best = min(theirs, key=lambda r: abs(math.log(r["bpp"] / target["bpp"])))
    return target, best


def _decoded_frame(row: dict, item: Item, config: EvalConfig, stream_dir: Path) -> np.ndarray:
    """The decoded pixels of one row (a video's middle frame): ulbc from its stored .ulb,
    a baseline coded again (deterministic, so nothing large needs to be kept)."""
    pixels, fps, _ = _load_item(item.path, item.kind, config.frames)
    if item.kind == IMAGE:
        if row["codec"] == ULBC:
            return _image_codec(config.image_model).decode((stream_dir / row["stream"]).read_bytes())
        return baselines.Baseline(row["codec"], row["downscale"])(pixels, row["setting"])[1]
    if row["codec"] == ULBC:
        frames = list(_video_codec(config.video_model).decode((stream_dir / row["stream"]).read_bytes()))
    else:
        frames = video_baselines.encode_decode(pixels, row["codec"], row["setting"], float(fps)).decoded
    return frames[len(frames) // 2]


def _centre_crop(rgb: np.ndarray, side: int = CROP_SIDE) -> np.ndarray:
    h, w = rgb.shape[:2]
    ch, cw = min(side, h), min(side, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[top:top + ch, left:left + cw]


def crop_sheet(rows: list[dict], items: list[Item], config: EvalConfig, metric: Optional[str], stream_dir: Path,
               path: Path) -> list[dict]:
    """Original / ulbc / best baseline at matched rate for up to CROP_ITEMS items, centre
    crops of CROP_SIDE px; returns the pairs shown (empty: no sheet written)."""
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
        pixels = _load_item(item.path, item.kind, config.frames)[0]
        original = pixels if item.kind == IMAGE else pixels[len(pixels) // 2]
        panels = [(original, f"{item.name}\noriginal")]
        for row in (ours, theirs):
            score = f", {metric} {row[metric]:.3f}" if metric and _finite(row.get(metric)) else ""
            panels.append((_decoded_frame(row, item, config, stream_dir),
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


# ----------------------------------------------------------------------------- the run


@dataclass
class EvalReport:
    """What a run did: the CLI prints the summary and exits non-zero on failures."""

    out: Path
    computed: int = 0
    reused: int = 0
    failures: list = dataclasses.field(default_factory=list)  # {"item", "codec", "error"}
    summary: str = ""


def _atomic_text(path: Path, text: str) -> None:
    from ulbcodec.io import write_bytes

    write_bytes(path, text.encode(), force=True)


def _ulbc_setup(kind: str, config: EvalConfig) -> tuple[list[int], str]:
    """(rate levels to run, model digest) of ulbc for one media kind; a model that cannot
    be loaded is an EvalError (evaluating ulbc is the point; --codecs can leave it out)."""
    from ulbcodec.models.package import ModelError

    name = config.image_model if kind == IMAGE else config.video_model
    try:
        image = _image_codec(name) if kind == IMAGE else _video_codec(name).image
    except ModelError as exc:
        raise EvalError(f"{exc} (leave ulbc out with --codecs to evaluate the baselines alone)") from None
    levels = image.rate_levels
    if kind == IMAGE:
        return levels, image.package.digest
    chosen = list(config.levels) if config.levels else sorted({levels[0], image.default_level})
    bad = [lv for lv in chosen if lv not in levels]
    if bad:
        raise EvalError(f"--levels {','.join(map(str, bad))}: model {name!r} has rate levels "
                        f"{levels[0]}..{levels[-1]}")
    return chosen, image.package.digest


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run(inputs: Sequence[str], out, config: EvalConfig, progress: bool = False,
        note: Callable[[str], None] = _stderr, error: Callable[[str], None] = _stderr) -> EvalReport:
    """Evaluate every item of ``inputs`` with every codec and write the outputs in ``out``.

    Raises :class:`EvalError` for problems with the whole run (no items, unknown names, a
    ulbc model that does not load); a failing item or task is recorded, passed to
    ``error`` as one line, and the rest go on. ``note`` gets the unavailable metrics and
    codecs.
    """
    from ulbcodec.models.package import sha256_file

    config.check()
    items = find_items(inputs)
    out = Path(out)
    results_dir, stream_dir = out / "items", out / "streams"
    report = EvalReport(out)
    kinds = [k for k in KINDS if any(i.kind == k for i in items)]

    metric_status, codec_status, ulbc_levels, digests = {}, {}, {}, {}
    for kind in kinds:
        for name in config.metrics_for(kind):
            problem = metric_problem(name)
            metric_status[kind, name] = problem
            if problem:
                note(f"ulbc: note: {kind}s: metric {name} unavailable: {problem}")
        if not config.codecs_for(kind):
            note(f"ulbc: note: none of --codecs applies to {kind}s (their codecs: {', '.join(CODECS[kind])}); "
                 f"{kind}s are skipped")
        for codec in config.codecs_for(kind):
            if codec == ULBC:
                ulbc_levels[kind], digests[kind] = _ulbc_setup(kind, config)
                problem = None
            else:
                problem = codec_problem(kind, codec)
            codec_status[kind, codec] = problem
            if problem:
                note(f"ulbc: note: {kind}s: codec {codec} unavailable: {problem}")

    usable = []
    for item in items:
        try:
            _load_item(item.path, item.kind, config.frames)
            usable.append(dataclasses.replace(item, sha256=sha256_file(item.path)))
        except (ValueError, OSError) as exc:
            from ulbcodec.batch import describe_error

            report.failures.append({"item": item.name, "codec": None, "error": describe_error(exc, Path(item.path))})
    if not usable:
        first = report.failures[0]["error"]
        raise EvalError(first if len(items) == 1 else f"none of the {len(items)} inputs could be read ({first})")
    for failure in report.failures:
        error(f"ulbc: error: {failure['error']}")
    items = usable

    tasks = []
    for item in items:
        computable = tuple(m for m in config.metrics_for(item.kind) if not metric_status[item.kind, m])
        for codec in config.codecs_for(item.kind):
            if codec_status[item.kind, codec]:
                continue
            sweep = _sweep(item.kind, codec, config, ulbc_levels.get(item.kind, ()))
            key = _task_key(item, codec, sweep, computable, digests.get(item.kind) if codec == ULBC else None)
            tasks.append(Task(item, codec, key, sweep, computable, str(stream_dir), config.frames))
    results = {}  # result_name -> stored result
    pending = []
    for task in tasks:
        stored = results_dir / task.result_name
        if stored.is_file() and not config.force:
            results[task.result_name] = json.loads(stored.read_text())
            report.reused += 1
        else:
            pending.append(task)
    _run_pending(pending, config.jobs, results_dir, results, report, progress, error)

    done = [results[t.result_name] for t in tasks if t.result_name in results]
    rows = [row for result in done for row in result["rows"]]
    for row in rows:  # an unavailable metric is an explicit null in every row, not a missing key
        for name in config.metrics_for(row["kind"]):
            row.setdefault(name, None)
    notes = sorted({f"{result['item']}: {n}" for result in done for n in result["notes"]})
    report.summary = write_outputs(out, inputs, items, rows, config, kinds, metric_status, codec_status, digests,
                                   report, notes, stream_dir)
    return report


def _run_pending(pending: list[Task], jobs: int, results_dir: Path, results: dict, report: EvalReport,
                 progress: bool, error_line: Callable[[str], None]) -> None:
    from tqdm import tqdm

    from ulbcodec.batch import describe_error

    bar = tqdm(total=len(pending), unit="task", disable=not progress, file=sys.stderr, leave=False)

    def finished(task: Task, result: Optional[dict], exc: Optional[BaseException]) -> None:
        bar.update(1)
        if exc is not None:
            error = describe_error(exc, Path(task.item.path))
            report.failures.append({"item": task.item.name, "codec": task.codec, "error": error})
            bar.clear()
            error_line(f"ulbc: error: {task.codec}: {error}")
            return
        result = {"item": task.item.name, "path": task.item.path, "sha256": task.item.sha256, "codec": task.codec,
                  "key": task.key, "sweep": task.sweep, "metrics": list(task.metrics), **result}
        _atomic_text(results_dir / task.result_name, json.dumps(result, indent=1))  # the resume point
        results[task.result_name] = result
        report.computed += 1

    try:
        if jobs <= 1 or len(pending) <= 1:
            for task in pending:
                bar.set_postfix_str(f"{task.item.name} {task.codec}", refresh=False)
                try:
                    result, exc = run_task(task), None
                except Exception as e:  # noqa: BLE001 - one failed task is recorded, the rest go on
                    result, exc = None, e
                finished(task, result, exc)
            return
        import multiprocessing

        with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(run_task, task): task for task in pending}
            try:
                for future in as_completed(futures):
                    exc = future.exception()
                    finished(futures[future], None if exc else future.result(), exc)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        bar.close()


# ----------------------------------------------------------------------------- outputs


def _environment() -> dict:
    versions = {pkg: _version(pkg) for pkg in ("ulbc", "numpy", "pillow", "torch", "pytorch-msssim",
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
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def write_outputs(out: Path, inputs, items, rows, config: EvalConfig, kinds, metric_status, codec_status, digests,
                  report: EvalReport, notes, stream_dir: Path) -> str:
    """points, aggregate, bd_rates (CSV and JSON), RD plots, crop sheets, summary.md."""
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
    _atomic_text(out / "points.csv", _csv_text(rows, fields))
    _atomic_text(out / "points.json", json.dumps({**head, "points": rows}, indent=1))

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
            if any(_finite(p.get(m)) for pts in curves.values() for p in pts):
                plot(curves, m, 0, hi, out / f"rd_{kind}_{m}.png", ylabel=label(m, kind),
                     title=f"{label(m, kind)} vs rate, mean over {kind}s (thin: variants, bold: envelopes)")
        primary = next((m for m in available if any(_finite(r.get(m)) for r in kind_rows)), None)
        kind_items = [i for i in items if i.kind == kind]
        crops = crop_sheet(kind_rows, kind_items, config, primary, stream_dir, out / f"crops_{kind}.png")
        aggregate[kind] = {"max_bpp": hi, "curves": curves, "envelopes": envelopes, "bd_rates": bd, "crops": crops}
        sections.append(_summary_section(kind, kind_items, curves, bd, config, metric_status, codec_status, hi,
                                         crops))
    _atomic_text(out / "aggregate.json", json.dumps({**head, "kinds": aggregate}, indent=1))
    _atomic_text(out / "aggregate.csv", _csv_text(mean_points, ["kind", "curve", "codec", "downscale", "setting",
                                                                "n_items", "bpp", *all_metrics]))
    _atomic_text(out / "bd_rates.csv", _csv_text(bd_rows, ["kind", "test", "anchor", "metric", "bd_rate_percent",
                                                           "items_used", "items", "reason"]))
    summary = _summary(inputs, items, sections, report, notes)
    _atomic_text(out / "summary.md", summary)
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
