"""Classical video codecs (x264, x265, SVT-AV1, VVenC via imageio-ffmpeg's ffmpeg) as baselines.

Every codec gets the same RGB frames and the same colour conversion, and is charged for
its **elementary stream** only:

    RGB frames ─► ffmpeg scale (BT.709 matrix, limited range) ─► yuv420p ─► encoder
               ─► raw elementary stream (Annex B for H.264/HEVC/VVC, OBUs for AV1)
    stream ─► ffmpeg decoder ─► yuv420p ─► scale (BT.709, limited) ─► RGB frames

- **Bits** are the elementary stream's bytes minus its SEI NAL units (x264 writes ~600
  bytes of settings into one; x265 is also run with ``info=0``): at 0.005-0.05 bpp on a
  128x128x30 clip, a container (mp4: ~1 KB of boxes) or that SEI would be a large
  fraction of the whole rate, which is how the published comparison over-charged its
  baselines. The container size is reported too (``mp4_bytes``: the same stream remuxed
  into mp4 with ``-c copy``).
- **Settings** (one GOP for the whole clip, B-frames allowed, slowest presets):

  ========  =============================================================================
  x264      ``-c:v libx264 -preset veryslow -crf Q -g N -keyint_min N -bf 3``
  x265      ``-c:v libx265 -preset veryslow -crf Q -x265-params keyint=N:min-keyint=N:bframes=4:info=0``
  SVT-AV1   ``-c:v libsvtav1 -preset 2 -crf Q -g N``
  VVenC     ``-c:v libvvenc -preset 4 -qp Q -period P`` (P = the clip's length in seconds, rounded up)
  ========  =============================================================================

  with N the clip's frame count, so each clip is coded as one GOP.
  ``QUALITIES`` are the settings swept, from the lowest rate up.
"""

from __future__ import annotations

import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

CODECS = ("x264", "x265", "svtav1", "vvenc")
# Highest quantiser first: ultra-low rates are the interesting end.
QUALITIES: Dict[str, Tuple[int, ...]] = {
    "x264": (51, 48, 45, 42, 39, 36, 33),
    "x265": (51, 48, 45, 42, 39, 36, 33),
    "svtav1": (63, 60, 56, 52, 48, 44, 40),
    "vvenc": (63, 60, 56, 52, 48, 44, 40),
}
STREAM_FORMAT = {"x264": "h264", "x265": "hevc", "svtav1": "obu", "vvenc": "vvc"}
COLOUR = "out_color_matrix=bt709:out_range=tv"
COLOUR_BACK = "in_color_matrix=bt709:in_range=tv"


def _ffmpeg_exe() -> str:
    from ulbcodec.metrics import ffmpeg_exe

    return ffmpeg_exe()


def encoder_args(codec: str, quality: int, frames: int, fps: float) -> List[str]:
    n = str(frames)
    if codec == "x264":
        return ["-c:v", "libx264", "-preset", "veryslow", "-crf", str(quality), "-g", n, "-keyint_min", n, "-bf", "3"]
    if codec == "x265":
        return ["-c:v", "libx265", "-preset", "veryslow", "-crf", str(quality),
                "-x265-params", f"keyint={n}:min-keyint={n}:bframes=4:info=0:log-level=error"]
    if codec == "svtav1":
        return ["-c:v", "libsvtav1", "-preset", "2", "-crf", str(quality), "-g", n]
    if codec == "vvenc":
        return ["-c:v", "libvvenc", "-preset", "4", "-qp", str(quality), "-period", str(max(1, math.ceil(frames / fps)))]
    raise ValueError(f"unknown video codec {codec!r}, expected one of {CODECS}")


# ----------------------------------------------------------------------------- SEI accounting


def _annexb_nal_units(stream: bytes) -> List[Tuple[int, int]]:
    """(start, end) of every NAL unit payload in an Annex B byte stream (start codes excluded)."""
    starts, i, n = [], 0, len(stream)
    while True:
        j = stream.find(b"\x00\x00\x01", i)
        if j < 0:
            break
        starts.append(j + 3)
        i = j + 3
    units = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 3 if k + 1 < len(starts) else n
        while e > s and stream[e - 1] == 0:  # trailing zero of a 4-byte start code
            e -= 1
        units.append((s, e))
    return units


def sei_bytes(stream: bytes, codec: str) -> int:
    """Bytes of SEI NAL units (with their start codes) in an H.264/HEVC/VVC stream; 0 for AV1."""
    if codec == "svtav1":
        return 0  # AV1 has no SEI; metadata OBUs are not written by SVT-AV1 by default
    total = 0
    for s, e in _annexb_nal_units(stream):
        if s >= e:
            continue
        if codec == "x264":
            kind = stream[s] & 0x1F
            sei = kind == 6
        elif codec == "x265":
            kind = (stream[s] >> 1) & 0x3F
            sei = kind in (39, 40)
        else:  # VVC: nal_unit_type in the second byte
            kind = (stream[s + 1] >> 3) & 0x1F if e - s > 1 else -1
            sei = kind in (23, 24)
        if sei:
            total += e - s + 3
    return total


# ----------------------------------------------------------------------------- coding


@dataclass
class VideoResult:
    codec: str
    quality: int
    stream_bytes: int  # elementary stream
    sei_bytes: int  # SEI NAL units inside it (not charged)
    mp4_bytes: int  # the same stream in an mp4 container (reported, not charged)
    decoded: np.ndarray  # [T, H, W, 3] uint8

    @property
    def charged_bytes(self) -> int:
        return self.stream_bytes - self.sei_bytes

    def bpp(self, shape: Sequence[int]) -> float:
        t, h, w = shape[:3]
        return self.charged_bytes * 8 / (t * h * w)


def _run(args: List[str], data: bytes = None) -> bytes:
    stdin = [] if data is not None else ["-nostdin"]
    proc = subprocess.run([_ffmpeg_exe(), "-v", "error", "-y", *stdin, *args], input=data, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace').strip()[:300]}")
    return proc.stdout


def encode_decode(frames: np.ndarray, codec: str, quality: int, fps: float = 25.0) -> VideoResult:
    """Code ``frames`` [T, H, W, 3] uint8 with one codec at one setting; decode it back."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"4:2:0 coding needs even sizes, got {w}x{h}")
    fmt = STREAM_FORMAT[codec]
    with tempfile.TemporaryDirectory() as tmp:
        es, mp4 = Path(tmp) / f"clip.{fmt}", Path(tmp) / "clip.mp4"
        _run(["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-",
              "-vf", f"scale={COLOUR}", "-pix_fmt", "yuv420p", *encoder_args(codec, quality, t, fps),
              "-f", fmt, str(es)], frames.tobytes())
        stream = es.read_bytes()
        _run(["-i", str(es), "-c", "copy", "-f", "mp4", str(mp4)])
        raw = _run(["-i", str(es), "-vf", f"scale={COLOUR_BACK}", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        mp4_bytes = mp4.stat().st_size
    decoded = np.frombuffer(raw, np.uint8).reshape(-1, h, w, 3)
    if decoded.shape[0] != t:
        raise RuntimeError(f"{codec} decoded {decoded.shape[0]} frames, expected {t}")
    return VideoResult(codec, quality, len(stream), sei_bytes(stream, codec), mp4_bytes, decoded)


def command_lines(codec: str, quality: int, frames: int, width: int, height: int, fps: float = 25.0) -> str:
    """The exact ffmpeg command lines used (for docs/evaluation.md)."""
    fmt = STREAM_FORMAT[codec]
    enc = " ".join(encoder_args(codec, quality, frames, fps))
    return (f"ffmpeg -f rawvideo -pix_fmt rgb24 -s {width}x{height} -r {fps:g} -i - -vf scale={COLOUR} "
            f"-pix_fmt yuv420p {enc} -f {fmt} clip.{fmt}\n"
            f"ffmpeg -i clip.{fmt} -vf scale={COLOUR_BACK} -f rawvideo -pix_fmt rgb24 -")
