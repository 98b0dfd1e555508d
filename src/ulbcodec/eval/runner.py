"""The evaluation run: items, the (item x codec) tasks with their resumable results cache,
the worker pool, and the round trips through each codec (see :mod:`ulbcodec.eval`).

Each task's result is stored under RESULTS_DIR/items/ with a key that hashes the file's
content and every setting, so a rerun skips finished tasks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ulbcodec import baselines, metrics, video_baselines
from ulbcodec.eval import IMAGE, KINDS, ULBC, VIDEO, EvalError
from ulbcodec.eval.report import EvalReport, atomic_text, package_version, write_outputs
from ulbcodec.eval.scoring import DEFAULT_METRICS, image_scores, metric_problem, video_scores

CODECS = {IMAGE: (ULBC, *baselines.CODECS), VIDEO: (ULBC, *video_baselines.CODECS)}
ULBC_IMAGE_DOWNSCALES = (1, 2, 4)  # the .ulb header records the factor; the decoder upsamples
DEFAULT_MAX_BPP = {IMAGE: 0.15, VIDEO: 0.1}
DEFAULT_THRESHOLDS = (0.3, 0.5)
DEFAULT_FRAMES = 30
# Bump when a change makes stored item results incomparable with new ones.
RESULTS_VERSION = 1


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
    levels: Optional[tuple] = None  # video keyframe levels; images run every level (and half level)
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
    libraries = {pkg: package_version(pkg) for pkg in ("ulbc", "pillow", "imageio-ffmpeg")}
    spec = {"version": RESULTS_VERSION, "item": item.sha256, "kind": item.kind, "codec": codec, "sweep": sweep,
            "metrics": list(metric_names), "model": model_digest, "libraries": libraries}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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


# ----------------------------------------------------------------------------- the run


def _original_frame(item: Item, frames: int) -> np.ndarray:
    """The original pixels of an item (a video's middle frame)."""
    pixels = _load_item(item.path, item.kind, frames)[0]
    return pixels if item.kind == IMAGE else pixels[len(pixels) // 2]


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


def _ulbc_setup(kind: str, config: EvalConfig) -> tuple[list, str]:
    """(rate levels to run, model digest) of ulbc for one media kind; a model that cannot
    be loaded is an EvalError (evaluating ulbc is the point; --codecs can leave it out)."""
    from ulbcodec.packages import ModelError

    name = config.image_model if kind == IMAGE else config.video_model
    try:
        image = _image_codec(name) if kind == IMAGE else _video_codec(name).image
    except ModelError as exc:
        raise EvalError(f"{exc} (leave ulbc out with --codecs to evaluate the baselines alone)") from None
    levels = image.rate_levels
    if kind == IMAGE:  # every level, and the half levels between on a continuous-rate codec
        halves = [lv + 0.5 for lv in levels[:-1]] if image.continuous_levels else []
        return sorted(levels + halves), image.package.digest
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
    from ulbcodec.packages import sha256_file

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
            from ulbcodec.task import describe_error

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
                                   report, notes, functools.partial(_original_frame, frames=config.frames),
                                   functools.partial(_decoded_frame, config=config, stream_dir=stream_dir))
    return report


def _run_pending(pending: list[Task], jobs: int, results_dir: Path, results: dict, report: EvalReport,
                 progress: bool, error_line: Callable[[str], None]) -> None:
    from tqdm import tqdm

    from ulbcodec.task import describe_error

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
        atomic_text(results_dir / task.result_name, json.dumps(result, indent=1))  # the resume point
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
