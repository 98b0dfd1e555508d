"""Quality metrics for ulbc's rate–distortion evaluation (Bjøntegaard deltas: ulbcodec/eval/rd.py).

Every image metric takes two HxWx3 ``uint8`` RGB numpy arrays, reference first and
distorted second, and its docstring states the exact protocol (colour matrix, value
range, settings), so that the numbers in our reports can be reproduced with other tools.

* :func:`psnr`, :func:`psnr_y` -- fidelity. Identical inputs give ``math.inf``.
* :func:`ms_ssim` -- structural similarity (pytorch_msssim, standard 5 scales).
* :func:`vmaf`, :func:`vmaf_video` -- Netflix VMAF (vmaf_v0.6.1) through the ffmpeg
  binary shipped with imageio-ffmpeg; :func:`vmaf_neg`, :func:`vmaf_neg_video` -- the same
  with libvmaf's no-enhancement-gain model vmaf_v0.6.1neg (no reward for sharpening or
  contrast alone).
* :func:`ssimulacra2` -- SSIMULACRA 2 (Cloudinary / JPEG XL), the PyPI ``ssimulacra2``
  package.
* :func:`butteraugli`, :func:`butteraugli_max` -- butteraugli 3-norm and max, libjxl's
  ``butteraugli_main`` (Debian ``libjxl-devtools``).
* :func:`blockiness` -- gradient energy on 8/16 px block boundaries over elsewhere,
  relative to the original's (1 = no added grid).
* :func:`delta_e`, :func:`color_shift`, :func:`lab_mean_shift` -- colour drift in CIELAB.
* :func:`log_spectrum_error` -- how much high-frequency detail the decoded image lost
  (blur) or invented (noise, hallucinated texture), in dB. At ultra-low rates PSNR and
  MS-SSIM reward blur; this number makes the blur/detail trade-off visible.
* :func:`lpips` -- LPIPS (AlexNet) when the user has the package and its weights.
* :func:`available_metrics` -- which metrics can run on this machine.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- helpers


def _check_image(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        got = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        raise ValueError(f"{name} must be an HxWx3 uint8 RGB array, got {got}")


def _check_pair(ref: np.ndarray, dist: np.ndarray) -> None:
    _check_image(ref, "ref")
    _check_image(dist, "dist")
    if ref.shape != dist.shape:
        raise ValueError(f"ref and dist differ in shape: {ref.shape} vs {dist.shape}")


def _psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def luma_bt601(rgb: np.ndarray) -> np.ndarray:
    """BT.601 full-range luma ``Y = 0.299 R + 0.587 G + 0.114 B`` as float64 in [0, 255].

    No offset, no scaling to 16..235 and no rounding: the luma used by :func:`psnr_y`
    and :func:`log_spectrum_error`.
    """
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


# --------------------------------------------------------------------------- PSNR


def psnr(ref: np.ndarray, dist: np.ndarray) -> float:
    """PSNR in dB over all three RGB channels pooled, peak 255.

    ``10 log10(255^2 / MSE)`` with the MSE averaged over every pixel of R, G and B
    (one MSE for the image, not a mean of per-channel PSNRs). Identical images give
    ``math.inf``.
    """
    _check_pair(ref, dist)
    mse = float(np.mean((ref.astype(np.float64) - dist.astype(np.float64)) ** 2))
    return _psnr_from_mse(mse)


def psnr_y(ref: np.ndarray, dist: np.ndarray) -> float:
    """PSNR in dB of BT.601 full-range luma, peak 255.

    Luma is ``Y = 0.299 R + 0.587 G + 0.114 B`` computed in float64 on the 0..255 RGB
    values (full range: no 16..235 scaling, no rounding to integers). Identical images
    give ``math.inf``.
    """
    _check_pair(ref, dist)
    mse = float(np.mean((luma_bt601(ref) - luma_bt601(dist)) ** 2))
    return _psnr_from_mse(mse)


# --------------------------------------------------------------------------- MS-SSIM

MS_SSIM_MIN_SIDE = 161
"""pytorch_msssim's 5-scale MS-SSIM with its 11-tap window needs each side > 160 px."""


def ms_ssim(ref: np.ndarray, dist: np.ndarray) -> float:
    """Multi-scale SSIM of the RGB image, computed by ``pytorch_msssim.ms_ssim``.

    Protocol: RGB values 0..255 as float32, ``data_range=255``, the package defaults
    (5 scales with weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333; 11-tap Gaussian
    window, sigma 1.5; K1=0.01, K2=0.03; 'valid' filtering, 2x2 average pooling between
    scales). MS-SSIM is computed per channel and averaged over R, G, B -- the same number
    CompressAI-style papers report as "MS-SSIM (RGB)".

    Raises ``ValueError`` if either side is shorter than 161 px: with fewer than 5 scales
    the value is a different metric and would not be comparable with published numbers,
    so we refuse rather than silently fall back.
    """
    _check_pair(ref, dist)
    if min(ref.shape[:2]) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"ms_ssim needs each side >= {MS_SSIM_MIN_SIDE} px (5 scales, 11-tap window), "
            f"got {ref.shape[1]}x{ref.shape[0]}"
        )
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def to_tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().unsqueeze(0)

    with torch.no_grad():
        return float(_ms_ssim(to_tensor(ref), to_tensor(dist), data_range=255.0))


# --------------------------------------------------------------------------- VMAF

VMAF_MODEL = "vmaf_v0.6.1"
VMAF_NEG_MODEL = "vmaf_v0.6.1neg"

# BT.709 luma coefficients (Kr, Kb); Kg = 1 - Kr - Kb.
_KR_709, _KB_709 = 0.2126, 0.0722


def rgb_to_yuv420p_bt709(rgb: np.ndarray) -> bytes:
    """One planar 8-bit YUV 4:2:0 frame (BT.709 matrix, limited range) as raw bytes.

    ``Y' = Kr R' + Kg G' + Kb B'`` with BT.709 ``Kr=0.2126, Kb=0.0722`` on RGB scaled to
    [0, 1]; ``Y = 16 + 219 Y'``, ``Cb = 128 + 224 (B'-Y') / (2 (1-Kb))``,
    ``Cr = 128 + 224 (R'-Y') / (2 (1-Kr))``. Chroma is subsampled by averaging each 2x2
    block (edge pixels replicated when a side is odd) before rounding; all planes are
    rounded to the nearest integer. The plane layout (Y, then ceil(H/2) x ceil(W/2) Cb
    and Cr) is ffmpeg's ``rawvideo`` ``yuv420p``.
    """
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = _KR_709 * r + (1.0 - _KR_709 - _KB_709) * g + _KB_709 * b
    cb = (b - y) / (2.0 * (1.0 - _KB_709))
    cr = (r - y) / (2.0 * (1.0 - _KR_709))

    def subsample(c: np.ndarray) -> np.ndarray:
        h, w = c.shape
        c = np.pad(c, ((0, h % 2), (0, w % 2)), mode="edge")
        return c.reshape(c.shape[0] // 2, 2, c.shape[1] // 2, 2).mean(axis=(1, 3))

    planes = (16.0 + 219.0 * y, 128.0 + 224.0 * subsample(cb), 128.0 + 224.0 * subsample(cr))
    return b"".join(np.clip(np.rint(p), 0, 255).astype(np.uint8).tobytes() for p in planes)


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@functools.lru_cache(maxsize=1)
def _libvmaf_problem() -> str | None:
    """``None`` if the bundled ffmpeg has the libvmaf filter, otherwise why not."""
    try:
        exe = ffmpeg_exe()
        filters = subprocess.run(
            [exe, "-hide_banner", "-filters"], capture_output=True, text=True, check=True
        ).stdout
    except Exception as e:  # no imageio-ffmpeg, no binary, binary does not run
        return f"ffmpeg from imageio-ffmpeg is not usable ({e})"
    if not any(line.split()[1:2] == ["libvmaf"] for line in filters.splitlines()):
        return f"ffmpeg at {exe} was built without libvmaf (no 'libvmaf' filter)"
    return None


def _libvmaf_log(ref_frames: Iterable[np.ndarray], dist_frames: Iterable[np.ndarray], threads: int,
                 model: str = VMAF_MODEL) -> dict:
    """libvmaf's JSON log of a frame sequence, scored as :func:`vmaf_video` describes."""
    problem = _libvmaf_problem()
    if problem is not None:
        raise RuntimeError(f"VMAF unavailable: {problem}")
    with tempfile.TemporaryDirectory(prefix="ulbc_vmaf_") as tmp:
        n_frames, shape = 0, None
        with open(os.path.join(tmp, "ref.yuv"), "wb") as fr, open(os.path.join(tmp, "dist.yuv"), "wb") as fd:
            for ref, dist in itertools.zip_longest(ref_frames, dist_frames):
                if ref is None or dist is None:
                    raise ValueError("ref_frames and dist_frames have different lengths")
                _check_pair(ref, dist)
                if shape is not None and ref.shape != shape:
                    raise ValueError(f"frame {n_frames} has shape {ref.shape}, earlier frames {shape}")
                shape = ref.shape
                fr.write(rgb_to_yuv420p_bt709(ref))
                fd.write(rgb_to_yuv420p_bt709(dist))
                n_frames += 1
        if n_frames == 0:
            raise ValueError("vmaf_video needs at least one frame")
        size = f"{shape[1]}x{shape[0]}"
        raw = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", size]
        graph = (
            f"[0:v][1:v]libvmaf=model=version={model}"
            f":log_fmt=json:log_path=vmaf.json:n_threads={int(threads)}"
        )
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error",
               *raw, "-i", "dist.yuv", *raw, "-i", "ref.yuv",
               "-lavfi", graph, "-f", "null", "-"]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ffmpeg/libvmaf failed ({done.returncode}): {done.stderr.strip()}")
        log = json.loads(Path(tmp, "vmaf.json").read_text())
    if len(log["frames"]) != n_frames:
        raise RuntimeError(f"libvmaf scored {len(log['frames'])} frames, expected {n_frames}")
    return log


def vmaf_video(
    ref_frames: Iterable[np.ndarray], dist_frames: Iterable[np.ndarray], *, threads: int = 1
) -> float:
    """VMAF (model vmaf_v0.6.1, built into libvmaf) of a frame sequence, mean-pooled.

    Protocol: every RGB frame of both sequences goes through the same conversion,
    :func:`rgb_to_yuv420p_bt709` (BT.709 matrix, limited range, 4:2:0, 8 bit, done
    here in numpy so that ffmpeg performs no colour conversion or scaling of its own).
    The raw yuv420p files are scored by the ffmpeg binary bundled with imageio-ffmpeg:
    ``[dist][ref]libvmaf=model=version=vmaf_v0.6.1:log_fmt=json`` (libvmaf's first input
    is the distorted one), and the result is the ``pooled_metrics.vmaf.mean`` of its JSON
    log, i.e. the arithmetic mean of the per-frame scores. vmaf_v0.6.1 only reads the luma
    plane, so the chroma conversion details do not influence the score.

    Note that VMAF is not 100 for identical inputs in general: its motion features are 0
    on the first frame (and on still content), which caps the score of an identical
    frame at about 97.43 (see Netflix/vmaf issue #1229).

    ``threads`` is libvmaf's ``n_threads``. Raises ``RuntimeError`` if the bundled ffmpeg
    has no libvmaf or fails, ``ValueError`` on mismatched or empty inputs.
    """
    return float(_libvmaf_log(ref_frames, dist_frames, threads)["pooled_metrics"]["vmaf"]["mean"])


def vmaf(ref: np.ndarray, dist: np.ndarray, *, threads: int = 1) -> float:
    """VMAF (vmaf_v0.6.1) of one image, scored as a one-frame video.

    Same protocol as :func:`vmaf_video` (BT.709 limited-range yuv420p, ffmpeg's libvmaf,
    default model). On a single frame the motion features are 0, as for any still
    image, so an identical pair scores about 97.43, not 100 -- compare VMAF numbers of
    images only with other still-image VMAF numbers.
    """
    return vmaf_video([ref], [dist], threads=threads)


def vmaf_neg_video(
    ref_frames: Iterable[np.ndarray], dist_frames: Iterable[np.ndarray], *, threads: int = 1
) -> float:
    """VMAF NEG: :func:`vmaf_video` with libvmaf's built-in ``vmaf_v0.6.1neg`` model.

    The "no enhancement gain" variant: the same features as vmaf_v0.6.1 with the gains of
    VIF and ADM capped (``vif_enhn_gain_limit=1``, ``adm_enhn_gain_limit=1``), so that
    sharpening, contrast boosts or invented high-frequency texture cannot raise the score
    above what faithful reproduction gets. Same protocol otherwise (BT.709 limited-range
    yuv420p made here, mean-pooled ``pooled_metrics.vmaf.mean``).
    """
    log = _libvmaf_log(ref_frames, dist_frames, threads, VMAF_NEG_MODEL)
    return float(log["pooled_metrics"]["vmaf"]["mean"])


def vmaf_neg(ref: np.ndarray, dist: np.ndarray, *, threads: int = 1) -> float:
    """VMAF NEG (vmaf_v0.6.1neg) of one image, scored as a one-frame video (:func:`vmaf`)."""
    return vmaf_neg_video([ref], [dist], threads=threads)


def vmaf_features(ref: np.ndarray, dist: np.ndarray, *, threads: int = 1) -> dict[str, float]:
    """The elementary features behind :func:`vmaf` of one image, as libvmaf logs them
    (``integer_vif_scale0..3``, ``integer_adm2``, per-scale ADM, ``vmaf`` itself; the motion
    features, 0 on a still image, left out): to see which of them a decoder wins or loses."""
    frame = _libvmaf_log([ref], [dist], threads)["frames"][0]["metrics"]
    return {k: float(v) for k, v in frame.items() if "motion" not in k}


# --------------------------------------------------------------------------- spectrum


def radial_log_power_spectrum(img: np.ndarray, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of the BT.601 luma, in dB.

    The luma (:func:`luma_bt601`) minus its mean is multiplied by a separable Hann window
    (to suppress the cross-shaped leakage from the image borders) and Fourier
    transformed; the power ``|F|^2 / sum(window^2)`` (so white noise of variance s^2 has
    power s^2 at every frequency) is averaged over rings of radial frequency
    ``sqrt(fx^2 + fy^2)`` in cycles/pixel, ``n_bins`` equal rings over [0, 0.5]
    (default ``min(H, W) // 2``); corners beyond 0.5 are ignored. Returns
    ``(ring centre frequencies, 10 log10(power + 1e-10))``; the floor is far below the
    1/12 power of 8-bit quantisation noise and only matters for flat images.
    """
    _check_image(img, "img")
    h, w = img.shape[:2]
    if min(h, w) < 8:
        raise ValueError(f"spectrum needs each side >= 8 px, got {w}x{h}")
    n_bins = n_bins or min(h, w) // 2
    y = luma_bt601(img)
    window = np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2((y - y.mean()) * window)) ** 2 / np.sum(window**2)
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij"))
    ring = np.floor(radius / 0.5 * n_bins).astype(np.int64)
    inside = ring < n_bins
    total = np.bincount(ring[inside], weights=power[inside], minlength=n_bins)
    count = np.bincount(ring[inside], minlength=n_bins)
    freqs = (np.arange(n_bins) + 0.5) * 0.5 / n_bins
    return freqs, 10.0 * np.log10(total / np.maximum(count, 1) + 1e-10)


def log_spectrum_error(ref: np.ndarray, dist: np.ndarray) -> float:
    """Mean absolute difference (dB) of the luma log power spectra at high frequencies.

    Both images go through :func:`radial_log_power_spectrum` (BT.601 full-range luma,
    Hann window, ``min(H, W) // 2`` rings); the result is the mean over the rings in the
    upper half of the frequency range, 0.25..0.5 cycles/pixel, of
    ``|dB_ref - dB_dist|``, each ring weighted equally. 0 for identical images; larger
    when the decoded image lost detail (blur: a deficit of high-frequency power) or
    gained spurious detail (noise, ringing, hallucinated texture: an excess). Unlike
    PSNR it does not care where the detail is, only how much of it there is, so a
    generative decoder that synthesises plausible texture scores well, and a codec that
    blurs scores badly even at equal PSNR. The flip side: it only sees how much
    high-frequency power there is, so block edges of a coarse JPEG can stand in for lost
    texture and score well too -- read it next to PSNR / MS-SSIM, not alone. Lower is
    better.
    """
    _check_pair(ref, dist)
    freqs, db_ref = radial_log_power_spectrum(ref)
    _, db_dist = radial_log_power_spectrum(dist)
    upper = freqs >= 0.25
    return float(np.mean(np.abs(db_ref[upper] - db_dist[upper])))


# --------------------------------------------------------------------------- SSIMULACRA 2

SSIMULACRA2_MIN_SIDE = 8
"""SSIMULACRA 2's first scale needs 8x8 pixels (libjxl refuses smaller images too)."""


def _ssimulacra2_problem() -> str | None:
    if importlib.util.find_spec("ssimulacra2") is None:
        return "package 'ssimulacra2' is not installed (pip install ssimulacra2==0.3.0)"
    return None


def ssimulacra2(ref: np.ndarray, dist: np.ndarray) -> float:
    """SSIMULACRA 2 (higher is better, 100 = identical, can go negative).

    Computed by the PyPI ``ssimulacra2`` package (a numpy port of libjxl's
    ``tools/ssimulacra2.cc``): sRGB -> linear -> XYB, 6 scales of SSIM and edge-difference
    maps (1- and 4-norms) with libjxl's weights. Both images are written as lossless PNGs
    and scored with the package's ``compute_ssimulacra2`` (its public API), so nothing is
    re-implemented here. Scores agree with libjxl's within the tolerance the tests pin
    (tests/test_metrics.py: identical -> 100, monotonic in JPEG quality, the bands that
    libjxl's ``ssimulacra2`` help text gives for libjpeg-turbo qualities). Raises
    :class:`MetricUnavailable` without the package, ``ValueError`` under 8x8 px.
    """
    problem = _ssimulacra2_problem()
    if problem:
        raise MetricUnavailable(f"SSIMULACRA2 unavailable: {problem}")
    _check_pair(ref, dist)
    if min(ref.shape[:2]) < SSIMULACRA2_MIN_SIDE:
        raise ValueError(f"ssimulacra2 needs each side >= {SSIMULACRA2_MIN_SIDE} px, got {ref.shape[1]}x{ref.shape[0]}")
    from PIL import Image
    from ssimulacra2 import compute_ssimulacra2

    with tempfile.TemporaryDirectory(prefix="ulbc_ssimu2_") as tmp:
        a, b = os.path.join(tmp, "ref.png"), os.path.join(tmp, "dist.png")
        Image.fromarray(ref).save(a, compress_level=1)
        Image.fromarray(dist).save(b, compress_level=1)
        return float(compute_ssimulacra2(a, b))


# --------------------------------------------------------------------------- butteraugli

BUTTERAUGLI_EXE = "butteraugli_main"


def _butteraugli_problem() -> str | None:
    import shutil

    if shutil.which(BUTTERAUGLI_EXE) is None:
        return (f"'{BUTTERAUGLI_EXE}' (libjxl's tool) is not on PATH "
                "(Debian: apt-get install libjxl-devtools)")
    return None


@functools.lru_cache(maxsize=8)
def _butteraugli_cached(ref_png: bytes, dist_png: bytes) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="ulbc_butter_") as tmp:
        Path(tmp, "ref.png").write_bytes(ref_png)
        Path(tmp, "dist.png").write_bytes(dist_png)
        done = subprocess.run([BUTTERAUGLI_EXE, "ref.png", "dist.png", "--pnorm", "3"],
                              cwd=tmp, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{BUTTERAUGLI_EXE} failed ({done.returncode}): {done.stderr.strip()}")
    lines = done.stdout.strip().splitlines()
    try:
        peak = float(lines[0])
        norm = float(next(line for line in lines if line.startswith("3-norm:")).split(":")[1])
    except (IndexError, StopIteration, ValueError):
        raise RuntimeError(f"{BUTTERAUGLI_EXE} printed no score: {done.stdout.strip()!r}") from None
    return peak, norm


def butteraugli_scores(ref: np.ndarray, dist: np.ndarray) -> tuple[float, float]:
    """(max, 3-norm) butteraugli distances (lower is better, 0 = identical).

    libjxl's ``butteraugli_main REF DIST --pnorm 3`` (Debian package ``libjxl-devtools``,
    libjxl 0.7) on lossless PNGs of both images, read as nonlinear sRGB, default
    intensity target 80 nits. The first line it prints is the max-norm distance (1.0 is
    about the just-noticeable difference at 1:1 viewing), the second the 3-norm (the
    mean-like summary libjxl's benchmark_xl reports as ``pnorm``). One run serves both
    :func:`butteraugli` and :func:`butteraugli_max` (cached on the images' bytes).
    """
    problem = _butteraugli_problem()
    if problem:
        raise MetricUnavailable(f"butteraugli unavailable: {problem}")
    _check_pair(ref, dist)
    return _butteraugli_cached(_png_bytes(ref), _png_bytes(dist))


def _png_bytes(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def butteraugli(ref: np.ndarray, dist: np.ndarray) -> float:
    """Butteraugli 3-norm (libjxl ``butteraugli_main``; :func:`butteraugli_scores`)."""
    return butteraugli_scores(ref, dist)[1]


def butteraugli_max(ref: np.ndarray, dist: np.ndarray) -> float:
    """Butteraugli max-norm distance (libjxl ``butteraugli_main``; :func:`butteraugli_scores`)."""
    return butteraugli_scores(ref, dist)[0]


# --------------------------------------------------------------------------- block grid

BLOCK_PERIODS = (8, 16)


def grid_energy_ratio(img: np.ndarray, period: int) -> float:
    """Mean squared luma gradient across the lines of a ``period``-px grid over the mean
    squared gradient everywhere else, horizontal and vertical differences pooled.

    On BT.601 luma (:func:`luma_bt601`), the differences ``Y[:, j+1] - Y[:, j]`` (and the
    same down the rows) at ``(j + 1) % period == 0`` straddle a grid line (between pixel
    7 and 8, 15 and 16, ...: the block edges of a codec whose blocks start at 0). 1 for
    content without a grid; above 1 when the image has steps on that grid. A small
    epsilon keeps flat images finite.
    """
    _check_image(img, "img")
    y = luma_bt601(img)
    on = off = 0.0
    n_on = n_off = 0
    for d in (np.diff(y, axis=1), np.diff(y, axis=0).T):
        mask = (np.arange(d.shape[1]) + 1) % period == 0
        e = d * d
        on += float(e[:, mask].sum())
        off += float(e[:, ~mask].sum())
        n_on += e[:, mask].size
        n_off += e[:, ~mask].size
    if n_on == 0 or n_off == 0:
        raise ValueError(f"blockiness needs each side > {period} px, got {img.shape[1]}x{img.shape[0]}")
    return (on / n_on + 1e-6) / (off / n_off + 1e-6)


def blockiness(ref: np.ndarray, dist: np.ndarray) -> float:
    """How much block grid the decoder added, relative to the original (1 = none).

    Per column boundary j (and per row boundary), the decoded image's mean squared luma
    step (:func:`luma_bt601`) is divided by the original's, ``r_j = (E_dist(j) + 1) /
    (E_ref(j) + 1)`` (the +1, in 8-bit units squared, keeps flat lines finite): content
    cancels line by line, what is left is what the codec did there. For a grid period
    p in (8, 16), the mean of r over the grid lines (``(j + 1) % p == 0``, between pixel 7
    and 8, 15 and 16, ...) is divided by its mean over every other line, columns and rows
    pooled; the result is the larger of the two periods. 1.0: the codec treated grid
    lines like the rest (a blur lowers every r alike); 1.05: 5 % more gradient energy on
    the grid, relative to elsewhere, than the original has. A coarse JPEG is well above
    1. Lower is better (floor about 1). Needs each side > 16 px.

    Computed by :func:`ulbcodec.losses.grid_loss.grid_excess` (in float64), the one
    implementation, which stage II of the generative decoder also trains against.
    """
    import torch

    from ulbcodec.losses.grid_loss import grid_excess

    _check_pair(ref, dist)
    if min(ref.shape[:2]) <= max(BLOCK_PERIODS):
        raise ValueError(f"blockiness needs each side > {max(BLOCK_PERIODS)} px, got {ref.shape[1]}x{ref.shape[0]}")
    dist_t, ref_t = (torch.from_numpy(np.array(img, dtype=np.float64)).permute(2, 0, 1)[None] / 255
                     for img in (dist, ref))
    return 1.0 + float(grid_excess(dist_t, ref_t, BLOCK_PERIODS))


# --------------------------------------------------------------------------- colour drift


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65 white, 2 degree observer) of 8-bit sRGB, float64 HxWx3.

    sRGB's piecewise transfer curve (IEC 61966-2-1), its RGB -> XYZ matrix, the D65 white
    point (0.95047, 1, 1.08883) and the CIE 1976 L*a*b* formulas (the linear segment under
    (6/29)^3).
    """
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6.0 / 29.0) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                     200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e(ref: np.ndarray, dist: np.ndarray) -> float:
    """Mean CIE76 colour difference ΔE*ab over pixels (:func:`srgb_to_lab`); lower is
    better. Counts every local error, texture noise included; ~2.3 is a just-noticeable
    difference between flat patches (Sharma, *Digital Color Imaging Handbook*)."""
    _check_pair(ref, dist)
    return float(np.mean(np.linalg.norm(srgb_to_lab(ref) - srgb_to_lab(dist), axis=-1)))


COLOR_BLOCK = 16


def color_shift(ref: np.ndarray, dist: np.ndarray) -> float:
    """Colour drift: mean ΔE*ab between the CIELAB means of co-located 16x16 px blocks.

    Averaging each block first removes texture and noise (which average out) and keeps
    what a viewer sees as a false hue: a blotch or a global tint. Partial blocks at the
    right/bottom edges are dropped (whole image if under 16 px). Lower is better; about
    2.3 is noticeable on flat areas, and this is the threshold the benchmarks use.
    """
    _check_pair(ref, dist)
    b = COLOR_BLOCK if min(ref.shape[:2]) >= COLOR_BLOCK else min(ref.shape[:2])

    def block_means(img):
        lab = srgb_to_lab(img)
        h, w = (lab.shape[0] // b) * b, (lab.shape[1] // b) * b
        return lab[:h, :w].reshape(h // b, b, w // b, b, 3).mean(axis=(1, 3))

    return float(np.mean(np.linalg.norm(block_means(ref) - block_means(dist), axis=-1)))


def lab_mean_shift(ref: np.ndarray, dist: np.ndarray) -> tuple[float, float, float]:
    """Per-channel mean shift (ΔL*, Δa*, Δb*) of the whole image, dist minus ref: +a* is
    towards red/magenta, -a* green, +b* yellow/orange, -b* blue."""
    _check_pair(ref, dist)
    d = srgb_to_lab(dist).mean(axis=(0, 1)) - srgb_to_lab(ref).mean(axis=(0, 1))
    return float(d[0]), float(d[1]), float(d[2])


# --------------------------------------------------------------------------- availability

# What lpips / DISTS need locally: the package, torchvision, and torchvision's ImageNet
# backbone checkpoint in the torch hub cache (lpips additionally ships its own small
# linear-layer weights inside the package).
_LEARNED_METRICS = {
    "lpips": ("lpips", "alexnet-owt-7be5be79.pth", "weights/v0.1/alex.pth"),
    "dists": ("DISTS_pytorch", "vgg16-397923af.pth", None),
}


def _learned_metric_problem(package: str, backbone_file: str, packaged_file: str | None) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        return f"package '{package}' is not installed"
    if importlib.util.find_spec("torchvision") is None:
        return f"'{package}' needs torchvision, which is not installed"
    if packaged_file is not None:
        roots = [Path(p) for p in spec.submodule_search_locations or []]
        if not any((root / packaged_file).is_file() for root in roots):
            return f"'{package}' is installed without its {packaged_file}"
    import torch.hub

    if not (Path(torch.hub.get_dir()) / "checkpoints" / backbone_file).is_file():
        return f"backbone weights {backbone_file} are not in the torch hub cache and cannot be downloaded here"
    return None


class MetricUnavailable(RuntimeError):
    """A metric whose package or weights are not on this machine; the message says which."""


@functools.lru_cache(maxsize=1)
def _lpips_model():
    import lpips as lpips_package  # the user's installed package, with its own weights

    return lpips_package.LPIPS(net="alex", verbose=False).eval()


def lpips(ref: np.ndarray, dist: np.ndarray) -> float:
    """LPIPS v0.1 (AlexNet), the reference implementation of the ``lpips`` package, on RGB
    scaled to [-1, 1]; lower is better. Needs the package, torchvision and the AlexNet
    checkpoint in the torch hub cache (nothing is downloaded): otherwise raises
    :class:`MetricUnavailable` with the missing piece."""
    problem = _learned_metric_problem(*_LEARNED_METRICS["lpips"])
    if problem:
        raise MetricUnavailable(f"LPIPS unavailable: {problem}")
    _check_pair(ref, dist)
    import torch

    def to(a):
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 127.5 - 1

    with torch.no_grad():
        return float(_lpips_model()(to(ref), to(dist)).reshape(-1)[0])


def available_metrics() -> dict[str, str]:
    """Which metrics can run here: ``{name: "available..." | "unavailable: <reason>"}``.

    PSNR, PSNR-Y, MS-SSIM (if pytorch_msssim imports), VMAF and VMAF NEG (if the bundled
    ffmpeg has libvmaf), SSIMULACRA2 (if the ``ssimulacra2`` package is installed),
    butteraugli (if libjxl's ``butteraugli_main`` is on PATH), the log-spectrum error,
    blockiness and the colour-drift measures are implemented in this module. LPIPS and DISTS
    need ImageNet backbone weights that we cannot download: they are reported with the
    first missing piece (package, torchvision, packaged weights, or the backbone
    checkpoint in the torch hub cache). LPIPS is wrapped (:func:`lpips`); DISTS is not
    yet, so with everything present its entry only says that it could be.
    """
    status = {"psnr": "available", "psnr_y": "available", "log_spectrum_error": "available"}
    status["ms_ssim"] = (
        "available" if importlib.util.find_spec("pytorch_msssim") else "unavailable: pytorch_msssim is not installed"
    )
    problem = _libvmaf_problem()
    status["vmaf"] = status["vmaf_neg"] = "available" if problem is None else f"unavailable: {problem}"
    problem = _ssimulacra2_problem()
    status["ssimulacra2"] = "available" if problem is None else f"unavailable: {problem}"
    problem = _butteraugli_problem()
    status["butteraugli"] = status["butteraugli_max"] = "available" if problem is None else f"unavailable: {problem}"
    for name in ("blockiness", "delta_e", "color_shift"):
        status[name] = "available"
    for name, requirements in _LEARNED_METRICS.items():
        problem = _learned_metric_problem(*requirements)
        status[name] = (
            f"unavailable: {problem}"
            if problem
            else "available" if name == "lpips"
            else "available: package and weights present (not yet wrapped in ulbcodec.metrics)"
        )
    return status
