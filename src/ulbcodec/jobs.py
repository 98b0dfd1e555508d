"""Jobs: encode or decode one input as a library call, the layer under the command line.

::

    cli.py (options, printing) ─► batch.run / ray_batch.run ─► job(codec, task) per file
    encode_job:  input ─► output check ─► memory budget + device report ─► image or video
                 encoder (loaded once per worker: Encoders) ─► .ulb bytes ─► output
    decode_job:  .ulb ─► container ─► memory budget + device report ─► codec by model digest
                 (DecoderSet: image, or image + frame predictor for videos) ─► image/video output

Each job is a module-level function (picklable for process and Ray workers) returning one
record dict per file; every failure is an exception that :func:`ulbcodec.task.guard` turns
into a record. The memory budget and the device report come from the file's header (or the
image header) before any pixel is decoded, so a job that cannot fit fails at once.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ulbcodec import resources
from ulbcodec.bitstream import DEFAULT_MAX_PIXELS, Container, Header
from ulbcodec.task import Task


@contextlib.contextmanager
def skipping_existing(skip_existing: bool):
    """With --skip-existing, an output that exists (or appears while the job runs, from
    another run) makes the job a skip instead of a failure."""
    from ulbcodec.task import Skipped
    from ulbcodec.io import OutputExistsError

    try:
        yield
    except OutputExistsError:
        if not skip_existing:
            raise
        raise Skipped("output exists") from None


def is_video_input(path: Path) -> bool:
    from ulbcodec.io import is_video_path

    return is_video_path(path) or path.is_dir()  # a folder given as one input is a frame sequence


def encode_job(encoders, task, quality: Optional[int], bpp: Optional[float], downscale: int, force: bool,
               skip_existing: bool = False, budget=None, video=None, progress: bool = False,
               quiet: bool = False, refine=None, color_stats=None) -> dict:
    if is_video_input(task.src):
        return encode_video_job(encoders.video, task, quality, bpp, force, skip_existing, budget, video, progress,
                                quiet)
    codec = encoders.image
    from ulbcodec.io import check_input, check_output, image_size, read_image, write_bytes

    with skipping_existing(skip_existing):
        check_output(task.dst, force)  # fail before spending time on the image
        check_input(task.src)
        if budget is not None:  # from the image header, before any pixel is decoded
            width, height = image_size(task.src)
            factor = 1 if bpp is not None else downscale  # --bpp tries full size first
            uses_vae = getattr(codec.model, "vae_channels", 0) > 0
            weights = resources.weights_bytes(codec.package, None if uses_vae else ["anchor_codec"])
            estimate = resources.estimate_encode(width, height, factor, uses_vae, weights, refine is not None)
            budget.check(estimate, f"encoding {width}x{height}" + (f" at 1/{factor} size" if factor > 1 else ""))
        if codec.device.type != "cpu":  # from the image header, like the memory check
            width, height = image_size(task.src)
            announce_device(codec, width, height, getattr(codec.model, "vae_channels", 0) > 0,
                             f"encoding {width}x{height}", quiet, 1 if bpp is not None else downscale)
        rgb, notes = read_image(task.src)
        if bpp is not None:
            result, met = codec.encode_to_bpp(rgb, bpp, refine=refine, color_stats=color_stats)
            if not met:
                notes.append(f"target {bpp} bpp is below the smallest file ulbc makes ({result.bpp:.5f} bpp, "
                             f"level {result.rate_level} at 1/{result.downscale} size)")
        else:
            result = codec.encode(rgb, codec.default_level if quality is None else quality, downscale, refine,
                                  color_stats)
        write_bytes(task.dst, result.data, force=force)
    return {"width": result.width, "height": result.height, "rate_level": result.rate_level,
            "downscale": result.downscale, "bytes": len(result.data), "bpp": round(result.bpp, 6), "notes": notes,
            "timings": {k: round(v, 3) for k, v in result.timings.items()}}


def encode_video_job(codec, task, quality: Optional[int], bpp: Optional[float], force: bool, skip_existing: bool,
                     budget, settings, progress: bool, quiet: bool = False) -> dict:
    import dataclasses

    from tqdm import tqdm

    from ulbcodec.io import VideoReader, check_output, write_bytes
    from ulbcodec.video import file_bpp

    with skipping_existing(skip_existing):
        check_output(task.dst, force)
        reader = VideoReader(task.src)  # size and rate from the header; frames are streamed
        (width, height), notes = reader.size, []
        if budget is not None:  # a window of K + P frames: the image decoder's peak per frame
            budget.check(resources.estimate_decode(width, height, 1, True, resources.weights_bytes(codec.package)),
                         f"encoding {width}x{height} video")
        announce_device(codec.image, width, height, True, f"encoding {width}x{height} video", quiet, video=True)
        settings = dataclasses.replace(settings, rate_level=quality)
        t0 = time.perf_counter()
        log: List = []
        if bpp is not None:
            reader.close()
            data, gops, settings, met = codec.encode_to_bpp(lambda: VideoReader(task.src), reader.fps, settings, bpp)
            if not met:
                notes.append(f"target {bpp} bpp is below the smallest file ulbc makes ({file_bpp(data):.5f} bpp, "
                             f"level {settings.rate_level}, threshold {settings.threshold})")
        else:
            with tqdm(total=reader.expected_frames, unit="frame", disable=not progress, file=sys.stderr,
                      leave=False) as bar:
                data, gops = codec.encode(reader, reader.fps, settings, frame_log=log.append,
                                          progress=lambda done: bar.update(done - bar.n))
        seconds = time.perf_counter() - t0
        write_bytes(task.dst, data, force=force)
    level = codec.image.default_level if settings.rate_level is None else settings.rate_level
    return {"media": "video", "width": width, "height": height, "frames": gops.frames, "rate_level": level,
            "threshold": settings.threshold, "keyframes": gops.keyframes, "anchored_rounds": gops.anchored_rounds,
            "pframes": gops.pframes, "frame_types": gops.frame_types(),
            "bytes": len(data), "bpp": round(file_bpp(data), 6), "notes": notes,
            "frame_log": [{"frame": r.index, "type": r.type, "bytes": r.bytes,
                           "bpp": round(r.bytes * 8 / (width * height), 6),
                           "distance": None if r.distance is None else round(r.distance, 5),
                           **({"parts": r.parts} if r.parts else {})} for r in log],
            "timings": {"frames_per_s": round(gops.frames / seconds, 3)}}


def decode_video(decoders, container, task, force: bool, video_format: str, lossless: bool, progress: bool):
    """Frames streamed from the decoder to the output (mp4/mkv/y4m or a frame folder)."""
    from tqdm import tqdm

    from ulbcodec.io import (IMAGE_EXTENSIONS, OutputError, check_frame_folder, check_output, video_output_kind,
                             write_video)

    dst = task.dst
    if dst.suffix.lower() in IMAGE_EXTENSIONS:
        if task.planned:  # --out-dir: the image suffix was a default, videos get theirs
            dst = dst.with_suffix("" if video_format == "frames" else "." + video_format)
        else:
            raise OutputError(f"{task.src} is a video; write it to .mp4, .mkv, .y4m or a folder, not {dst.suffix}")
    # Before decoding (checked again when the output is put in place).
    if video_output_kind(dst) == "frames":
        check_frame_folder(dst, force)  # --force replaces a folder of frames, nothing else
    else:
        check_output(dst, force)
    h = container.header
    codec = decoders.video_for(h)
    t0 = time.perf_counter()
    with tqdm(total=h.frames, unit="frame", disable=not progress, file=sys.stderr, leave=False) as bar:
        def frames():
            for frame in codec.decode_container(container):
                bar.update(1)
                yield frame

        write_video(dst, frames(), h.fps_fraction, force=force, lossless=lossless)
    fps = h.frames / (time.perf_counter() - t0)
    return dst, {"media": "video", "frames": h.frames, "timings": {"frames_per_s": round(fps, 3)}}


def decode_job(codec, task, force: bool, anchor_only: bool = False, steps: int = 1, seed: Optional[int] = None,
               skip_existing: bool = False, budget=None, video_format: str = "mp4", lossless: bool = False,
               progress: bool = False, quiet: bool = False, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> dict:
    from ulbcodec.bitstream import MEDIA_VIDEO, check_work, read_file
    from ulbcodec.io import (IMAGE_EXTENSIONS, check_input, check_output, image_format, input_error, video_output_kind,
                             write_image)

    is_image_dst = task.dst.suffix.lower() in IMAGE_EXTENSIONS
    if is_image_dst:
        image_format(task.dst)
    else:
        video_output_kind(task.dst)
    with skipping_existing(skip_existing):
        if is_image_dst:
            check_output(task.dst, force)
        check_input(task.src)
        try:
            container = read_file(task.src)
        except OSError as exc:
            raise input_error(task.src, exc) from None
        check_work(container, max_pixels)  # GOP runs and decoded pixels from the header, before any work
        h = container.header
        if h.media == MEDIA_VIDEO:
            if anchor_only or steps > 1:
                raise ValueError(f"{task.src}: --anchor-only and --steps apply to images, this file is a video")
            if budget is not None:
                from ulbcodec.resources import estimate_decode_file

                budget.check(estimate_decode_file(h, codec.codec_for(h).package, True),
                             f"decoding {h.width}x{h.height} video")
            announce_device(codec.codec_for(h), h.width, h.height, True, f"decoding {h.width}x{h.height} video",
                             quiet, video=True)
            dst, record = decode_video(codec, container, task, force, video_format, lossless, progress)
            pixels = h.width * h.height * h.frames
            return {"output": str(dst), "width": h.width, "height": h.height, "rate_level": h.rate_level,
                    "bytes": container.total_bytes, "bpp": round(container.total_bytes * 8 / pixels, 6), **record}
        if not is_image_dst:
            raise ValueError(f"{task.src} is an image; write it to .png, .jpg, .webp or .tiff")
        image_codec = codec.codec_for(h) if hasattr(codec, "codec_for") else codec
        generative = image_codec.is_generative and not anchor_only
        if budget is not None:  # from the header, before entropy decoding
            from ulbcodec.resources import estimate_decode_file

            budget.check(estimate_decode_file(h, image_codec.package, generative), f"decoding {h.width}x{h.height}")
        announce_device(image_codec, h.width, h.height, generative, f"decoding {h.width}x{h.height}", quiet,
                         h.params.get("downscale", 1))
        rgb = codec.decode_container(container, anchor_only=anchor_only, steps=steps, seed=seed)
        write_image(task.dst, rgb, force=force)
    return {"width": h.width, "height": h.height, "rate_level": h.rate_level,
            "downscale": h.params.get("downscale", 1), "bytes": container.total_bytes,
            "bpp": round(container.total_bytes * 8 / (h.width * h.height), 6),
            "timings": {k: round(v, 3) for k, v in codec.last_timings.items()}}


@functools.lru_cache(maxsize=2)
def load_codec(model: str, device):
    from ulbcodec.image import ImageCodec

    return ImageCodec.from_pretrained(model, device=device)


class Encoders:
    """The image and video encoders of one encode command, each loaded on first use:
    ``--model`` for both, else the default image model and the default video model."""

    def __init__(self, model: Optional[str], device):
        self.model, self.device = model, device  # a device name or a Placement
        self._image = self._video = None

    @property
    def image(self):
        if self._image is None:
            self._image = load_codec(self.model or "default", self.device)
        return self._image

    @property
    def video(self):
        if self._video is None:
            from ulbcodec.video import VideoCodec

            image = load_codec(self.model or "video", self.device)
            self._video = VideoCodec(image.package, self.device, image=image)
        return self._video


@functools.lru_cache(maxsize=2)
def load_encoders(need_image: bool, need_video: bool, model: Optional[str], device) -> Encoders:
    encoders = Encoders(model, device)
    if need_image:  # load now: a bad --model fails once, before any work
        encoders.image
    if need_video:
        encoders.video
    return encoders


@functools.lru_cache(maxsize=2)
def load_decoders(model: Optional[str], device):
    return DecoderSet(model, device=device)


def batch_budget(verb: str, tasks: Sequence[Task], jobs: int, skip_existing: bool, max_memory: Optional[int],
                 source: str, engine: str = "local"):
    """The memory budget of a batch (None: no limit): ``max_memory`` bytes shared by the
    workers that will run (``source`` names where the limit came from). Local workers
    share a pool (a file waits until its estimate fits what the others leave), Ray
    actors an equal part each (:class:`resources.Budget`)."""
    if max_memory is None:  # 'none', or a platform that does not report its memory
        return None
    pending = sum(1 for t in tasks if not (skip_existing and t.dst.is_file()))
    workers = min(jobs, pending) if jobs > 1 and pending > 1 else 1
    return resources.Budget.shared(max_memory, workers, verb, source, pooled=engine != "ray")


def placement(device: str, offload: str):
    """The device, diffusers dtype and offload mode of one command's codecs."""
    import torch

    from ulbcodec.placement import Placement

    return Placement(torch.device(device), offload)


def announce_device(codec, width: int, height: int, generative: bool, what: str, quiet: bool,
                    downscale: int = 1, video: bool = False) -> None:
    """On a GPU, before the job: its device-memory estimate (one line, unless -q), or a
    one-line refusal when it cannot fit the free memory."""
    from ulbcodec.placement import device_report

    line = device_report(codec.package, codec.placement, width, height, generative, what, downscale, video)
    if line and not quiet:
        print(f"ulbc: {line}", file=sys.stderr, flush=True)


class DecoderSet:
    """Decoders by model, each loaded once: one fixed model, or (``model=None``) for each
    file the installed package whose digest the file names, so that decoding needs no flag
    or config file. Images decode with :meth:`codec_for`'s image codec, videos with
    :meth:`video_for`'s video codec on the same image codec."""

    def __init__(self, model: Optional[str] = None, device="cpu"):
        from ulbcodec.image import ImageCodec

        self.device = device  # a device name or a Placement, passed on to every codec
        self.fixed = ImageCodec.from_pretrained(model, device) if model is not None else None
        self.by_digest: Dict[bytes, "ImageCodec"] = {}  # noqa: F821
        self.videos: Dict[bytes, "VideoCodec"] = {}  # noqa: F821 - built on first use
        self.last_timings: Dict[str, float] = {}

    def codec_for(self, header: Header):
        """The image codec of the file's model."""
        from ulbcodec import packages
        from ulbcodec.image import DecodeError, ImageCodec

        if self.fixed is not None:
            return self.fixed
        if header.model_digest not in self.by_digest:
            path = packages.find_by_digest(header.model_digest)
            if path is None:
                raise DecodeError(
                    f"file was encoded with model {header.model_digest.hex()}, which is not installed "
                    f"(search path: $ULBC_MODEL_PATH, then models/); pass --model PATH"
                )
            self.by_digest[header.model_digest] = ImageCodec.from_pretrained(str(path), self.device)
        return self.by_digest[header.model_digest]

    def video_for(self, header: Header):
        """The video codec (image model + frame predictor) of the file's package."""
        from ulbcodec.video import VideoCodec

        image = self.codec_for(header)
        key = image.package.short_digest
        if key not in self.videos:
            self.videos[key] = VideoCodec(image.package, self.device, image=image)
        return self.videos[key]

    def decode_container(self, container: Container, **options):
        codec = self.codec_for(container.header)
        rgb = codec.decode_container(container, **options)
        self.last_timings = codec.last_timings
        return rgb
