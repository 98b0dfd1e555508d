"""Classical image codecs (JPEG, WebP, AVIF via Pillow; JPEG XL via ffmpeg) as ultra-low-rate baselines.

At the rates ulbc targets (~0.005-0.15 bpp) a classical codec does best by coding a
*downscaled* image and upsampling after decoding, so every codec is offered at
downscale factors 1, 2, 4, 8 -- variant names like ``avif@1/4`` -- and a fair
comparison uses the best variant at each rate (see ``benchmarks/image_rd.py``).

Settings (Pillow's encoders, no metadata written):

* ``jpeg``: libjpeg(-turbo), ``quality`` 1..100, ``optimize=True`` (optimised Huffman
  tables), ``subsampling="4:2:0"``.
* ``webp``: libwebp lossy, ``quality`` 0..100, ``method=6`` (slowest, best).
* ``avif``: libavif with the AV1 encoder Pillow was built with (libaom here),
  ``quality`` 0..100, ``speed=0`` (slowest, best), Pillow's defaults otherwise
  (4:2:0, full range).
* ``jxl``: libjxl through the ffmpeg of imageio-ffmpeg (Pillow has no JPEG XL writer):
  ``ffmpeg -f rawvideo -pix_fmt rgb24 -s WxH -i - -c:v libjxl -distance D -effort 9
  -f image2pipe -``, a bare JPEG XL codestream (no ISOBMFF container). ``quality``
  0..100 maps to the Butteraugli distance D exactly as ``cjxl -q`` does
  (q >= 30: D = 0.1 + (100 - q) * 0.09; q < 30: D = 6.4 + 2.5^((30 - q) / 5) / 6.25),
  capped at ffmpeg's maximum of 15. Decoding: ``ffmpeg -f jpegxl_pipe -i -`` to PNG.

Downscaling: the encoder resizes the WxH image with Pillow's Lanczos filter to
``ceil(W/f) x ceil(H/f)`` and codes that; the decoder decodes it and resizes back with
Lanczos to exactly WxH. For that the decoder must know W and H, which the small image's
container does not hold, so a downscaled stream is a 4-byte header (W, H as big-endian
uint16) followed by the codec's file. Those 4 bytes are part of the returned bytes and
are charged. At f=1 the codec's own file is the whole stream.

Rate is always charged on the complete stream and the ORIGINAL size:
``bpp = len(stream) * 8 / (W * H)``. Container overhead is real and large at these rates
(an AVIF file has ~300 bytes of ISOBMFF boxes, a JPEG ~280 bytes of headers and tables,
a WebP ~40): it is charged, as ulbc's own .ulb header is.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

CODECS = ("jpeg", "webp", "avif", "jxl")
DOWNSCALES = (1, 2, 4, 8)

# Quality grids of `sweep`, dense at the low end and starting at each codec's minimum
# (Pillow's JPEG treats 0 like 1, and 2 gives the same bytes as 1: both clip every
# quantiser to 255). At f=1 they run far past 0.15 bpp on photos; at f=8 the top of the
# grid is where a coarser factor has long become the better choice, so together the
# variants cover the ulbc range. `sweep(max_bpp=...)` stops early.
QUALITIES = {
    "jpeg": (1, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75),
    "webp": (0, 1, 2, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 60, 75),
    "avif": (0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 45, 50, 55, 60, 65, 70),
    "jxl": (5, 10, 15, 20, 25, 30, 35, 40, 50, 60, 70),  # q <= 5 all hit the distance cap
}
QUALITY_RANGE = {"jpeg": (1, 100), "webp": (0, 100), "avif": (0, 100), "jxl": (0, 100)}

SIZE_HEADER = struct.Struct(">HH")
"""Original (W, H) prepended to downscaled streams: 4 bytes, charged in the rate."""

_PIL_SAVE = {
    "jpeg": ("JPEG", {"optimize": True, "subsampling": "4:2:0"}),
    "webp": ("WEBP", {"method": 6}),
    "avif": ("AVIF", {"speed": 0}),
}


def jxl_distance(quality: int) -> float:
    """cjxl's mapping of ``-q`` to Butteraugli distance, capped at ffmpeg's 15."""
    if quality >= 30:
        return 0.1 + (100 - quality) * 0.09
    return min(15.0, 6.4 + 2.5 ** ((30 - quality) / 5) / 6.25)


def _ffmpeg(args: list[str], data: bytes) -> bytes:
    import subprocess

    from ulbcodec.metrics import ffmpeg_exe

    proc = subprocess.run([ffmpeg_exe(), "-v", "error", *args], input=data, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return proc.stdout


def _jxl_encode(img: Image.Image, quality: int) -> bytes:
    rgb = np.asarray(img.convert("RGB"))
    return _ffmpeg(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{img.width}x{img.height}", "-i", "-",
                    "-c:v", "libjxl", "-distance", f"{jxl_distance(quality):.4f}", "-effort", "9",
                    "-f", "image2pipe", "-"], rgb.tobytes())


def _jxl_decode(stream: bytes) -> Image.Image:
    return Image.open(io.BytesIO(_ffmpeg(["-f", "jpegxl_pipe", "-i", "-", "-f", "image2pipe", "-vcodec", "png", "-"],
                                         stream)))


def bpp(stream: bytes, shape: tuple[int, ...]) -> float:
    """Bits per pixel of a complete stream, over the original ``H x W`` (``shape[:2]``)."""
    return len(stream) * 8 / (shape[0] * shape[1])


@dataclass(frozen=True)
class Baseline:
    """One codec at one downscale factor, e.g. ``Baseline("avif", 4)`` = ``avif@1/4``."""

    codec: str
    downscale: int = 1

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}, expected one of {CODECS}")
        if self.downscale not in DOWNSCALES:
            raise ValueError(f"downscale must be one of {DOWNSCALES}, got {self.downscale}")

    @property
    def name(self) -> str:
        return f"{self.codec}@1/{self.downscale}"

    def encode(self, rgb: np.ndarray, quality: int) -> bytes:
        """Complete stream for an HxWx3 uint8 RGB image at the codec's ``quality``."""
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {getattr(rgb, 'dtype', type(rgb))} "
                             f"{getattr(rgb, 'shape', '')}")
        lo, hi = QUALITY_RANGE[self.codec]
        if not (isinstance(quality, (int, np.integer)) and lo <= quality <= hi):
            raise ValueError(f"{self.codec} quality must be an int in [{lo}, {hi}], got {quality!r}")
        height, width = rgb.shape[:2]
        img = Image.fromarray(rgb, "RGB")
        header = b""
        if self.downscale > 1:
            if max(width, height) > 0xFFFF:
                raise ValueError(f"{width}x{height} does not fit the 16-bit size header")
            small = (math.ceil(width / self.downscale), math.ceil(height / self.downscale))
            img = img.resize(small, Image.Resampling.LANCZOS)
            header = SIZE_HEADER.pack(width, height)
        if self.codec == "jxl":
            return header + _jxl_encode(img, int(quality))
        fmt, options = _PIL_SAVE[self.codec]
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=int(quality), **options)
        return header + buf.getvalue()

    def decode(self, stream: bytes) -> np.ndarray:
        """HxWx3 uint8 RGB image from a stream made by :meth:`encode` (any quality)."""
        size = None
        if self.downscale > 1:
            size = SIZE_HEADER.unpack_from(stream)
            stream = stream[SIZE_HEADER.size :]
        img = _jxl_decode(stream) if self.codec == "jxl" else Image.open(io.BytesIO(stream))
        img.load()
        img = img.convert("RGB")
        if size is not None:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(img)

    def __call__(self, rgb: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
        """``(stream, decoded)``: encode at ``quality`` and decode back to the input size."""
        stream = self.encode(rgb, quality)
        return stream, self.decode(stream)


def jpeg(rgb: np.ndarray, quality: int, downscale: int = 1) -> tuple[bytes, np.ndarray]:
    """``(stream, decoded)`` of JPEG (Pillow, optimize, 4:2:0) at ``quality`` 1..100."""
    return Baseline("jpeg", downscale)(rgb, quality)


def webp(rgb: np.ndarray, quality: int, downscale: int = 1) -> tuple[bytes, np.ndarray]:
    """``(stream, decoded)`` of lossy WebP (Pillow, method 6) at ``quality`` 0..100."""
    return Baseline("webp", downscale)(rgb, quality)


def avif(rgb: np.ndarray, quality: int, downscale: int = 1) -> tuple[bytes, np.ndarray]:
    """``(stream, decoded)`` of AVIF (Pillow/libavif, speed 0, 4:2:0) at ``quality`` 0..100."""
    return Baseline("avif", downscale)(rgb, quality)


def jxl(rgb: np.ndarray, quality: int, downscale: int = 1) -> tuple[bytes, np.ndarray]:
    """``(stream, decoded)`` of JPEG XL (libjxl via ffmpeg, effort 9) at ``quality`` 0..100."""
    return Baseline("jxl", downscale)(rgb, quality)


class RDPoint(NamedTuple):
    """One coded version of an image: which variant and setting, its real rate, its pixels."""

    variant: str  # e.g. "avif@1/4"
    codec: str
    downscale: int
    quality: int
    bpp: float  # len(stream) * 8 / original pixels
    stream: bytes
    decoded: np.ndarray


def sweep(
    codec: str,
    rgb: np.ndarray,
    downscales: Iterable[int] = DOWNSCALES,
    qualities: Iterable[int] | None = None,
    max_bpp: float | None = None,
) -> Iterator[RDPoint]:
    """Code ``rgb`` with ``codec`` at every downscale x quality (default grid: ``QUALITIES``).

    Yields :class:`RDPoint` in downscale-major, quality-ascending order. The default
    grid starts at each codec's lowest quality, so each variant's curve goes as low in
    rate as that codec can. With ``max_bpp``, a variant stops after its first point above
    ``max_bpp`` (that point is still yielded, so curves bracket the range) -- this skips
    the slow high-quality AVIF encodes nobody needs at ultra-low rates.
    """
    grid = sorted(QUALITIES[codec] if qualities is None else qualities)
    for f in downscales:
        variant = Baseline(codec, f)
        for q in grid:
            stream, decoded = variant(rgb, q)
            point = RDPoint(variant.name, codec, f, q, bpp(stream, rgb.shape), stream, decoded)
            yield point
            if max_bpp is not None and point.bpp > max_bpp:
                break
