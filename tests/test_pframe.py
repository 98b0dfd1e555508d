"""The conditional P-frame codec and the video files that use it (tiny random models)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import re

from ulbcodec.bitstream import (CHUNK_PFRAME, BitstreamError, Chunk, Container, GopStructure, PFrame, PFramePayload,
                                InterFrameParts, Round, inter_frame_bytes, write_uvarint)
from ulbcodec.image import DecodeError
from ulbcodec.models.pframe_codec import PFrameCodec
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import make_tiny_video_package
from test_video_codec import clip


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return str(make_tiny_video_package(tmp_path_factory.mktemp("pvideo"), pframe=True))


@pytest.fixture(scope="module")
def codec(package):
    return VideoCodec.from_pretrained(package)


@pytest.fixture(scope="module")
def trained_like():
    """A tiny P-frame codec whose synthesis is not the identity (random last layer)."""
    torch.manual_seed(3)
    model = PFrameCodec(N=8, M=16, context_widths=[8, 8, 8], num_rate_levels=2)
    torch.nn.init.normal_(model.g_s.out[-1].weight, std=0.05)
    model.update(force=True)
    return model.eval()


def force_residual(monkeypatch):
    """Every inter frame coded by the P-frame codec on the previous frame (no motion, no
    repeat): the tests of that codec's path, whatever a random model would choose."""
    def best(self, target, previous, forecast, level, motion=True, keyframe=None):
        payload, decoded, _ = self._code_pframe(target, previous, level)
        part = inter_frame_bytes(InterFrameParts(None, None, payload))
        return self._rd_cost(8 * len(part), decoded, target, level), PFrame(), part, decoded

    monkeypatch.setattr(VideoCodec, "_best_pframe", best)


@pytest.fixture
def residual_only(monkeypatch):
    force_residual(monkeypatch)


def encode(codec, frames, **kw):
    """Random tiny models code P frames as large as keyframes: no scene cuts unless asked."""
    kw.setdefault("scene_cuts", False)
    seen, log = [], []
    data, gops = codec.encode(iter(frames), Fraction(25), VideoSettings(**kw), reconstruction=seen.append,
                              frame_log=log.append)
    return data, gops, seen, log


def frames_tensor(seed: int, shape=(1, 3, 64, 128)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(shape, generator=g) * 255) / 255


# ---------------------------------------------------------------------- the model


def test_compress_decompress_round_trip(trained_like):
    x, ref = frames_tensor(0), frames_tensor(1)
    coded = trained_like.compress(x, ref, 1)
    out = trained_like.decompress(coded["strings"], coded["shape"], ref, 1)
    assert out["symbols_crc32"] == coded["symbols_crc32"]
    assert torch.equal(out["x_hat"], coded["x_hat"])
    assert not torch.equal(out["x_hat"], ref)  # the synthesis adds something to the reference


def assert_thread_count_invariant(codec, x, ref) -> None:
    """A P-frame codec's bitstream of ``x`` given ``ref`` is the same on one and two threads."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = codec.compress(x, ref, 0)
        torch.set_num_threads(2)
        two = codec.compress(x, ref, 0)
    finally:
        torch.set_num_threads(previous)
    assert one["strings"] == two["strings"] and one["symbols_crc32"] == two["symbols_crc32"]


def test_entropy_path_is_thread_count_invariant(trained_like):
    assert_thread_count_invariant(trained_like, frames_tensor(2), frames_tensor(3))


def test_forward_matches_the_coded_reconstruction(trained_like):
    x, ref = frames_tensor(4), frames_tensor(5)
    with torch.no_grad():
        forward = trained_like(x, ref, 1)["x_hat"]
    assert torch.allclose(forward, trained_like.compress(x, ref, 1)["x_hat"], atol=1e-4)


def test_bad_shapes_and_levels_are_refused(trained_like):
    with pytest.raises(ValueError, match="multiples of 64"):
        trained_like.compress(torch.zeros(1, 3, 60, 64), torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="rate_level"):
        trained_like.compress(frames_tensor(0), frames_tensor(1), 5)
    coded = trained_like.compress(frames_tensor(0), frames_tensor(1), 0)
    with pytest.raises(ValueError, match="does not match"):
        trained_like.decompress(coded["strings"], (2, 2), frames_tensor(1), 0)


def test_config_round_trips_through_a_state_dict(trained_like):
    copy = PFrameCodec.from_config(trained_like.config)
    copy.load_state_dict(trained_like.state_dict())
    x, ref = frames_tensor(6), frames_tensor(7)
    assert copy.eval().compress(x, ref, 0)["strings"] == trained_like.compress(x, ref, 0)["strings"]


# ---------------------------------------------------------------------- the GOP syntax


def test_gop_syntax_2_round_trips_p_frames():
    gops = GopStructure([(1, [PFrame(), Round(2), PFrame(True), Round(1, True)]), (1, [PFrame()])])
    assert gops.syntax == 2 and gops.frames == 8 and gops.pframes == 3
    assert gops.frame_types() == "KPppFAKP"
    assert GopStructure.from_bytes(gops.to_bytes(), 8, 2, 3, syntax=2) == gops
    with pytest.raises(ValueError, match="syntax 1"):
        gops.to_bytes(syntax=1)
    rounds_only = GopStructure([(2, [Round(3)])])
    assert rounds_only.syntax == 1  # files without P frames keep the old syntax
    with pytest.raises(BitstreamError, match="invalid value"):
        GopStructure.from_bytes(bytes([1, 1, 1, 1 << 2 | 2]), 2, 2, 3, syntax=2)
    with pytest.raises(BitstreamError, match="unknown GOP syntax"):
        GopStructure.from_bytes(rounds_only.to_bytes(), 5, 2, 3, syntax=7)


def test_gop_syntax_3_holds_motion_and_repeats():
    units = [PFrame(False, True, False), PFrame(False, False, False), PFrame(True, True, True), PFrame()]
    gops = GopStructure([(1, units)])
    assert gops.syntax == 3 and gops.pframes == 4 and gops.coded_inter_frames == 3 and gops.residual_frames == 2
    assert gops.frame_types() == "KPsFP"
    assert GopStructure.from_bytes(gops.to_bytes(), 5, 2, 3, syntax=3) == gops
    with pytest.raises(ValueError, match="syntax 2"):
        gops.to_bytes(syntax=2)
    with pytest.raises(BitstreamError, match="invalid value"):
        GopStructure.from_bytes(bytes([1, 1, 1, 4 << 2 | 2]), 2, 2, 3, syntax=3)


def test_gop_syntax_4_holds_long_term_references():
    units = [PFrame(False, True, False, True), PFrame(False, False, False, True), PFrame(False, True, False),
             PFrame(False, True, True, True)]
    gops = GopStructure([(1, units)])
    assert gops.syntax == 4 and gops.coded_inter_frames == 3
    assert gops.frame_types() == "KLlPL"
    assert GopStructure.from_bytes(gops.to_bytes(), 5, 2, 3, syntax=4) == gops
    with pytest.raises(ValueError, match="syntax 3"):
        gops.to_bytes(syntax=3)
    with pytest.raises(ValueError, match="long-term"):
        GopStructure([(1, [PFrame(True, True, False, True)])]).to_bytes()
    for bad in (4 << 2 | 3, 8 << 2 | 2):  # a long-term forecast; a value past the flags
        with pytest.raises(BitstreamError, match="invalid value"):
            GopStructure.from_bytes(bytes([1, 1, 1, bad]), 2, 2, 3, syntax=4)



def test_gop_syntax_5_holds_fused_p_frames():
    units = [PFrame(False, True, True, False, 3), PFrame(True, False, True, False, 1),
             PFrame(False, True, True, True, 7), PFrame(False, True, False)]
    gops = GopStructure([(1, units)])
    assert gops.syntax == 5 and gops.coded_inter_frames == 4 and gops.residual_frames == 3
    assert gops.frame_types() == "KPFLP" and units[0].parts == "motion+residual+fused-3"
    assert GopStructure.from_bytes(gops.to_bytes(), 5, 2, 3, syntax=5) == gops
    with pytest.raises(ValueError, match="syntax 4"):
        gops.to_bytes(syntax=4)
    for bad in (PFrame(False, True, False, False, 2), PFrame(False, True, True, False, 8)):  # no residual; too far
        with pytest.raises(ValueError, match="fused"):
            GopStructure([(1, [bad])]).to_bytes()
    # a fused unit without a residual; a fused long-term forecast; a fused unit in syntax 4
    for value, syntax in ((1 << 3 | 1) << 2 | 2, 5), (((1 << 3 | 6) << 2 | 3), 5), ((1 << 3 | 2) << 2 | 2, 4):
        with pytest.raises(BitstreamError, match="invalid value"):
            GopStructure.from_bytes(bytes([1, 1, 1, *write_uvarint(value)]), 2, 2, 3, syntax=syntax)

# ---------------------------------------------------------------------- the video codec


def test_failed_predictions_become_p_frames_and_decode_exactly(codec):
    data, gops, seen, log = encode(codec, clip(7), threshold=0.0)
    types = gops.frame_types()
    assert types[0] == "K" and set(types[1:]) <= {"P", "F", "L", "s", "l"} and gops.keyframes == 1
    assert [r.type for r in log] == list(types)
    assert all((r.bytes > 0) == r.type.isupper() for r in log) and all(r.distance is not None for r in log[2:])
    assert all(r.parts in ("motion", "residual", "motion+residual") for r in log if r.type in "PF")
    assert all(r.parts.startswith("long-term") for r in log if r.type in "Ll")
    assert not any(r.parts for r in log if r.type in "Ks")
    header = Container.from_bytes(data).header
    assert header.params["gop_syntax"] == gops.syntax and header.params["pframe_level"] == header.rate_level
    decoded = list(codec.decode(data))
    assert len(decoded) == 7 and all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = list(VideoCodec.from_pretrained(str(codec.package.root)).decode(data))
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, again))


def test_keyframe_levels_above_the_p_frame_codecs_use_its_top_level(tmp_path_factory, residual_only):
    """A package whose keyframe codec offers more rate levels than its P-frame codec (a
    video package given higher keyframe rates): at such a level the P frames use the
    codec's top gains, and the file decodes exactly."""
    codec = VideoCodec.from_pretrained(str(make_tiny_video_package(tmp_path_factory.mktemp("pvideo-levels"),
                                                                   pframe=True, pframe_levels=2)))
    top = codec.image.rate_levels[-1]
    assert codec.pframe_codec.num_rate_levels == 2 < len(codec.image.rate_levels)
    data, gops, seen, _ = encode(codec, clip(4), predictor=False, rate_level=top)
    assert gops.frame_types() == "KPPP" and Container.from_bytes(data).header.params["pframe_level"] == top
    assert all(np.array_equal(a, b) for a, b in zip(seen, codec.decode(data)))


def test_a_return_to_the_keyframe_takes_it_as_reference(package, monkeypatch):
    """A scene that comes back to the keyframe's content (A B A B A) is best predicted from
    the last keyframe, not from the previous frame: such P frames (L, or l at zero bytes)
    make a GOP syntax 4 file that decodes exactly; --no-long-term keeps to syntax 3. (The
    tiny random keyframe codec decodes to noise, so a stand-in for a good one decodes
    every keyframe to A, on both sides.)"""
    a, b = clip(1)[0], 255 - clip(1)[0]
    monkeypatch.setattr(VideoCodec, "_keyframe_decode", lambda self, payload, w, h, level, generative: a.copy())
    codec = VideoCodec.from_pretrained(package)
    codec.pframe_lambdas = {level: 3.6e-3 for level in codec.pframe_lambdas}  # λ = 0 would always repeat
    frames = [a, b, a, b, a]
    data, gops, seen, log = encode(codec, frames, predictor=False)
    types = gops.frame_types()
    assert re.fullmatch("KP[Ll]P[Ll]", types) and gops.syntax == 4
    assert [r.type for r in log] == list(types) and log[2].parts.startswith("long-term")
    assert all(np.array_equal(x, y) for x, y in zip(seen, codec.decode(data)))
    _, without, _, _ = encode(codec, frames, predictor=False, long_term=False)
    assert not set(without.frame_types()) & {"L", "l"} and without.syntax == 3


def test_without_the_predictor_nothing_runs_it(codec, package):
    data, gops, seen, _ = encode(codec, clip(5), predictor=False)
    assert re.fullmatch("K[Ps]{4}", gops.frame_types())
    fresh = VideoCodec.from_pretrained(package)
    assert all(np.array_equal(a, b) for a, b in zip(seen, fresh.decode(data)))
    assert fresh._predictor is None


def test_accepted_predictions_still_come_first(codec):
    _, gops, _, _ = encode(codec, clip(8), threshold=10.0, max_gop=100)
    assert re.fullmatch("K[Ps]pppppp", gops.frame_types())  # the history fills with a P frame, then rounds


def test_a_prediction_worse_than_a_p_frame_is_refused(package):
    """Within the threshold is not enough: a predicted frame (zero bits) must also cost no
    more in R + λ·D than the best P frame would."""
    codec = VideoCodec.from_pretrained(package)
    free = encode(codec, clip(8, 64, 96), threshold=10.0, max_gop=100)[1].frame_types()
    assert free.count("p") == 6  # λ = 0 (the tiny package's): distortion is free, every prediction kept
    codec.pframe_lambdas = {level: 3.6e-3 for level in codec.pframe_lambdas}
    _, gops, _, log = encode(codec, clip(8, 64, 96), threshold=10.0, max_gop=100)
    assert gops.frame_types().count("p") < 6 and all(r.distance is not None for r in log[2:])


def test_max_gop_and_scene_cuts_start_keyframes(codec, monkeypatch):
    _, gops, _, _ = encode(codec, clip(8), predictor=False, max_gop=3)
    assert re.fullmatch("K[Ps]{3}K[Ps]{3}", gops.frame_types())
    force_residual(monkeypatch)
    code = VideoCodec._code_pframe

    def expensive(self, frame, ref, level, skip=None):  # every P frame costs more than a keyframe
        payload, decoded, bits = code(self, frame, ref, level, skip)
        return type(payload)(payload.z_shape, payload.z_string, payload.y_string + bytes(10**4),
                             payload.symbols_check), decoded, bits

    monkeypatch.setattr(VideoCodec, "_code_pframe", expensive)
    assert encode(codec, clip(4), predictor=False, scene_cuts=True)[1].frame_types() == "KKKK"
    assert encode(codec, clip(4), predictor=False)[1].frame_types() == "KPPP"


def test_p_frame_chunks_are_checked(codec, residual_only):
    data, gops, _, _ = encode(codec, clip(4), predictor=False)
    container = Container.from_bytes(data)
    dropped = Container(container.header, container.chunks[:-1])
    with pytest.raises(BitstreamError, match="P frames"):
        list(codec.decode(dropped.to_bytes()))
    last = PFramePayload.from_bytes(container.chunks[-1].payload)
    wrong = PFramePayload(last.z_shape, last.z_string, last.y_string, last.symbols_check ^ 1)
    container.chunks[-1] = Chunk(b"PFRM", wrong.to_bytes())
    with pytest.raises(DecodeError, match="desynchronised"):
        list(codec.decode(container.to_bytes()))


def test_a_package_without_p_frames_refuses_them(tmp_path_factory, codec):
    data, _, _, _ = encode(codec, clip(3), predictor=False)
    plain = VideoCodec.from_pretrained(str(make_tiny_video_package(tmp_path_factory.mktemp("plain"))))
    container = Container.from_bytes(data)
    container.header.model_digest = plain.package.short_digest
    with pytest.raises(DecodeError, match="no P-frame codec"):
        list(plain.decode(container.to_bytes()))
    with pytest.raises(ValueError, match="needs the predictor"):
        encode(plain, clip(3), predictor=False)
