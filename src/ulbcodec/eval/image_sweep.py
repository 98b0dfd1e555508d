"""Image RD sweeps for the benchmarks (benchmarks/image_rd.py, generative.py and the
scripts that read their images): the images of a folder, every baseline variant and ulbc
over them, one row per (image, codec variant, setting) with its rate and metrics.

``ulbc eval`` runs its own resumable tasks (:mod:`ulbcodec.eval.runner`); both use the
scoring of :mod:`ulbcodec.eval.scoring` and the curve rules of :mod:`ulbcodec.eval.rd`.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ulbcodec import baselines
from ulbcodec.eval import ULBC
from ulbcodec.eval.rd import average_curves as _average_curves
from ulbcodec.eval.runner import timed_round_trip
from ulbcodec.eval.scoring import image_scores, metric_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm"}
METRICS = ("psnr", "ms_ssim", "vmaf", "vmaf_neg", "ssimulacra2", "butteraugli", "butteraugli_max",
           "log_spectrum_error", "blockiness", "delta_e", "color_shift")


def metrics_here() -> tuple:
    """The sweep's :data:`METRICS` that can run on this machine (ulbcodec.eval.scoring)."""
    return tuple(m for m in METRICS if metric_problem(m) is None)


def list_images(folder: str, count: int = 0) -> list[str]:
    """The images in ``folder`` (by suffix), sorted by name; the first ``count`` when it is > 0."""
    paths = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:count] if count else paths


@functools.lru_cache(maxsize=None)
def load_image(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def measure(ref: np.ndarray, stream: bytes, decoded: np.ndarray) -> dict:
    """Rate and every metric of one coded image (NaN: below the metric's minimum size, or
    the metric cannot run here)."""
    return {"bytes": len(stream), "bpp": baselines.bpp(stream, ref.shape), **dict.fromkeys(METRICS, float("nan")),
            **image_scores(ref, decoded, metrics_here())}


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


def average_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """``{curve: [point]}``: per setting, the mean rate and metrics over all images."""
    return _average_curves(rows, METRICS, item_key="image")
