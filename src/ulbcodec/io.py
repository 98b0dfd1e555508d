"""Images and videos in and out: strict reading, normalisation to 8-bit RGB, atomic writing.

Every failure is an :class:`InputError` (bad input) or :class:`OutputError` (cannot write)
carrying one human-readable line; the CLI prints it and exits non-zero. Outputs are
written to a temporary file in the destination folder, flushed to disk (fsync) and
renamed into place, so a crash, a kill or a power cut never leaves a half-written file
under the output's name (an existing output is always complete, which is what
``--skip-existing`` relies on), and an existing file is only replaced when the caller
asked for it (``force``). Without ``force`` the file is put in place with a hard link,
which fails if another process created the name meanwhile, so even two concurrent runs
never clobber each other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Tuple

import numpy as np

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# Inputs Pillow reads that we accept besides the output formats.
READ_EXTENSIONS = set(IMAGE_EXTENSIONS) | {".bmp", ".ppm", ".pgm", ".pnm", ".gif", ".avif", ".jxl"}


class InputError(ValueError):
    """An input file is missing, unreadable or unsupported."""


class OutputError(OSError):
    """An output cannot be written (exists, unwritable folder, disk full...)."""


class OutputExistsError(OutputError):
    """The output exists and the caller did not ask to overwrite it."""


def input_error(path, exc: OSError) -> InputError:
    """One line for an OSError met while opening or reading an input."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: no such file")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{path}: is a directory")
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: permission denied")
    return InputError(f"{path}: cannot read ({exc.strerror or exc})")


def check_input(path) -> Path:
    """Refuse, before opening it, an input that is not a regular file (a folder, a FIFO
    that would block, a device that never ends)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise input_error(path, exc) from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path}: is a directory")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path}: not a regular file")
    return path


@contextlib.contextmanager
def _reading_image(path: Path) -> Iterator[None]:
    """Map every way Pillow fails on an input to one InputError line."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    except OSError as exc:
        if exc.errno is not None:  # the system refused (permissions, I/O error), not the data
            raise input_error(path, exc) from None
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None
    except (ValueError, SyntaxError) as exc:  # truncated / corrupt data inside a known format
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None


def image_size(path) -> Tuple[int, int]:
    """(width, height) from the image's header only: Pillow opens lazily, no pixel is
    decoded (used to bound memory before reading an image)."""
    from PIL import Image

    path = Path(path)
    with _reading_image(path):
        with Image.open(path) as im:
            return im.size


def read_image(path) -> Tuple[np.ndarray, List[str]]:
    """Read any Pillow-supported image as HxWx3 uint8 RGB.

    Returns the pixels and a list of notes on lossy normalisation the caller should show
    the user (alpha dropped, 16-bit reduced to 8-bit). EXIF orientation is applied, as
    every image viewer does.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    notes: List[str] = []
    with _reading_image(path):
        with Image.open(path) as im:
            # 16-bit RGB(A) PNG/TIFF: Pillow reads it as 8-bit RGB; its raw mode tells
            deep = im.mode in ("RGB", "RGBA") and any(";16" in str(getattr(t, "args", t[3] if len(t) > 3 else ""))
                                                      for t in im.tile)
            im = ImageOps.exif_transpose(im)
            im.load()

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255
        gray = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        if peak == 65535:
            notes.append("16-bit samples reduced to 8 bits")
        return np.repeat(gray[:, :, None], 3, axis=2), notes
    if im.mode == "F":
        raise InputError(f"{path}: floating-point images are not supported")
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        notes.append("alpha channel dropped")
    if im.mode in ("L", "LA", "1"):
        notes.append("greyscale image coded as RGB (decodes to RGB)")
    if deep:
        notes.append("16-bit samples reduced to 8 bits")
    rgb = np.asarray(im.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise InputError(f"{path}: unsupported image layout {rgb.shape}")
    return np.ascontiguousarray(rgb), notes


def check_output(path, force: bool) -> Path:
    """Refuse to overwrite unless forced, and fail early on an impossible destination."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    if path.exists() and not path.is_file():  # a device, a FIFO: never replace it by a file
        raise OutputError(f"{path}: not a regular file, refusing to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists():
        if not parent.is_dir():
            raise OutputError(f"{parent}: not a folder, cannot write {path.name} in it")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{parent}: folder is not writable")
    return path


_UMASK = None


def _default_mode() -> int:
    """0o666 less the umask: the mode open() would give a new file (mkstemp uses 0o600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None], force: bool = False) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then move it to ``path`` in one step.

    The temporary file is ``.NAME.XXXXXX.part`` next to ``path`` (hidden: batch inputs
    skip dot files) and is removed whatever happens, KeyboardInterrupt included.
    """
    path = check_output(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create folder {path.parent} ({exc.strerror or exc})") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, _default_mode())
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "r+b") as f:  # the data must be on disk before the name points to it
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        _fsync_dir(path.parent)
    except OutputError:
        raise
    except OSError as exc:
        what = "cannot create file" if tmp is None else "cannot write"
        raise OutputError(f"{path}: {what} ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def _link_no_clobber(tmp: str, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless that name exists, atomically (a hard link
    fails with EEXIST), so that a file another process created meanwhile is kept."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # No hard links on this file system (FAT, some network shares): check, then rename.
        if path.exists():
            raise OutputExistsError(f"{path}: already exists (use --force to overwrite)") from None
        os.replace(tmp, path)


def write_bytes(path, data: bytes, force: bool = False) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, _write, force)


def image_format(path) -> str:
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise OutputError(f"{path}: unsupported output format {ext or '(none)'}; use .png, .jpg, .webp or .tiff")
    return IMAGE_EXTENSIONS[ext]


# zlib's fastest level: PNG stays lossless, and at level 6 writing the file took a
# sizeable share of a whole decode (BENCHMARKS.md, issue 28) for a smaller file.
PNG_COMPRESS_LEVEL = 1


def write_image(path, rgb: np.ndarray, force: bool = False) -> None:
    """Write HxWx3 uint8 RGB; the format follows the extension (png, jpg, webp, tiff).
    Lossy formats are written at high quality: the codec's output should not be
    degraded again on the way to disk."""
    from PIL import Image

    fmt = image_format(path)
    options = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"quality": 95, "method": 4},
               "PNG": {"compress_level": PNG_COMPRESS_LEVEL}, "TIFF": {"compression": "tiff_deflate"}}[fmt]
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options), force)


# ------------------------------------------------------------------ videos
#
# Videos are streamed through the ffmpeg inside imageio-ffmpeg: frames come in and go
# out one at a time, never the whole clip in memory. A folder of numbered images is a
# video too (read in name order; written as frame-000001.png, ...).

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".y4m", ".gif", ".mov", ".avi"}
VIDEO_WRITE_EXTENSIONS = {".mp4", ".mkv", ".y4m"}
DEFAULT_FRAME_FOLDER_FPS = Fraction(25)


def is_video_path(path) -> bool:
    """A video file by its extension; a GIF only when it is animated (a still GIF is an image)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".gif":
        from PIL import Image

        try:
            with Image.open(path) as im:
                return getattr(im, "n_frames", 1) > 1
        except (OSError, ValueError, SyntaxError):
            return False  # unreadable: the image reader reports it
    return ext in VIDEO_EXTENSIONS


def _ffmpeg_fps(value) -> Fraction:
    """ffmpeg reports 29.97 as 29.97: recover the NTSC fraction (30000/1001)."""
    fps = float(value)
    if not fps > 0:
        raise ValueError("frame rate must be positive")
    for base in (24, 30, 48, 60, 120):
        if abs(fps - base * 1000 / 1001) < 0.006:
            return Fraction(base * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


class VideoReader:
    """A video file or a folder of frames, streamed. ``size`` (w, h) and ``fps`` are known
    on opening; iterating yields HxWx3 uint8 frames and, at the end, checks that the file
    held as many frames as its header promised (a truncated file is an InputError)."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.is_dir():
            self._files = sorted(p for p in self.path.iterdir()
                                 if p.suffix.lower() in READ_EXTENSIONS and not p.name.startswith("."))
            if not self._files:
                raise InputError(f"{self.path}: folder holds no image frames")
            self.size = image_size(self._files[0])
            self.fps, self.expected_frames = DEFAULT_FRAME_FOLDER_FPS, len(self._files)
            return
        check_input(self.path)
        self._files = None
        import imageio_ffmpeg

        try:
            self._gen = imageio_ffmpeg.read_frames(str(self.path), pix_fmt="rgb24")
            meta = next(self._gen)
            self.size = tuple(meta["size"])
            self.fps = _ffmpeg_fps(meta.get("fps") or 25)
        except (OSError, RuntimeError, StopIteration, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{self.path}: not a readable video ({_first_line(exc)})") from None
        if self.size[0] < 1 or self.size[1] < 1:
            raise InputError(f"{self.path}: video has no pixels ({self.size[0]}x{self.size[1]})")
        # ffmpeg's container estimate; None when the container does not say (y4m, some gifs).
        duration = meta.get("duration") or 0
        self.expected_frames = round(duration * float(self.fps)) if duration and meta.get("fps") else None

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._files is not None:
            for f in self._files:
                rgb, _ = read_image(f)
                if (rgb.shape[1], rgb.shape[0]) != self.size:
                    raise InputError(f"{f}: frame is {rgb.shape[1]}x{rgb.shape[0]}, the first frame "
                                     f"{self.size[0]}x{self.size[1]}")
                yield rgb
            return
        w, h = self.size
        count = 0
        try:
            for raw in self._gen:
                if len(raw) != w * h * 3:
                    raise InputError(f"{self.path}: truncated video (frame {count} is incomplete)")
                count += 1
                yield np.frombuffer(raw, np.uint8).reshape(h, w, 3)
        except (OSError, RuntimeError) as exc:
            raise InputError(f"{self.path}: corrupt or truncated video after {count} frames "
                             f"({_first_line(exc)})") from None
        if count == 0:
            raise InputError(f"{self.path}: video holds no decodable frame")
        # Containers round their duration: allow a frame or two, not a missing tail.
        if self.expected_frames and count < self.expected_frames - max(2, self.expected_frames // 50):
            raise InputError(f"{self.path}: truncated video ({count} frames decoded, the container "
                             f"announces {self.expected_frames})")

    def close(self) -> None:
        if self._files is None:
            self._gen.close()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else exc.__class__.__name__


def video_output_kind(path) -> str:
    """'mp4', 'mkv', 'y4m', or 'frames' (a folder: a path without a video extension)."""
    ext = Path(path).suffix.lower()
    if ext in VIDEO_WRITE_EXTENSIONS:
        return ext[1:]
    if ext in IMAGE_EXTENSIONS or ext in VIDEO_EXTENSIONS:
        raise OutputError(f"{path}: unsupported video output {ext}; use .mp4, .mkv, .y4m or a folder name")
    return "frames"


def _ffmpeg_output(kind: str, lossless: bool) -> Tuple[str, str, List[str]]:
    """(codec, output pixel format, extra output params) for one output kind."""
    if kind == "y4m":
        return "rawvideo", "yuv444p", ["-f", "yuv4mpegpipe", "-strict", "-1"]
    fmt = ["-f", "matroska" if kind == "mkv" else "mp4"]
    if lossless:  # RGB, qp 0: bit-exact frames (players without RGB H.264 support may refuse it)
        return "libx264rgb", "rgb24", ["-qp", "0", "-preset", "medium"] + fmt
    # High quality, plays everywhere: 4:2:0, crf 12.
    return "libx264", "yuv420p", ["-crf", "12", "-preset", "medium"] + fmt


def write_video(path, frames: Iterable[np.ndarray], fps: Fraction, force: bool = False,
                lossless: bool = False) -> int:
    """Stream HxWx3 uint8 frames to ``path`` (mp4/mkv: H.264, ``lossless`` for RGB qp 0;
    y4m: raw 4:4:4; a folder: PNG per frame), atomically; returns the frame count. Nothing
    is left under ``path`` when the frames iterator raises."""
    kind = video_output_kind(path)
    if kind == "frames":
        return _write_frame_folder(Path(path), frames, force)
    count = 0

    def _write(tmp: str) -> None:
        import imageio_ffmpeg

        nonlocal count
        writer = None
        try:
            for frame in frames:
                if writer is None:
                    h, w = frame.shape[:2]
                    codec, pix_out, params = _ffmpeg_output(kind, lossless)
                    if pix_out == "yuv420p" and (w % 2 or h % 2):
                        pix_out = "yuv444p"  # 4:2:0 needs even sides; the size is kept, never padded
                    writer = imageio_ffmpeg.write_frames(tmp, (w, h), fps=float(fps), codec=codec,
                                                         pix_fmt_in="rgb24", pix_fmt_out=pix_out,
                                                         output_params=params + ["-r", str(fps)],
                                                         macro_block_size=1, ffmpeg_log_level="error")
                    writer.send(None)
                writer.send(np.ascontiguousarray(frame))
                count += 1
            if writer is None:
                raise ValueError("no frames to write")
        finally:
            if writer is not None:  # ffmpeg must be done before the temporary file is removed
                writer.close()

    atomic_write(path, _write, force)
    return count


FRAME_NAME = re.compile(r"frame-\d{6,}\.png")


def check_frame_folder(path, force: bool) -> None:
    """An existing frame folder is replaced only with ``force``, and only when it holds
    nothing but frames (``frame-NNNNNN.png`` files, as ulbc writes them): a folder with any
    other entry is refused even with ``force``, so that no unrelated file is ever deleted."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    if not force:
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    try:
        others = sorted(e.name for e in os.scandir(path)
                        if not (FRAME_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False)))
    except OSError as exc:
        raise OutputError(f"{path}: cannot read folder ({exc.strerror or exc})") from None
    if others:
        raise OutputError(f"{path}: holds {len(others)} entries that are not decoded frames (first: "
                          f"{others[0]!r}); refusing to replace it, even with --force")


def _write_frame_folder(path: Path, frames: Iterable[np.ndarray], force: bool) -> int:
    """Frames as PNGs in a new folder, built as a hidden temporary folder and renamed into
    place; with ``force`` an existing frame folder is replaced, only after the new one is
    complete."""
    from PIL import Image

    check_frame_folder(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{path}: cannot create folder ({exc.strerror or exc})") from None
    old = None
    try:
        count = 0
        for count, frame in enumerate(frames, 1):
            Image.fromarray(np.ascontiguousarray(frame), "RGB").save(tmp / f"frame-{count:06d}.png",
                                                                     compress_level=PNG_COMPRESS_LEVEL)
        _default_mode()  # reads the umask
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0o700 is for the temporary folder only
        check_frame_folder(path, force)  # again: the folder may have changed while decoding
        if path.exists():
            old = tmp.with_name(tmp.name + ".old")  # unique as tmp is; removed below
            os.rename(path, old)
        os.rename(tmp, path)
        return count
    except OSError as exc:
        if old is not None and not path.exists():
            os.rename(old, path)
            old = None
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        import shutil

        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
