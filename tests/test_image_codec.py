"""Image pipeline round trips, determinism, rate control and model checks (tiny model)."""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import numpy as np
import pytest
import torch

from ulbcodec import bitstream as bs
from ulbcodec.image import DecodeError, ImageCodec
from ulbcodec.tiling import tiled_apply

from conftest import DATA, assert_pixels_pinned, make_tiny_package


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (33, 17), (64, 64), (65, 129)])
def test_round_trip_odd_sizes(tiny_codec, photo, shape):
    h, w = shape
    rgb = np.ascontiguousarray(photo[:h, :w])
    result = tiny_codec.encode(rgb, 1)
    out = tiny_codec.decode(result.data)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    header = bs.Container.from_bytes(result.data).header
    assert (header.width, header.height, header.rate_level) == (w, h, 1)
    assert result.bpp == len(result.data) * 8 / (w * h)


def test_bytes_grow_with_rate_level(tiny_codec, photo):
    sizes = [len(tiny_codec.encode(photo, level).data) for level in tiny_codec.rate_levels]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_encode_to_bpp_lands_at_or_under_target(tiny_codec, photo):
    by_level = {lv: tiny_codec.encode(photo, lv).bpp for lv in tiny_codec.rate_levels}
    target = (by_level[0] + by_level[1]) / 2
    result, met = tiny_codec.encode_to_bpp(photo, target)
    assert met and 0 < result.rate_level < 1 and result.bpp <= target  # continuous: between levels 0 and 1
    result, met = tiny_codec.encode_to_bpp(photo, by_level[2] * 2)
    assert met and result.rate_level == 2
    result, met = tiny_codec.encode_to_bpp(photo, 1e-6)  # below anything: the smallest file, flagged
    assert not met and (result.rate_level, result.downscale) == (0, 4)


@pytest.mark.parametrize("fraction", [0.1, 0.45, 0.8])
def test_encode_to_bpp_lands_within_3_percent_under_any_target(tiny_codec, photo, fraction):
    assert tiny_codec.continuous_levels
    low, high = tiny_codec.encode(photo, 0).bpp, tiny_codec.encode(photo, tiny_codec.rate_levels[-1]).bpp
    target = low * (high / low) ** fraction
    result, met = tiny_codec.encode_to_bpp(photo, target, downscales=(1,))
    assert met and 0.97 * target <= result.bpp <= target, (target, result.bpp, result.rate_level)
    header = bs.Container.from_bytes(result.data).header
    assert header.operating_level == result.rate_level and header.rate_level == int(result.rate_level)
    if result.rate_level != int(result.rate_level):
        assert header.params["level_milli"] == round(result.rate_level * 1000)
    again = tiny_codec.encode(photo, float(result.rate_level))
    assert again.data == result.data
    assert np.array_equal(tiny_codec.decode(result.data), tiny_codec.decode(again.data))


def test_fractional_level_header_and_older_decoders(tiny_codec, photo, monkeypatch):
    rgb = np.ascontiguousarray(photo[:64, :96])
    result = tiny_codec.encode(rgb, 1.25)
    header = bs.Container.from_bytes(result.data).header
    assert (header.rate_level, header.params, header.operating_level) == (1, {"level_milli": 1250}, 1.25)
    between = tiny_codec.decode(result.data)
    assert between.shape == rgb.shape
    # the gains in between: the decode differs from both neighbours' decodes of the same latent
    whole = tiny_codec.encode(rgb, 1)
    assert len(whole.data) <= len(result.data) <= len(tiny_codec.encode(rgb, 2).data)
    # whole levels write no new parameter: files stay readable by older ulbc
    assert bs.Container.from_bytes(whole.data).header.params == {}
    with pytest.raises(ValueError, match="outside the range"):
        tiny_codec.encode(rgb, tiny_codec.rate_levels[-1] + 0.5)
    with pytest.raises(bs.BitstreamError, match="does not lie in"):
        bs.Header(bs.MEDIA_IMAGE, 8, 8, header.model_digest, 2, params={"level_milli": 1250}).validate()
    # an older ulbc, which does not know parameter id 3, refuses the file in one line
    monkeypatch.delitem(bs.PARAM_NAMES, bs.PARAM_IDS["level_milli"])
    with pytest.raises(bs.BitstreamError, match="unknown codec parameter id 3"):
        bs.Container.from_bytes(result.data)


def test_deterministic_across_runs_and_thread_counts(tiny_codec, photo):
    previous = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            data = tiny_codec.encode(photo, 2).data
            outputs.append((data, tiny_codec.decode(data).tobytes()))
    finally:
        torch.set_num_threads(previous)
    assert outputs[0] == outputs[1] == outputs[2]


def test_model_digest_mismatch_refused(tiny_model, tmp_path, photo):
    other = ImageCodec.from_pretrained(str(make_tiny_package(tmp_path, "other", seed=1)))
    data = other.encode(photo[:64, :64].copy(), 0).data
    codec = ImageCodec.from_pretrained(str(tiny_model))
    with pytest.raises(DecodeError, match="encoded with model"):
        codec.decode(data)


def test_desync_detected_by_symbol_check(tiny_codec, photo):
    data = tiny_codec.encode(photo[:128, :128].copy(), 2).data
    container = bs.Container.from_bytes(data)
    payload = bs.AnchorPayload.from_bytes(container.chunks[0].payload)
    payload.symbols_check ^= 1  # as if the decoder's entropy parameters drifted
    container.chunks[0] = bs.Chunk(bs.CHUNK_ANCHOR, payload.to_bytes())
    with pytest.raises(DecodeError, match="desynchronised"):
        tiny_codec.decode(container.to_bytes())


def test_large_image_tiled_round_trip(tiny_codec):
    rng = np.random.default_rng(0)
    # smooth random field: a 4000x3000 image that is cheap to build
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    rgb = np.kron(small, np.ones((100, 100, 1), dtype=np.uint8))
    result = tiny_codec.encode(rgb, 0)
    out = tiny_codec.decode(result.data)
    assert out.shape == (3000, 4000, 3)


def test_tiling_matches_untiled_away_from_seams():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3, padding=1))
    x = torch.rand(1, 3, 200, 300)
    with torch.no_grad():
        whole = conv(x)
        tiled = tiled_apply(conv, x, Fraction(1), core=64, margin=8, workers=2)
    # receptive field radius 2 < margin: identical up to float rounding
    assert torch.allclose(whole, tiled, atol=1e-6)


def test_tiling_rejects_misaligned_tiles():
    with pytest.raises(ValueError, match="whole number"):
        tiled_apply(lambda t: t, torch.zeros(1, 1, 64, 64), Fraction(1, 16), core=40, margin=0)


def test_pinned_digests_of_the_shipped_default_model(photo):
    """CompressAI-style conformance pin: any change to coding or synthesis shows up here.

    If you change the default model or the coding path on purpose, update the digests and
    say so in the commit message."""
    from ulbcodec.packages import ModelError

    try:
        codec = ImageCodec.from_pretrained("default")
    except ModelError:
        pytest.skip("no default model package in models/")
    rgb = np.ascontiguousarray(photo[:128, :192])
    data = codec.encode(rgb, 2).data
    pixels = codec.decode(data)
    pins = json.loads((DATA / "default_model_pins.json").read_text()).get(codec.package.digest[:16])
    assert pins is not None, f"no pins recorded for default model {codec.package.digest[:16]}"
    assert hashlib.sha256(data).hexdigest()[:16] == pins["bitstream"]
    assert_pixels_pinned(pixels, pins["pixels"], "default.png", "anchor")


def test_pinned_digests_of_the_shipped_generative_model(photo):
    """The same pin for models/generative (scripts/pin_default_model.py records it): the
    file, its generative decode and its anchor-only decode. The package carries its own
    anchor codec (trained with the perceptual terms, docs/training.md), not models/default's."""
    from ulbcodec.packages import ModelError

    try:
        codec = ImageCodec.from_pretrained("generative")
    except ModelError:
        pytest.skip("no generative model package in models/")
    rgb = np.ascontiguousarray(photo[:128, :192])
    data = codec.encode(rgb, 2).data
    pins = json.loads((DATA / "default_model_pins.json").read_text()).get(codec.package.digest[:16])
    assert pins is not None, f"no pins recorded for generative model {codec.package.digest[:16]}"
    assert len(data) == pins["bytes"] and hashlib.sha256(data).hexdigest()[:16] == pins["bitstream"]
    anchor = codec.decode(data, anchor_only=True)
    assert_pixels_pinned(anchor, pins["anchor_pixels"], "generative-anchor.png", "anchor")
    assert_pixels_pinned(codec.decode(data), pins["pixels"], "generative.png", "generative")


@pytest.mark.parametrize("downscale", [2, 4])
def test_downscale_mode_round_trip(tiny_codec, photo, downscale):
    rgb = np.ascontiguousarray(photo[:150, :201])
    result = tiny_codec.encode(rgb, 1, downscale=downscale)
    header = bs.Container.from_bytes(result.data).header
    assert header.params == {"downscale": downscale} and (header.width, header.height) == (201, 150)
    assert tiny_codec.decode(result.data).shape == rgb.shape
    assert len(result.data) < len(tiny_codec.encode(rgb, 1).data)


def test_encode_to_bpp_falls_back_to_downscale(tiny_codec, photo):
    full_lowest = tiny_codec.encode(photo, 0).bpp
    result, met = tiny_codec.encode_to_bpp(photo, full_lowest * 0.9)
    assert met and result.downscale > 1 and result.bpp <= full_lowest * 0.9


def test_tile_workers_do_not_change_results():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    x = torch.rand(1, 3, 300, 400)
    with torch.no_grad():
        one = tiled_apply(conv, x, Fraction(1), core=64, margin=8, workers=1)
        two = tiled_apply(conv, x, Fraction(1), core=64, margin=8, workers=2)
    assert torch.equal(one, two)
    # the pool's threads run under the caller's grad mode (no autograd graph under no_grad)
    seen = []

    def record(t):
        seen.append(torch.is_grad_enabled())
        return conv(t)

    with torch.no_grad():
        assert not tiled_apply(record, x, Fraction(1), core=64, margin=8, workers=2).requires_grad
    assert len(seen) > 2 and not any(seen)
    assert tiled_apply(record, x, Fraction(1), core=64, margin=8, workers=2).requires_grad


def test_anchor_is_padded_to_the_format_minimum_and_a_short_one_refused(tiny_codec, monkeypatch):
    """The format asks for one anchor byte per MAX_CODED_PIXELS_PER_ANCHOR_BYTE coded pixels
    (docs/bitstream.md): the encoder pads y with zeros, which decode to the same pixels;
    the decoder refuses a shorter anchor before entropy decoding."""
    img = np.full((64, 64, 3), 90, np.uint8)
    plain = tiny_codec.encode(img, 0).data
    plain_pixels = tiny_codec.decode(plain)
    monkeypatch.setattr(bs.AnchorPayload, "pixels_per_byte", 4)  # 1024 bytes for 64x64: forces padding
    padded = tiny_codec.encode(img, 0).data
    payload = bs.AnchorPayload.from_bytes(bs.Container.from_bytes(padded).find(bs.CHUNK_ANCHOR)[0].payload)
    assert len(payload.z_string) + len(payload.y_string) == 1024 > len(plain)
    assert np.array_equal(tiny_codec.decode(padded), plain_pixels)
    short = bs.AnchorPayload(payload.z_shape, payload.z_string, payload.y_string[:-1], payload.symbols_check)
    monkeypatch.setattr(tiny_codec.model, "decode_latent", lambda *a: pytest.fail("entropy decoding started"))
    with pytest.raises(bs.BitstreamError, match="anchor strings of 1023 bytes cannot describe a 64x64 coded image"):
        tiny_codec.decode_anchor(short, 64, 64, 0)
