"""Tests of ulbcodec.baselines: honest byte accounting, exact output size, tiny images."""

import io
import math

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from ulbcodec import baselines
from ulbcodec.baselines import CODECS, DOWNSCALES, Baseline
from ulbcodec.metrics import psnr


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth synthetic RGB image: random low-frequency cosines plus mild texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for _ in range(6):
        fy, fx, phase = rng.uniform(0, 4), rng.uniform(0, 4), rng.uniform(0, 2 * np.pi)
        img += rng.uniform(-40, 40, 3) * np.cos(2 * np.pi * (fy * y + fx * x) + phase)[..., None]
    img += rng.normal(0, 3, img.shape)
    return np.clip(128 + img, 0, 255).round().astype(np.uint8)


LOWEST_QUALITY = {codec: grid[0] for codec, grid in baselines.QUALITIES.items()}
CONTAINER = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("downscale", DOWNSCALES)
@pytest.mark.parametrize("shape", [(48, 64), (17, 33), (33, 17)])
def test_stream_accounting_and_exact_output_size(codec, downscale, shape):
    img = smooth_image(*shape)
    variant = Baseline(codec, downscale)
    stream, decoded = variant(img, LOWEST_QUALITY[codec])

    assert decoded.shape == img.shape and decoded.dtype == np.uint8
    assert baselines.bpp(stream, img.shape) == len(stream) * 8 / (shape[0] * shape[1])

    # The stream is the codec's file, preceded at f > 1 by the charged 4-byte W, H header.
    header = baselines.SIZE_HEADER.size if downscale > 1 else 0
    if downscale > 1:
        assert baselines.SIZE_HEADER.unpack(stream[:header]) == (shape[1], shape[0])
    if codec == "jxl":  # a bare JPEG XL codestream; Pillow cannot read it, ffmpeg can
        assert stream[header : header + 2] == b"\xff\x0a"
        coded = baselines._jxl_decode(stream[header:])
    else:
        coded = Image.open(io.BytesIO(stream[header:]))
        assert coded.format == CONTAINER[codec]
    assert coded.size == (math.ceil(shape[1] / downscale), math.ceil(shape[0] / downscale))


def test_variant_names_and_convenience_functions():
    assert Baseline("avif", 4).name == "avif@1/4"
    img = smooth_image(24, 40)
    for fn, codec in [(baselines.jpeg, "jpeg"), (baselines.webp, "webp"), (baselines.avif, "avif"),
                      (baselines.jxl, "jxl")]:
        stream, decoded = fn(img, 50, downscale=2)
        assert stream == Baseline(codec, 2).encode(img, 50)
        assert np.array_equal(decoded, Baseline(codec, 2).decode(stream))


def test_jpeg_uses_420_subsampling():
    stream = Baseline("jpeg").encode(smooth_image(32, 32), 50)
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(stream))) == 2  # 4:2:0


@pytest.mark.parametrize("codec", CODECS)
def test_quality_controls_fidelity(codec):
    img = smooth_image(64, 96, seed=1)
    low = psnr(img, Baseline(codec)(img, LOWEST_QUALITY[codec])[1])
    high = psnr(img, Baseline(codec)(img, 90)[1])
    assert high > 30 and high > low


def test_jxl_distance_follows_cjxl():
    assert baselines.jxl_distance(100) == pytest.approx(0.1)
    assert baselines.jxl_distance(30) == pytest.approx(6.4)
    assert baselines.jxl_distance(0) == 15.0  # capped at ffmpeg's maximum
    grid = baselines.QUALITIES["jxl"]
    assert all(baselines.jxl_distance(a) > baselines.jxl_distance(b) for a, b in zip(grid, grid[1:]))


def test_invalid_arguments():
    img = smooth_image(16, 16)
    with pytest.raises(ValueError, match="codec"):
        Baseline("bpg")
    with pytest.raises(ValueError, match="downscale"):
        Baseline("jpeg", 3)
    with pytest.raises(ValueError, match="quality"):
        Baseline("jpeg").encode(img, 0)
    with pytest.raises(ValueError, match="quality"):
        Baseline("webp").encode(img, 101)
    with pytest.raises(ValueError, match="uint8"):
        Baseline("webp").encode(img.astype(np.float32), 50)


def test_sweep_covers_grid_and_stops_above_max_bpp():
    img = smooth_image(48, 64, seed=2)
    points = list(baselines.sweep("webp", img, downscales=(1, 4), qualities=(60, 0, 20)))
    assert [(p.variant, p.quality) for p in points] == [
        (f"webp@1/{f}", q) for f in (1, 4) for q in (0, 20, 60)
    ]
    for p in points:
        assert p.bpp == len(p.stream) * 8 / (48 * 64) and p.decoded.shape == img.shape

    capped = list(baselines.sweep("jpeg", img, downscales=(1,), max_bpp=1.0))
    assert capped[0].quality == 1
    assert all(p.bpp <= 1.0 for p in capped[:-1]) and capped[-1].bpp > 1.0
    assert len(capped) < len(baselines.QUALITIES["jpeg"])
