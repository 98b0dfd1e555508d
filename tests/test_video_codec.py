"""The video codec with tiny random models: the decoder reproduces what the encoder accepted."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from ulbcodec.bitstream import BitstreamError, Chunk, Container, GopStructure, Round
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import make_tiny_video_package


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return VideoCodec.from_pretrained(str(make_tiny_video_package(tmp_path_factory.mktemp("video"))))


def clip(frames: int, h: int = 48, w: int = 72) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    out = [np.stack([128 + 90 * np.sin((x + 2 * t) / 7), 128 + 90 * np.cos((y + t) / 5),
                     np.full_like(x, 100.0)], -1) for t in range(frames)]
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(codec, frames, **kw):
    seen = []
    data, gops = codec.encode(iter(frames), Fraction(25), VideoSettings(**kw), reconstruction=seen.append)
    return data, gops, seen


def test_decoder_reproduces_the_encoders_frames(codec):
    frames = clip(9)
    data, gops, seen = encode(codec, frames, threshold=10.0, max_gop=4, seed=7)
    decoded = list(codec.decode(data))
    assert len(decoded) == len(seen) == 9 and gops.frames == 9
    assert all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    assert all(np.array_equal(a, b) for a, b in zip(decoded, codec.decode(data)))  # twice: the same


def test_threshold_zero_makes_every_frame_a_keyframe(codec):
    _, gops, _ = encode(codec, clip(5), threshold=0.0)
    assert gops.frame_types() == "KKKKK"


def test_huge_threshold_keeps_only_the_first_keyframes(codec):
    _, gops, _ = encode(codec, clip(8), threshold=10.0, max_gop=100)
    assert gops.frame_types() == "KK" + "ppp" + "ppp"


def test_odd_frame_counts(codec):
    for n in (1, 2, 3):
        data, gops, seen = encode(codec, clip(n, 17, 23), threshold=10.0)
        assert gops.frames == n and len(list(codec.decode(data))) == n


def test_noise_depends_only_on_seed_and_frame_index(codec):
    frames = clip(6)
    a = encode(codec, frames, threshold=10.0, seed=1)[2]
    b = encode(codec, frames, threshold=10.0, seed=1)[2]
    c = encode(codec, frames, threshold=10.0, seed=2)[2]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a[2:], c[2:]))


def test_inconsistent_gop_chunk_is_refused(codec):
    data, _, _ = encode(codec, clip(5), threshold=10.0)
    container = Container.from_bytes(data)
    bad = GopStructure([(2, [Round(3)]), (1, [])])  # one frame too many
    container.chunks[0] = Chunk(b"GOPS", bad.to_bytes())
    with pytest.raises(BitstreamError, match="more than the 5 frames|describes 6"):
        list(codec.decode(container.to_bytes()))


def test_image_model_is_not_a_video_model(model_dir):
    from ulbcodec.packages import ModelError

    with pytest.raises(ModelError, match="not a video model"):
        VideoCodec.from_pretrained(str(model_dir / "tinygen"))


def test_anchored_rounds_round_trip(codec, monkeypatch):
    """When plain predictions fail the threshold and anchor-guided ones pass, rounds are
    anchored (frame type A, one ANCH chunk each) and the decoder reproduces every frame.
    The distance is stubbed so that exactly that happens with random tiny models."""
    import ulbcodec.video as video

    plain_ids, produced, predict = set(), [], VideoCodec._predict

    def tagged_predict(self, history, seed, first, steps, guide=None, guide_timestep=0):
        for frame in predict(self, history, seed, first, steps, guide, guide_timestep):
            produced.append(frame)  # kept alive, so that no later frame reuses its id
            if guide is None:
                plain_ids.add(id(frame))
            yield frame

    monkeypatch.setattr(VideoCodec, "_predict", tagged_predict)
    monkeypatch.setattr(video, "frame_distance", lambda ref, dist, metric: 1.0 if id(dist) in plain_ids else 0.0)
    frames = clip(9)
    data, gops, seen = encode(codec, frames, threshold=0.5, max_gop=4, seed=7, anchored=True)
    assert gops.frame_types() == "KK" + "App" + "A" + "KK" + "A"  # max_gop 4: keyframes after APP A
    header = Container.from_bytes(data).header
    assert header.params["anchor_level"] == codec.image.rate_levels[0] and header.params["guide_timestep"] == 600
    assert len(Container.from_bytes(data).find(b"ANCH")) == gops.keyframes + gops.anchored_rounds == 7
    monkeypatch.undo()
    decoded = list(codec.decode(data))
    assert len(decoded) == 9 and all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    # Without --anchored the same distances leave keyframes only.
    monkeypatch.setattr(VideoCodec, "_predict", tagged_predict)
    monkeypatch.setattr(video, "frame_distance", lambda ref, dist, metric: 1.0 if id(dist) in plain_ids else 0.0)
    assert encode(codec, frames, threshold=0.5, max_gop=4, seed=7)[1].frame_types() == "K" * 9


def test_sampler_steps_are_the_files(codec):
    frames = clip(7)
    one, gops, seen = encode(codec, frames, threshold=10.0, steps=1)
    assert Container.from_bytes(one).header.params["steps"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(seen, codec.decode(one)))
    with pytest.raises(ValueError, match="steps"):
        encode(codec, frames, steps=0)


def test_decoder_thread_count_does_not_matter(codec):
    import torch

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        data, _, seen = encode(codec, clip(7), threshold=10.0, seed=5)
        torch.set_num_threads(2)
        assert all(np.array_equal(a, b) for a, b in zip(seen, codec.decode(data)))
    finally:
        torch.set_num_threads(previous)


def test_info_describes_a_bad_gop_chunk_without_failing(codec):
    from ulbcodec.bitstream import describe

    data, _, _ = encode(codec, clip(5), threshold=10.0)
    container = Container.from_bytes(data)
    container.chunks[0] = Chunk(b"GOPS", GopStructure([(2, [Round(3)]), (1, [])]).to_bytes())
    desc = describe(Container.from_bytes(container.to_bytes()))
    assert "describes" in desc["gop"]["error"] or "more than" in desc["gop"]["error"]


def test_shipped_video_model_conformance_pins():
    """Bitstream and decoded-frame digests of models/video on a fixed pan, with its default
    settings and with P frames coded by its P-frame codec (scripts/pin_default_model.py
    records them): any change to video coding shows here."""
    import hashlib
    import json

    from PIL import Image

    from conftest import DATA, SAMPLE, assert_pixels_pinned

    codec = VideoCodec.from_pretrained("video")
    pins = json.loads((DATA / "default_model_pins.json").read_text()).get(codec.package.digest[:16])
    assert pins is not None, f"no pins recorded for video model {codec.package.digest[:16]}"
    photo = np.asarray(Image.open(SAMPLE).convert("RGB"))
    frames = [np.ascontiguousarray(photo[:128, 2 * t : 2 * t + 192]) for t in range(8)]
    data, gops = codec.encode(iter(frames), Fraction(25), VideoSettings(threshold=0.5, rate_level=2))
    decoded = np.stack(list(codec.decode(data)))
    assert gops.frame_types() == pins["frame_types"] and len(data) == pins["bytes"]
    assert hashlib.sha256(data).hexdigest()[:16] == pins["bitstream"]
    assert_pixels_pinned(decoded, pins["pixels"], "video.png", "video")

    # P frames coded by the package's P-frame codec (no motion field, no predictor)
    pinned, log = pins["pframes"], []
    pan = [np.ascontiguousarray(photo[:128, t : t + 192]) for t in range(6)]  # as scripts/pin_default_model.py
    data, gops = codec.encode(iter(pan), Fraction(25), VideoSettings(rate_level=5, predictor=False, motion=False),
                              frame_log=log.append)
    assert gops.frame_types() == pinned["frame_types"] and [r.parts for r in log] == pinned["parts"]
    assert any("residual" in parts for parts in pinned["parts"]) and len(data) == pinned["bytes"]
    assert hashlib.sha256(data).hexdigest()[:16] == pinned["bitstream"]
    assert_pixels_pinned(np.stack(list(codec.decode(data))), pinned["pixels"], "video-pframes.png", "video")


def test_smaller_keyframe_groups_after_the_first(codec):
    frames = clip(7)
    _, gops, _ = encode(codec, frames, threshold=0.0, keyframe_group=1)
    assert gops.segments[0][0] == 2 and all(k == 1 for k, _ in gops.segments[1:]) and gops.frames == 7
    data, gops, seen = encode(codec, frames, threshold=10.0, max_gop=2, keyframe_group=1)
    assert gops.frame_types() == "KK" + "pp" + "K" + "pp"
    assert all(np.array_equal(a, b) for a, b in zip(seen, codec.decode(data)))
    with pytest.raises(ValueError, match="keyframe group"):
        encode(codec, frames, keyframe_group=3)
