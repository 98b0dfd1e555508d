"""Images in and out: strict reading, normalisation to 8-bit RGB, atomic writing.

Every failure is an :class:`InputError` (bad input) or :class:`OutputError` (cannot write)
carrying one human-readable line; the CLI prints it and exits non-zero. Outputs are
written to a temporary file in the destination folder and renamed into place, so a
crash or a kill never leaves a half-written file, and an existing file is only replaced
when the caller asked for it (``force``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
# Inputs Pillow reads that we accept besides the output formats.
READ_EXTENSIONS = set(IMAGE_EXTENSIONS) | {".bmp", ".ppm", ".pgm", ".pnm", ".gif", ".avif", ".jxl"}


class InputError(ValueError):
    """An input file is missing, unreadable or unsupported."""


class OutputError(OSError):
    """An output cannot be written (exists, unwritable folder, disk full...)."""


def read_image(path) -> Tuple[np.ndarray, List[str]]:
    """Read any Pillow-supported image as HxWx3 uint8 RGB.

    Returns the pixels and a list of notes on lossy normalisation the caller should show
    the user (alpha dropped, 16-bit reduced to 8-bit). EXIF orientation is applied, as
    every image viewer does.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    notes: List[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data inside a known format
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None

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
    rgb = np.asarray(im.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise InputError(f"{path}: unsupported image layout {rgb.shape}")
    return np.ascontiguousarray(rgb), notes


def check_output(path, force: bool) -> Path:
    """Refuse to overwrite unless forced, and fail early on an impossible destination."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise OutputError(f"{parent}: folder is not writable")
    return path


def atomic_write(path, write: Callable[[str], None], force: bool = False) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = check_output(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create file ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        write(tmp)
        if path.exists() and not force:  # someone else created it meanwhile: never clobber
            raise OutputError(f"{path}: already exists (use --force to overwrite)")
        os.replace(tmp, path)
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes, force: bool = False) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, _write, force)


def image_format(path) -> str:
    ext = Path(path).suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise OutputError(f"{path}: unsupported output format {ext or '(none)'}; use .png, .jpg, .webp or .tiff")
    return IMAGE_EXTENSIONS[ext]


def write_image(path, rgb: np.ndarray, force: bool = False) -> None:
    """Write HxWx3 uint8 RGB; the format follows the extension (png, jpg, webp, tiff).
    Lossy formats are written at high quality: the codec's output should not be
    degraded again on the way to disk."""
    from PIL import Image

    fmt = image_format(path)
    options = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"quality": 95, "method": 4},
               "PNG": {"compress_level": 6}, "TIFF": {"compression": "tiff_deflate"}}[fmt]
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options), force)
