"""The ``ulbc`` command line: parses options, calls the job layer (jobs.py, batch.py) and prints.

Conventions follow cwebp/cjxl/avifenc: one verb, inputs, ``-o`` output, quiet by default,
a progress bar for batches, one summary line. Exit codes: 0 all good, 1 some inputs
failed (the others are still done), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import logging
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

import click

from ulbcodec import __version__, resources
from ulbcodec.batch import interrupt_once  # stdlib-only modules: keep `ulbc --help` fast
from ulbcodec.bitstream import DEFAULT_MAX_PIXELS, DOWNSCALES, MAX_PIXELS_PER_FILE_BYTE

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_STDIN_IMAGE_BYTES = 1 << 30  # `ulbc encode -`: an image read from standard input


def _fail(message: str, code: int = EXIT_FAILED):
    click.echo(f"ulbc: error: {message}", err=True)
    sys.exit(code)


def _finite(value):
    """A click callback: refuse nan and inf (FloatRange lets nan through)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _verbosity(quiet: bool, verbose: int) -> int:
    return -1 if quiet else verbose


# ------------------------------------------------------------------ shared batch driver


def _run_batch(verb: str, tasks, factory, job, jobs: int, as_json: bool, verbosity: int,
               skip_existing: bool = False, engine: str = "local", stdio: Optional["_Stdio"] = None) -> None:
    from tqdm import tqdm

    from ulbcodec import batch
    from ulbcodec.task import display_path

    started = time.perf_counter()
    failed, skipped, total_bytes, total_pixels = [], 0, 0, 0
    # The bar is for a person at a terminal; in a log its carriage returns would glue
    # themselves to the error lines.
    show_bar = verbosity >= 0 and len(tasks) > 1 and not as_json and sys.stderr.isatty()
    bar = tqdm(total=len(tasks), unit="file", disable=not show_bar, file=sys.stderr, leave=False)
    records = batch.run(tasks, factory, job, jobs, skip_existing=skip_existing, engine=engine,
                        budget=getattr(job, "keywords", {}).get("budget"))
    try:
        for record in records:
            if stdio is not None:
                record = stdio.shown(record)
            bar.update(1)
            if as_json:
                click.echo(json.dumps(record))
            if not record["ok"]:
                failed.append(record)
                bar.clear()
                click.echo(f"ulbc: error: {record['error']}", err=True)
                continue
            if record.get("skipped"):
                skipped += 1
                if verbosity >= 1 and not as_json:
                    bar.clear()
                    click.echo(f"{display_path(record['input'])} -> {display_path(record['output'])}: skipped "
                           f"({record['reason']})", err=True)
                continue
            total_bytes += record["bytes"]
            total_pixels += record["width"] * record["height"] * record.get("frames", 1)
            for note in record.get("notes", []):
                if verbosity >= 0:
                    click.echo(f"ulbc: warning: {display_path(record['input'])}: {note}", err=True)
            if verbosity >= 1 and not as_json:
                bar.clear()
                video = f", {record['frames']} frames {record['frame_types']}" if "frame_types" in record else ""
                click.echo(f"{display_path(record['input'])} -> {display_path(record['output'])}: {record['bytes']} bytes, "
                           f"{record['bpp']:.5f} bpp, level {record['rate_level']}{video}, "
                           f"{record['seconds']:.2f} s {record['timings']}", err=True)
                for frame in record.get("frame_log", []):
                    detail = "" if frame["distance"] is None else f", distance {frame['distance']:.4f}"
                    detail += f", {frame['parts']}" if frame.get("parts") else ""
                    click.echo(f"  frame {frame['frame']:5d} {frame['type']} {frame['bytes']:6d} bytes "
                               f"{frame['bpp']:.5f} bpp{detail}", err=True)
    except KeyboardInterrupt:
        records.close()  # stops the workers; each removes its temporary file
        bar.close()
        click.echo("ulbc: interrupted; no partial output was left behind", err=True)
        sys.exit(EXIT_INTERRUPTED)
    bar.close()
    done = len(tasks) - len(failed) - skipped
    if verbosity >= 0 and (len(tasks) > 1 or verbosity >= 1):
        bpp = f", {total_bytes * 8 / total_pixels:.5f} bpp overall" if total_pixels else ""
        click.echo(f"{verb} {done}/{len(tasks)} files, {total_bytes} bytes{bpp}, "
                   f"{time.perf_counter() - started:.1f} s"
                   + (f"; {skipped} skipped (output exists)" if skipped else "")
                   + (f"; {len(failed)} failed" if failed else ""), err=True)
    if failed:
        if len(failed) > 1 and verbosity >= 0:
            click.echo("ulbc: failed: " + ", ".join(display_path(r["input"]) for r in failed), err=True)
        sys.exit(EXIT_FAILED)


def _batch_limits(verb: str, tasks, jobs: int, force: bool, skip_existing: bool, max_memory: Optional[int],
                  engine: str = "local"):
    """Check --force/--skip-existing and turn --max-memory/$ULBC_MAX_MEMORY into the
    per-process budget of this batch (None: no limit)."""
    from click.core import ParameterSource

    from ulbcodec.jobs import batch_budget
    from ulbcodec.resources import DEFAULT_SOURCE, ENV_VAR, default_limit

    if force and skip_existing:
        raise click.UsageError("use either --force or --skip-existing, not both")
    given = click.get_current_context().get_parameter_source("max_memory")
    if given == ParameterSource.DEFAULT:
        max_memory, source = default_limit(), DEFAULT_SOURCE
    else:
        source = ENV_VAR if given == ParameterSource.ENVIRONMENT else "--max-memory"
    return batch_budget(verb, tasks, jobs, skip_existing, max_memory, source, engine)


class _Size(click.ParamType):
    """A memory size: 2G, 500M, 1.5GiB, a number of bytes, or 'none'."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from ulbcodec.resources import parse_size

        if value is None or isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class _Pixels(click.ParamType):
    """A pixel count: 4000000, 500M, 4G (powers of 1000), or 'none'."""

    name = "N"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "none":
            return None
        scale = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}.get(text[-1:], 1)
        try:
            number = int(text[:-1] if scale > 1 else text)
        except ValueError:
            number = 0
        if number <= 0:
            self.fail(f"{value!r} is not a positive pixel count (4000000, 500M, 4G or none)", param, ctx)
        return number * scale


class _Device(click.ParamType):
    """A torch device this build can use (cpu, cuda, cuda:1, mps)."""

    name = "device"

    def convert(self, value, param, ctx):
        from ulbcodec.placement import DeviceError, resolve_device

        if not isinstance(value, str):
            return value
        try:
            resolve_device(value)
        except DeviceError as exc:
            self.fail(str(exc), param, ctx)
        return value


class _Shard(click.ParamType):
    """``I/N``: shard I (1-based) of N."""

    name = "shard"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            index, count = (int(part) for part in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N (for example 2/8)", param, ctx)
        if not 1 <= index <= count <= 1_000_000:
            self.fail(f"{value!r}: need 1 <= I <= N", param, ctx)
        return index, count


class _Stdio:
    """``-`` as the input (standard input, spooled to a temporary file first) and as
    ``-o`` (the output is made in a temporary folder, then copied to standard output once
    the job succeeded), as cwebp and ffmpeg take them. Records name them ``-``. A terminal
    is refused as binary output."""

    def __init__(self, inputs, output: Optional[str], suffix: str, max_bytes: int, as_json: bool):
        import tempfile

        self.folder, self.names, self.inputs, self.output = None, {}, tuple(inputs), output
        if "-" not in self.inputs and output != "-":
            return
        if "-" in self.inputs and len(self.inputs) > 1:
            raise click.UsageError("'-' (standard input) must be the only input")
        if "-" in self.inputs and not output:
            raise click.UsageError("standard input needs -o FILE (or -o - for standard output)")
        if output == "-":
            if as_json:
                raise click.UsageError("--json prints to standard output; it cannot go with -o -")
            if sys.stdout.buffer.isatty():
                raise click.UsageError("refusing to write binary data to a terminal: redirect standard output "
                                       "or give -o FILE")
        self.folder = tempfile.TemporaryDirectory(prefix="ulbc-stdio-")
        root = Path(self.folder.name)
        if "-" in self.inputs:
            path = root / "stdin"
            data = sys.stdin.buffer.read(max_bytes + 1)
            if len(data) > max_bytes:
                _fail(f"-: standard input holds more than {max_bytes} bytes")
            if not data:
                _fail("-: standard input is empty")
            path.write_bytes(data)
            self.inputs, self.names[str(path)] = (str(path),), "-"
        if output == "-":
            self.output = str(root / ("stdout" + suffix))
            self.names[self.output] = "-"

    def __enter__(self) -> "_Stdio":
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            self.folder.cleanup()

    def shown(self, record: dict) -> dict:
        """The record with the temporary paths named ``-``."""
        if not self.names:
            return record
        record = dict(record)
        for key in ("input", "output", "error"):
            for path, name in self.names.items():
                if key in record:
                    record[key] = record[key].replace(path, name)
        return record

    def tasks(self, tasks):
        from ulbcodec.task import Task

        # -o -: a video's output takes --video-format, as under --out-dir
        return [Task(t.src, t.dst, planned=True) if str(t.dst) == self.output and "-" == self.names.get(self.output)
                else t for t in tasks]

    def finish(self) -> None:
        """Copy the output made for ``-o -`` to standard output."""
        if self.names.get(self.output) != "-":
            return
        import shutil

        made = [p for p in Path(self.output).parent.iterdir() if p.name.startswith("stdout")]
        out = sys.stdout.buffer
        for path in made:
            with open(path, "rb") as fh:
                shutil.copyfileobj(fh, out)
        out.flush()


def _with_listed(inputs, from_list: Optional[str]):
    """The command-line inputs followed by those of --from-list (one path per line)."""
    if from_list is None:
        return inputs
    try:
        if from_list == "-":
            text = sys.stdin.read()
        else:
            with open(from_list, encoding="utf-8", errors="surrogateescape") as fh:
                text = fh.read()
    except OSError as exc:
        _fail(f"{from_list}: cannot read the input list ({exc.strerror or exc})")
    except UnicodeDecodeError:
        _fail(f"{from_list}: the input list is not text")
    return tuple(inputs) + tuple(line for line in text.splitlines() if line.strip())


def _check_engine(engine: str) -> None:
    """--engine ray without Ray installed: one line, before any model is loaded."""
    if engine == "ray":
        from ulbcodec.ray_batch import RayUnavailable, import_ray

        try:
            import_ray()
        except RayUnavailable as exc:
            _fail(str(exc))


def _sharded(tasks, shard):
    from ulbcodec import batch

    return tasks if shard is None else batch.shard(tasks, *shard)


def _plan(inputs, output, out_dir, recursive, in_exts, suffix):
    from ulbcodec import batch

    if not inputs:
        raise click.UsageError("no input given")
    try:
        return batch.plan(inputs, output, out_dir, recursive, in_exts, suffix)
    except batch.UsageError as exc:
        raise click.UsageError(str(exc)) from None


def _factory(loader, model: Optional[str], device):
    """Load the model once up front so that a bad --model fails once, clearly; return a
    picklable factory for the batch workers."""
    from ulbcodec.packages import ModelError

    try:
        loader(model, device)
    except ModelError as exc:
        _fail(str(exc))
    return functools.partial(loader, model, device)


# ------------------------------------------------------------------ commands

common_batch = [
    click.option("-o", "--output", type=click.Path(), help="Output file (one input; a video decodes to a frame "
                 "folder too)."),
    click.option("--out-dir", type=click.Path(file_okay=False), help="Output folder (several inputs, folders)."),
    click.option("-r", "--recursive", is_flag=True, help="Descend into sub-folders (mirrored under --out-dir)."),
    click.option("--device", type=_Device(), default="cpu", show_default=True,
                 help="torch device (cpu, cuda, cuda:1, ...): on a GPU the diffusion models run in bfloat16."),
    click.option("--offload", type=click.Choice(["auto", "none", "model"]), default="auto", show_default=True,
                 help="GPU: keep the diffusion models in host memory and move each to the device for its own "
                      "step (model); auto: when the whole model does not fit the free GPU memory."),
    click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 4096),
                 help="Parallel workers (one model load each): local processes, or Ray actors with --engine ray."),
    click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                 help="Where the workers run: local processes, or Ray actors (pip install 'ulbc[ray]'; "
                      "RAY_ADDRESS=auto joins a running cluster, else a local one is started)."),
    click.option("--from-list", "from_list", type=click.Path(dir_okay=False, allow_dash=True),
                 help="Also take the input paths in FILE, one per line ('-': standard input), for batches "
                      "too large for a command line."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON record per file to stdout."),
    click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs."),
    click.option("--skip-existing", is_flag=True,
                 help="Skip inputs whose output exists (finish an interrupted batch); not with --force."),
    click.option("--max-memory", "max_memory", type=_Size(), envvar="ULBC_MAX_MEMORY", show_envvar=True,
                 help="Refuse files whose estimated peak memory exceeds SIZE (2G, 500M; 'none': no limit), "
                      "shared by --jobs workers. Default: 3/4 of the physical memory."),
    click.option("--shard", type=_Shard(), metavar="I/N",
                 help="Do only shard I of N of the inputs (by a hash of each path), for job arrays: "
                      "--shard 1/4 ... --shard 4/4 together do every file once."),
    click.option("-q", "--quiet", is_flag=True, help="Print errors only."),
    click.option("-v", "--verbose", count=True, help="Per-file lines with per-stage timings."),
]


def _with_options(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ulbc")
def cli() -> None:
    """ulbc: ultra-low-bitrate generative codec for images and videos."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@_with_options(common_batch)
@click.option("--model", default=None, help="Model name or package directory [default: 'default' for images, "
              "'video' for videos].")
@click.option("--quality", type=int, help="Rate level of the model (0 = lowest rate); default: the model's default. "
              "Videos: the keyframes' level.")
@click.option("--bpp", type=click.FloatRange(min=0, min_open=True), callback=lambda ctx, param, value: _finite(value),
              help="Target bits per pixel: the largest file at or under it (images: searches downscale and the continuous "
                   "rate level, landing within 3 % under it; "
                   "videos: keyframe level and threshold).")
@click.option("--downscale", type=click.Choice([str(f) for f in DOWNSCALES]), default="1", show_default=True,
              help="Code the image at 1/F size; the decoder upsamples (reaches rates below the lowest level).")
@click.option("--refine-steps", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Images: refine the latent with this many gradient steps before coding (slow and "
                   "memory-hungry, up to 1080p; the same decoder). BENCHMARKS.md measures 30.")
@click.option("--color-stats/--no-color-stats", "color_stats", default=None,
              help="Images: store the image's colour statistics (12 bytes, counted in the file size) for the "
                   "decoder's colour fix (NeFIC's, published) [default: on].")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.4, show_default=True,
              help="Video: largest perceptual distance of an accepted predicted frame (0: none is accepted; the "
                   "frame is coded: a P frame, or keyframes with a model without P frames).")
@click.option("--metric", type=click.Choice(["ms-ssim", "lpips"]), default="ms-ssim", show_default=True,
              help="Video: the distance (ms-ssim: 1 - MS-SSIM; lpips needs its weights installed).")
@click.option("--max-gop", type=click.IntRange(0, 4096), default=64, show_default=True,
              help="Video: longest run of P and predicted frames before the next keyframe.")
@click.option("--predictor/--no-predictor", "use_predictor", default=True, show_default=True,
              help="Video: run the diffusion predictor (--no-predictor: P frames only, faster both ways).")
@click.option("--pframe-level", type=int, help="Video: rate level of the P frames [default: the keyframes'].")
@click.option("--motion/--no-motion", "use_motion", default=True, show_default=True,
              help="Video: P frames may code a motion field and warp their reference along it.")
@click.option("--long-term/--no-long-term", "use_long_term", default=True, show_default=True,
              help="Video: P frames may take the last keyframe as their reference instead of the previous frame.")
@click.option("--skip-blocks/--no-skip-blocks", "use_skip_blocks", default=True, show_default=True,
              help="Video: P frames may leave 16x16 blocks to their (warped) reference at zero bits.")
@click.option("--seed", "video_seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Video: stream seed; each prediction round's noise derives from it and the round alone.")
@click.option("--generative-keyframes", is_flag=True,
              help="Video: decode keyframes with the generative decoder (slower) instead of as anchor frames.")
@click.option("--anchored", is_flag=True,
              help="Video: when a prediction fails the threshold, try one guided by a small anchor of the frame "
                   "before coding keyframes (frame type A).")
@click.option("--anchor-level", type=int, help="Video: rate level of those anchors [default: the lowest].")
@click.option("--guide-timestep", type=click.IntRange(0, 999), default=600, show_default=True,
              help="Video: anchored predictions start denoising the anchor at this timestep (lower: closer to it).")
@click.option("--pred-steps", type=click.IntRange(1, 100),
              help="Video: sampler steps of every prediction (stored in the file) [default: the model's].")
@click.option("--keyframe-group", type=click.IntRange(1, 64),
              help="Video: keyframes coded when a prediction fails, 1..K [default: K, the model's conditioning "
                   "frames]; the first group is always K.")
def encode(inputs, output, out_dir, recursive, model, device, offload, jobs, engine, from_list, as_json, force,
           skip_existing, max_memory, shard, quiet, verbose, quality, bpp, downscale, refine_steps, color_stats,
           threshold, metric, max_gop, use_predictor, pframe_level, use_motion, use_long_term, use_skip_blocks,
           video_seed, generative_keyframes, anchored, anchor_level, guide_timestep, pred_steps, keyframe_group):
    """Encode images and videos (mp4, mkv, webm, y4m, gif, or a folder of frames with -o) to .ulb files
    (without -o: beside each input, photo.png -> photo.ulb; '-': standard input or output)."""
    if quality is not None and bpp is not None:
        raise click.UsageError("use either --quality or --bpp, not both")
    if bpp is not None and downscale != "1":
        raise click.UsageError("--bpp chooses the downscale factor itself; drop --downscale")
    inputs = _with_listed(inputs, from_list)
    _check_engine(engine)
    with _Stdio(inputs, output, ".ulb", MAX_STDIN_IMAGE_BYTES, as_json) as stdio:
        _encode(stdio, stdio.inputs, stdio.output, out_dir, recursive, model, device, offload, jobs, engine, as_json,
                force, skip_existing, max_memory, shard, quiet, verbose, quality, bpp, downscale, refine_steps,
                color_stats, threshold, metric, max_gop, use_predictor, pframe_level, use_motion, use_long_term,
                use_skip_blocks, video_seed, generative_keyframes, anchored, anchor_level, guide_timestep, pred_steps,
                keyframe_group)


def _encode(stdio, inputs, output, out_dir, recursive, model, device, offload, jobs, engine, as_json, force,
            skip_existing, max_memory, shard, quiet, verbose, quality, bpp, downscale, refine_steps, color_stats,
            threshold, metric, max_gop, use_predictor, pframe_level, use_motion, use_long_term, use_skip_blocks,
            video_seed, generative_keyframes, anchored, anchor_level, guide_timestep, pred_steps, keyframe_group):
    from ulbcodec.io import READ_EXTENSIONS, VIDEO_EXTENSIONS
    from ulbcodec.jobs import encode_job, is_video_input, load_encoders, placement
    from ulbcodec.refinement import RefineSettings
    from ulbcodec.task import Task
    from ulbcodec.video import VideoSettings

    if len(inputs) == 1 and Path(inputs[0]).is_dir() and output and not out_dir:
        tasks = [Task(Path(inputs[0]), Path(output))]  # one folder to one file: a sequence of frames
    else:
        tasks = _plan(inputs, output, out_dir, recursive, READ_EXTENSIONS | VIDEO_EXTENSIONS, ".ulb")
    if output and output != "-" and Path(output).is_dir():
        raise click.UsageError(f"-o {output}: is a folder; encode writes a .ulb file (use --out-dir for a folder)")
    if output and Path(output).suffix.lower() in READ_EXTENSIONS | VIDEO_EXTENSIONS:  # after the input check
        raise click.UsageError(f"-o {output}: encode writes a .ulb file, not {Path(output).suffix}; name it "
                               f"{Path(output).with_suffix('.ulb')}")
    tasks = stdio.tasks(_sharded(tasks, shard))
    need_video = any(is_video_input(t.src) for t in tasks)
    need_image = not all(is_video_input(t.src) for t in tasks)
    if need_video and refine_steps:
        raise click.UsageError("--refine-steps applies to images only (video keyframes are coded without it)")
    budget = _batch_limits("encode", tasks, jobs, force, skip_existing, max_memory, engine)
    factory = _factory(functools.partial(load_encoders, need_image, need_video), model, placement(device, offload))
    if need_video and metric == "lpips":
        from ulbcodec.metrics import available_metrics

        raise click.UsageError(f"--metric lpips: {available_metrics().get('lpips', 'unavailable')}")
    encoders = factory()
    for flag, level, codecs in (("--quality", quality, ([encoders.image] if need_image else [])
                                 + ([encoders.video.image] if need_video else [])),
                                ("--anchor-level", anchor_level, [encoders.video.image] if need_video else [])):
        for codec in codecs if level is not None else []:
            levels = codec.rate_levels
            if level not in levels:
                raise click.UsageError(f"{flag} must be one of the model's rate levels {levels[0]}..{levels[-1]}")
    settings = VideoSettings(threshold=threshold, metric=metric, max_gop=max_gop, seed=video_seed,
                             generative_keyframes=generative_keyframes, anchored=anchored, anchor_level=anchor_level,
                             guide_timestep=guide_timestep, steps=pred_steps, keyframe_group=keyframe_group,
                             predictor=use_predictor, pframe_level=pframe_level, motion=use_motion,
                             long_term=use_long_term, skip_blocks=use_skip_blocks)
    verbosity = _verbosity(quiet, verbose)
    refine = RefineSettings(steps=refine_steps) if refine_steps else None
    job = functools.partial(encode_job, quality=quality, bpp=bpp, downscale=int(downscale), refine=refine,
                            color_stats=color_stats, force=force,
                            skip_existing=skip_existing, budget=budget, video=settings, quiet=verbosity < 0,
                            progress=_frame_progress(tasks, jobs, as_json, verbosity))
    _run_batch("encoded", tasks, factory, job, jobs, as_json, verbosity, skip_existing, engine, stdio)
    stdio.finish()


def _frame_progress(tasks, jobs: int, as_json: bool, verbosity: int) -> bool:
    """A per-frame bar for one long video at a terminal (a batch has its per-file bar)."""
    return len(tasks) == 1 and jobs == 1 and not as_json and verbosity >= 0 and sys.stderr.isatty()


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path())
@_with_options(common_batch)
@click.option("--model", default=None, help="Model name or package directory [default: the installed model "
              "whose digest the file names].")
@click.option("--format", "fmt", default="png", show_default=True,
              type=click.Choice(["png", "jpg", "webp", "tiff"]), help="Output format for --out-dir.")
@click.option("--anchor-only", is_flag=True,
              help="Write the anchor frame without running the generative decoder (fast preview).")
@click.option("--steps", default=1, show_default=True, type=click.IntRange(1, 1000),
              help="Generative decoding steps: 1 = one-step bypass decoding; N > 1 samples from seeded noise.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1),
              help="Noise seed for --steps > 1 [default: the seed stored in the file].")
@click.option("--video-format", type=click.Choice(["mp4", "mkv", "y4m", "frames"]), default="mp4", show_default=True,
              help="Output format of videos under --out-dir (frames: a folder of PNGs).")
@click.option("--lossless", is_flag=True,
              help="Videos to mp4/mkv: lossless RGB H.264 (qp 0) instead of high-quality 4:2:0 (crf 12).")
@click.option("--max-pixels", "max_pixels", type=_Pixels(), envvar="ULBC_MAX_PIXELS", show_envvar=True,
              default=str(DEFAULT_MAX_PIXELS), show_default=True,
              help="Refuse files that declare more decoded pixels (frames x width x height; 500M, 4G) or more than "
                   f"{MAX_PIXELS_PER_FILE_BYTE:,} per byte of the file, before decoding ('none': no limit).")
def decode(inputs, output, out_dir, recursive, model, device, offload, jobs, engine, from_list, as_json, force,
           skip_existing, max_memory, shard, quiet, verbose, fmt, anchor_only, steps, seed, video_format, lossless,
           max_pixels):
    """Decode .ulb files: images to png, jpg, webp or tiff; videos to mp4, mkv, y4m or a folder
    of frames (from the -o extension; a name without one is a folder; without -o: beside the
    input, photo.ulb -> photo.png; '-': standard input or output)."""
    from ulbcodec.bitstream import MAX_FILE_BYTES

    _check_engine(engine)
    inputs = _with_listed(inputs, from_list)
    if output == "-" and video_format == "frames":
        raise click.UsageError("-o -: a folder of frames cannot go to standard output; use --video-format y4m")
    with _Stdio(inputs, output, "." + fmt, MAX_FILE_BYTES, as_json) as stdio:
        _decode(stdio, stdio.inputs, stdio.output, out_dir, recursive, model, device, offload, jobs, engine, as_json,
                force, skip_existing, max_memory, shard, quiet, verbose, fmt, anchor_only, steps, seed, video_format,
                lossless, max_pixels)


def _decode(stdio, inputs, output, out_dir, recursive, model, device, offload, jobs, engine, as_json, force,
            skip_existing, max_memory, shard, quiet, verbose, fmt, anchor_only, steps, seed, video_format, lossless,
            max_pixels):
    from ulbcodec.io import IMAGE_EXTENSIONS, VIDEO_WRITE_EXTENSIONS
    from ulbcodec.jobs import decode_job, load_decoders, placement

    tasks = stdio.tasks(_sharded(_plan(inputs, output, out_dir, recursive, [".ulb"], "." + fmt), shard))
    if output and Path(output).suffix.lower() not in IMAGE_EXTENSIONS.keys() | VIDEO_WRITE_EXTENSIONS | {""}:
        raise click.UsageError(f"{output}: unsupported output format {Path(output).suffix}; use .png, .jpg, .webp, "
                               ".tiff (images), .mp4, .mkv, .y4m or a folder name (videos)")
    budget = _batch_limits("decode", tasks, jobs, force, skip_existing, max_memory, engine)
    factory = _factory(load_decoders, model, placement(device, offload))
    if anchor_only and steps > 1:
        raise click.UsageError("--steps applies to the generative decoder; drop --anchor-only")
    verbosity = _verbosity(quiet, verbose)
    job = functools.partial(decode_job, force=force, anchor_only=anchor_only, steps=steps, seed=seed,
                            quiet=verbosity < 0, max_pixels=max_pixels,
                            skip_existing=skip_existing, budget=budget, video_format=video_format, lossless=lossless,
                            progress=_frame_progress(tasks, jobs, as_json, verbosity))
    _run_batch("decoded", tasks, factory, job, jobs, as_json, verbosity, skip_existing, engine, stdio)
    stdio.finish()


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(files, as_json):
    """Show every header field, each chunk's size, and bpp of .ulb files."""
    from ulbcodec.bitstream import BitstreamError, describe, read_file
    from ulbcodec.io import InputError, check_input

    failed = False
    for path in files:
        try:
            check_input(path)  # a device or a FIFO would be read forever
            desc = {"file": path, **describe(read_file(path))}
        except InputError as exc:
            click.echo(f"ulbc: error: {exc}", err=True)
            failed = True
            continue
        except (BitstreamError, OSError) as exc:
            click.echo(f"ulbc: error: {path}: {getattr(exc, 'strerror', None) or exc}", err=True)
            failed = True
            continue
        if as_json:
            click.echo(json.dumps(desc))
            continue
        click.echo(f"{path}: ulb v{desc['version']} {desc['media']} {desc['width']}x{desc['height']}, "
                   f"{desc['bytes']} bytes, {desc['bpp']:.6f} bpp")
        for key in ("frames", "fps", "model_digest", "rate_level", "seed", "params"):
            click.echo(f"  {key:13s} {desc[key]}")
        if "gop" in desc and "error" in desc["gop"]:
            click.echo(f"  {'frame types':13s} unreadable GOPS chunk: {desc['gop']['error']}")
        elif "gop" in desc:
            gop = desc["gop"]
            click.echo(f"  {'keyframes':13s} {len(gop['keyframes'])} at frames {_abridged(gop['keyframes'])}")
            if gop["anchored"]:
                click.echo(f"  {'anchored':13s} {len(gop['anchored'])} rounds at frames {_abridged(gop['anchored'])}")
            if gop["fused"]:
                click.echo(f"  {'fused':13s} {len(gop['fused'])} P frames at frames {_abridged(gop['fused'])}")
            if gop["skip_blocks"]:
                click.echo(f"  {'skip blocks':13s} {len(gop['skip_blocks'])} P frames at frames "
                           f"{_abridged(gop['skip_blocks'])}")
            click.echo(f"  {'frame types':13s} {_abridged(gop['frame_types'])}  (K keyframe; P, F, L P frame on the "
                       "previous frame, forecast, last keyframe; s, l their repeats; p predicted; A anchored round)")
            click.echo(f"  {'frame bytes':13s} {_abridged(gop['frame_bytes'], 40)}")
        if "color_stats" in desc:  # the colr chunk: the original's colour statistics
            stats = desc["color_stats"]
            click.echo(f"  {'color stats':13s} " + (f"unreadable colr chunk: {stats['error']}" if "error" in stats
                                                    else f"mean RGB {stats['mean']}, std RGB {stats['std']}"))
        for chunk in desc["chunks"]:
            click.echo(f"  chunk {chunk['type']} at byte {chunk['offset']}: {chunk['bytes']} bytes")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _abridged(items, keep: int = 200) -> str:
    """A long list or frame-type string on one readable line (the whole is in --json)."""
    if len(items) <= keep:
        return str(items)
    head = items[:keep] if isinstance(items, str) else str(items[:keep])[:-1] + ", "
    return f"{head}... ({len(items)} in all)"


def _comma_list(convert=str):
    """A click callback: "a,b" -> ("a", "b") through ``convert``; None stays None (the default)."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(convert(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None

    return parse


@cli.command("eval")
@click.argument("inputs", nargs=-1, type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Results folder (created; rerunning into it skips finished work).")
@click.option("--codecs", callback=_comma_list(), help="Comma list [default: images ulbc,jpeg,webp,avif,jxl; "
              "videos ulbc,x264,x265,svtav1,vvenc].")
@click.option("--metrics", "metric_names", callback=_comma_list(),
              help="Comma list of psnr, psnr_y, ms_ssim, vmaf, log_spectrum_error, lpips, dists, fid, kid, fvd "
                   "[default: psnr,psnr_y,ms_ssim,vmaf, and log_spectrum_error for images]. Those that cannot run "
                   "here are reported as unavailable.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes, one (item, codec) task each at a time.")
@click.option("--max-bpp", type=click.FloatRange(min=0, min_open=True),
              help="Baseline sweeps stop after their first point above this [default: 0.15 images, 0.1 videos].")
@click.option("--thresholds", callback=_comma_list(float), default="0.3,0.5", show_default=True,
              help="Videos: ulbc's perceptual thresholds.")
@click.option("--levels", callback=_comma_list(int),
              help="Videos: ulbc's keyframe rate levels [default: the model's lowest and default]; images run "
                   "every level, and the half levels between where the model's rate is continuous.")
@click.option("--model", default="default", show_default=True, help="ulbc's image model.")
@click.option("--video-model", default="video", show_default=True, help="ulbc's video model.")
@click.option("--frames", default=30, show_default=True, type=click.IntRange(1),
              help="Videos: evaluate the first N frames.")
@click.option("--quality-step", default=1, type=click.IntRange(1), hidden=True,
              help="Every n-th quality of each baseline grid (tests; 1 = the full sweep).")
@click.option("-f", "--force", is_flag=True, help="Recompute finished items too.")
@click.option("-q", "--quiet", is_flag=True, help="Print errors only (no summary, no notes).")
def eval_cmd(inputs, out, codecs, metric_names, jobs, max_bpp, thresholds, levels, model, video_model, frames,
             quality_step, force, quiet):
    """Rate-distortion evaluation of ulbc against JPEG/WebP/AVIF/JPEG XL (images) and
    x264/x265/SVT-AV1/VVenC (videos): per-item and mean points, BD-rates, RD plots and a
    crop sheet in --out (docs/evaluation.md)."""
    from ulbcodec.eval import EvalError
    from ulbcodec.eval.runner import EvalConfig, run

    config = EvalConfig(codecs=codecs, metrics=metric_names, max_bpp=max_bpp, thresholds=thresholds,
                                 levels=levels, image_model=model, video_model=video_model, frames=frames,
                                 quality_step=quality_step, jobs=jobs, force=force)
    try:
        config.check()  # a bad --codecs / --metrics name is a usage error (exit 2), like any bad option
    except EvalError as exc:
        raise click.UsageError(str(exc)) from None

    def to_stderr(line: str) -> None:
        click.echo(line, err=True)

    try:
        report = run(inputs, out, config, progress=not quiet and sys.stderr.isatty(),
                              note=(lambda line: None) if quiet else to_stderr, error=to_stderr)
    except EvalError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo("ulbc: interrupted; finished items are kept (rerun to go on)", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if not quiet:
        click.echo(report.summary)
        click.echo(f"eval: {report.computed} tasks computed, {report.reused} reused, {len(report.failures)} failed; "
                   f"results in {report.out}", err=True)
    sys.exit(EXIT_FAILED if report.failures else EXIT_OK)


@cli.group("models", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--check", is_flag=True, help="Also check every weights file against the config (tensor shapes, "
              "from the headers) besides the digests; exit 1 if a package is broken.")
@click.pass_context
def models_cmd(ctx, as_json, check):
    """List the models ulbc can use (search path: $ULBC_MODEL_PATH, then models/); each
    package's files are checked against its digest, a broken one is marked BROKEN."""
    if ctx.invoked_subcommand is not None:
        return
    from ulbcodec import packages
    from ulbcodec.video import is_video_package

    rows = []
    for path in packages.available_models():
        try:
            pkg = packages.ModelPackage.load_manifest(path)
            for component in pkg.components if check else ():
                try:
                    pkg.check_shapes(component)
                except (packages.ModelError, RuntimeError, TypeError, ValueError, OSError) as exc:
                    raise packages.BadPackageError(f"bad model package: {component}: {exc}") from None
        except packages.ModelError as exc:
            rows.append({"name": path.name, "path": str(path), "error": str(exc)})
            continue
        rows.append({"name": pkg.name, "path": str(path), "digest": pkg.digest[:16], "bytes": pkg.size_bytes,
                     "rate_levels": [lv.level for lv in pkg.rate_levels], "generative": pkg.is_generative,
                     "video": is_video_package(pkg),
                     "description": pkg.description})
    for row in rows:
        if as_json:
            click.echo(json.dumps(row))
        elif "error" in row:
            click.echo(f"{row['name']:12s} BROKEN: {row['error']}")
        else:
            levels = row["rate_levels"]
            click.echo(f"{row['name']:12s} digest {row['digest']}  {row['bytes'] / 1e6:6.1f} MB  "
                       f"rate levels {levels[0]}..{levels[-1]}  "
                       f"{'generative' if row['generative'] else 'anchor only'}"
                       f"{' + frame predictor (video)' if row['video'] else ''}  {row['path']}")
    if not rows:
        click.echo("no models found (search path: $ULBC_MODEL_PATH, then the project's models/)", err=True)
        sys.exit(EXIT_FAILED)
    if check and any("error" in row for row in rows):
        sys.exit(EXIT_FAILED)


@models_cmd.command("import-nefic")
@click.option("--base", required=True, type=click.Path(file_okay=False),
              help="CogVideoX-1.5-5B in diffusers' layout (vae/, transformer/, scheduler/): referenced, not copied.")
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(file_okay=False),
              help="A NeFIC rate point (nefic_lambda*/ with anchor_codec.bin, pytorch_lora_weights.safetensors); "
                   "repeat for several rate levels.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Package directory to write.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing package.")
def import_nefic_cmd(base, checkpoints, output, force):
    """Convert the official NeFIC checkpoints into a ulbc model package."""
    from ulbcodec.importers.nefic import import_nefic
    from ulbcodec.packages import ModelError

    try:
        pkg = import_nefic(base, checkpoints, output, force=force)
    except ModelError as exc:
        _fail(str(exc))
    click.echo(f"imported {len(pkg.rate_levels)} rate level(s) into {pkg.root} (digest {pkg.digest[:16]}, "
               f"{pkg.size_bytes / 1e6:.1f} MB; base model referenced at {Path(base).resolve()})")


@models_cmd.command("import-video-predictor")
@click.option("--base", required=True, type=click.Path(file_okay=False),
              help="A CogVideoX image-to-video model (e.g. CogVideoX-5b-I2V) in diffusers' layout (transformer/, "
                   "vae/, scheduler/): referenced, not copied.")
@click.option("--image-model", default="generative", show_default=True,
              help="The image model (name or package directory) that codes the keyframes.")
@click.option("--prompt-embeds", type=click.Path(dir_okay=False),
              help="T5 embeddings of the prompt, one tensor [1, L, D] as safetensors [default: "
                   "BASE/prompt_embeds.safetensors].")
@click.option("--negative-embeds", type=click.Path(dir_okay=False),
              help="T5 embeddings of the negative prompt, for --guidance-scale > 1.")
@click.option("--pred-frames", default=4, show_default=True, type=click.IntRange(4, 256),
              help="Frames predicted per round: a multiple of 4 (CogVideoX 1.5: 4, 12, 20, ...).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 100), help="Sampler steps.")
@click.option("--guidance-scale", default=1.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Classifier-free guidance (needs --negative-embeds when > 1).")
@click.option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
              help="Precision of the predictor's transformer and VAE.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Package directory to write.")
@click.option("-f", "--force", is_flag=True, help="Replace an existing package.")
def import_video_predictor_cmd(base, image_model, prompt_embeds, negative_embeds, pred_frames, steps, guidance_scale,
                               dtype, output, force):
    """Make a video model from an image model and a pretrained image-to-video diffusion model."""
    from ulbcodec.importers.i2v import import_i2v_predictor
    from ulbcodec.packages import ModelError

    try:
        pkg = import_i2v_predictor(base, image_model, output, pred_frames, steps, guidance_scale, prompt_embeds,
                                   negative_embeds, dtype, force)
    except ModelError as exc:
        _fail(str(exc))
    click.echo(f"wrote video model {pkg.root} (digest {pkg.digest[:16]}, K=1 -> P={pred_frames}, {steps} steps; "
               f"predictor referenced at {Path(base).resolve()})")


@cli.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default="default", show_default=True)
def demo(out, model):
    """Encode and decode the bundled sample photograph at several rates; print the figures."""
    from ulbcodec.io import read_image, write_bytes, write_image
    from ulbcodec.jobs import load_codec
    from ulbcodec.metrics import ms_ssim, psnr

    sample = Path(__file__).resolve().parent / "data" / "coffee.png"
    codec = _factory(load_codec, model, "cpu")()
    rgb, _ = read_image(sample)
    out = Path(out)
    h, w = rgb.shape[:2]
    click.echo(f"sample {sample} ({w}x{h}); model {codec.package.name} ({codec.package.digest[:16]})")
    click.echo(f"{'level':>5} {'bytes':>7} {'bpp':>8} {'PSNR dB':>8} {'MS-SSIM':>8}  files")
    for level in codec.rate_levels:
        result = codec.encode(rgb, level)
        ulb, png = out / f"coffee-q{level}.ulb", out / f"coffee-q{level}.png"
        write_bytes(ulb, result.data, force=True)
        decoded = codec.decode(Path(ulb).read_bytes())
        write_image(png, decoded, force=True)
        click.echo(f"{level:>5} {len(result.data):>7} {result.bpp:>8.4f} {psnr(rgb, decoded):>8.2f} "
                   f"{ms_ssim(rgb, decoded):>8.4f}  {ulb} -> {png}")


def main(argv: Optional[List[str]] = None) -> None:
    # SIGTERM (a batch scheduler, `kill`) unwinds like Ctrl-C, so that temporary files are
    # removed and no partial output is left behind; a repeated signal does not cut that short.
    signal.signal(signal.SIGTERM, interrupt_once)
    signal.signal(signal.SIGINT, interrupt_once)
    resources.keep_freed_memory()  # one job at a time to the end: reuse freed tiles' memory
    resources.passive_openmp_waits()  # before torch loads: no spinning on a busy CPU
    try:
        cli.main(args=argv, prog_name="ulbc", standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"ulbc: usage error: {exc.format_message()}", err=True)
        click.echo("Try 'ulbc --help'.", err=True)
        sys.exit(EXIT_USAGE)
    except click.Abort:
        click.echo("ulbc: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"ulbc: error: {exc.format_message()}", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        if os.environ.get("ULBC_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.strerror:
            where = f"{os.fsdecode(exc.filename)}: " if isinstance(exc.filename, (str, bytes, os.PathLike)) else ""
            click.echo(f"ulbc: error: {where}{exc.strerror}", err=True)
        else:
            text = (str(exc).strip().splitlines() or [""])[0]
            click.echo(f"ulbc: error: internal error ({exc.__class__.__name__}: {text}); please report it "
                       "(ULBC_DEBUG=1 shows the traceback)", err=True)
        sys.exit(EXIT_FAILED)
