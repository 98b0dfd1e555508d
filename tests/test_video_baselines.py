"""Classical video baselines: elementary-stream accounting, SEI excluded, same colour path."""

from __future__ import annotations

import numpy as np
import pytest

from ulbcodec import video_baselines as vb
from ulbcodec.metrics import psnr


def moving_clip(frames: int = 8, side: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    clip = []
    for t in range(frames):
        r = 128 + 100 * np.sin((x + 2 * t) / 9.0)
        g = 128 + 100 * np.cos((y - t) / 7.0)
        b = 128 + 60 * np.sin((x + y + 3 * t) / 11.0)
        clip.append(np.stack([r, g, b], -1))
    return np.clip(np.array(clip), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("codec", vb.CODECS)
def test_each_codec_round_trips_and_is_charged_its_elementary_stream(codec):
    clip = moving_clip()
    result = vb.encode_decode(clip, codec, vb.QUALITIES[codec][-1])
    assert result.decoded.shape == clip.shape and result.decoded.dtype == np.uint8
    assert 0 <= result.sei_bytes < result.stream_bytes
    assert result.bpp(clip.shape) == (result.stream_bytes - result.sei_bytes) * 8 / clip[..., 0].size
    assert result.mp4_bytes > result.charged_bytes  # the container is reported, not charged
    assert psnr(clip.reshape(-1, 64, 3), result.decoded.reshape(-1, 64, 3)) > 25


def test_x264_settings_sei_is_found_and_not_charged():
    result = vb.encode_decode(moving_clip(), "x264", 51)
    assert result.sei_bytes > 300  # x264 writes its settings into a user-data SEI


def test_lower_quality_setting_gives_fewer_bits():
    clip = moving_clip()
    low, high = (vb.encode_decode(clip, "x265", q).charged_bytes for q in (51, 33))
    assert low < high


def test_sei_parser_on_a_hand_made_annex_b_stream():
    sps, sei, slice_ = b"\x67\x42\x00\x0a", b"\x06\x05\x10" + b"x" * 16, b"\x65\x88\x84"
    stream = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x01" + sei + b"\x00\x00\x00\x01" + slice_
    assert vb.sei_bytes(stream, "x264") == len(sei) + 3


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="even"):
        vb.encode_decode(moving_clip()[:, :63], "x264", 40)
    with pytest.raises(ValueError, match="unknown"):
        vb.encoder_args("mpeg2", 10, 8, 25)
