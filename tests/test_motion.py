"""Coded motion for P frames: the bit-exact mesh warp, the field's entropy coding, the
encoder's search, and video files that use them (tiny random models)."""

from __future__ import annotations

import hashlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from ulbcodec._compressai import compressai  # noqa: F401  (must precede compressai.* imports)
from compressai.ans import RansEncoder

from ulbcodec.bitstream import (CHUNK_INTER, BitstreamError, Chunk, Container, GopStructure, InterFrameParts,
                                MotionPayload, PFrame, PFramePayload, inter_chunk, inter_frame_bytes, pframe_parts,
                                split_inter_frame, video_gops)
from ulbcodec.motion import coding, search
from ulbcodec.motion import field as field_module
from ulbcodec.motion.field import MAX_VECTOR, MotionField, grid_shape, warp
from ulbcodec.motion.search import best_field, estimate
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import make_tiny_video_package
from test_video_codec import clip

DATA = Path(__file__).parent / "data" / "video_syntax2"


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Texture with detail at several scales, so that a search has something to lock onto."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    out = np.zeros((h, w, 3))
    for _ in range(12):
        fx, fy, phase = rng.uniform(0.02, 0.3), rng.uniform(0.02, 0.3), rng.uniform(0, 6.3, 3)
        out += 20 * np.sin((fx * x + fy * y)[..., None] + phase)
    return np.clip(128 + out, 0, 255).astype(np.uint8)


def field_of(rows_cols, spacing, dx, dy) -> MotionField:
    v = np.zeros((*rows_cols, 2), np.int32)
    v[..., 0], v[..., 1] = dx, dy
    return MotionField(spacing, v)


# ---------------------------------------------------------------------- the warp


def test_zero_field_is_the_identity_and_integer_pans_shift():
    ref = smooth_image(40, 56)
    shape = grid_shape(56, 40, 16)
    assert np.array_equal(warp(ref, MotionField.zeros(56, 40, 16)), ref)
    moved = warp(ref, field_of(shape, 16, 3 * 4, -2 * 4))  # 3 px right, 2 px up in the reference
    assert np.array_equal(moved[2:, :-3], ref[:-2, 3:])
    assert np.array_equal(moved[:2, :-3], np.repeat(ref[:1, 3:], 2, 0))  # clamped at the border


def test_flow_is_exact_for_linear_fields():
    s = 16
    rows, cols = grid_shape(64, 48, s)
    j = np.arange(cols)[None, :].repeat(rows, 0)
    v = np.zeros((rows, cols, 2), np.int32)
    v[..., 0] = 4 * j  # 1/4 px per pixel of x: a zoom along x
    flow = MotionField(s, v).flow(64, 48)
    x = np.arange(64)[None, :]
    assert np.array_equal(flow[..., 0], np.broadcast_to((2 * 4 * x + s // 2) // s, (48, 64)))
    assert not flow[..., 1].any()


def test_warp_is_pinned():
    """The interpolation is integer arithmetic: these bytes are every machine's."""
    ref = smooth_image(37, 61, seed=1)
    rng = np.random.default_rng(5)
    field = MotionField(16, rng.integers(-40, 41, (*grid_shape(61, 37, 16), 2)).astype(np.int32))
    out = warp(ref, field)
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == "bc07fe00ac814201"


@pytest.mark.parametrize("scale", [3, 300, MAX_VECTOR])
def test_warp_clamps_every_tap_to_the_border(scale):
    """The warp equals the textbook filter: each of the 4x4 taps read at its own position
    clamped to the frame, for vectors from subpixel to far outside the frame."""
    ref = smooth_image(29, 45, seed=6)
    rng = np.random.default_rng(scale)
    field = MotionField(16, rng.integers(-scale, scale + 1, (*grid_shape(45, 29, 16), 2)).astype(np.int32))
    flow = field.flow(45, 29)
    x = np.arange(45)[None, :] * 8 + flow[..., 0]
    y = np.arange(29)[:, None] * 8 + flow[..., 1]
    filters = np.array(field_module._FILTERS)
    acc = np.zeros((29, 45, 3), np.int64)
    for a in range(4):
        for b in range(4):
            taps = ref[np.clip((y >> 3) + a - 1, 0, 28), np.clip((x >> 3) + b - 1, 0, 44)]
            acc += (filters[y & 7][..., a] * filters[x & 7][..., b])[..., None] * taps
    assert np.array_equal(warp(ref, field), np.clip((acc + 2048) >> 12, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------- the field's coding


@pytest.mark.parametrize("spacing", [16, 32, 64])
def test_fields_round_trip_escapes_included(spacing):
    rng = np.random.default_rng(spacing)
    rows, cols = grid_shape(200, 120, spacing)
    vectors = rng.integers(-300, 301, (rows, cols, 2)).astype(np.int32)  # beyond the tables: escapes
    for v in (vectors, vectors // 50, np.zeros_like(vectors)):
        field = MotionField(spacing, v)
        payload = coding.compress(field)
        back = coding.decompress(MotionPayload.from_bytes(payload.to_bytes()), 200, 120)
        assert back.spacing == spacing and np.array_equal(back.vectors, v)


def test_camera_motion_costs_almost_nothing():
    rows, cols = grid_shape(640, 360, 16)
    pan = field_of((rows, cols), 16, 7, -3)
    j, i = np.meshgrid(np.arange(cols), np.arange(rows))
    zoom = MotionField(16, np.stack([2 * j - cols, 2 * i - rows], -1).astype(np.int32))
    for field in (pan, zoom):
        # 2 x 1008 differences, all but the first few zero: the rANS flush and escapes dominate
        assert len(coding.compress(field).string) <= 20 and coding.coded_bits(field) < 120


def test_motion_bitstream_is_pinned():
    rng = np.random.default_rng(11)
    field = MotionField(32, rng.integers(-20, 21, (*grid_shape(160, 96, 32), 2)).astype(np.int32))
    data = coding.compress(field).to_bytes()
    assert hashlib.sha256(data).hexdigest()[:16] == "192d85e200d8c083"


def test_corrupt_motion_payloads_are_refused():
    with pytest.raises(BitstreamError, match="spacing"):
        coding.decompress(MotionPayload(24, 0, b"\x00" * 8), 64, 64)
    with pytest.raises(BitstreamError, match="truncated"):
        MotionPayload.from_bytes(b"\x10")
    largest = MotionField(16, np.full((*grid_shape(64, 64, 16), 2), MAX_VECTOR, np.int32))
    assert np.array_equal(coding.decompress(coding.compress(largest), 64, 64).vectors, largest.vectors)
    with pytest.raises(ValueError, match="beyond"):
        coding.compress(MotionField(16, largest.vectors * 2))
    # A string whose differences add up past the bound (no encoder writes one).
    n = np.prod(grid_shape(64, 64, 16))
    string = coding._rans(RansEncoder().encode_with_indexes, [MAX_VECTOR] * 2 * n, [0, 0] * n)
    with pytest.raises(BitstreamError, match="out of range"):
        coding.decompress(MotionPayload(16, 0, string), 64, 64)


def test_pframe_chunk_parts_round_trip():
    motion = MotionPayload(32, 0x35, b"abc")
    residual = PFramePayload((1, 2), b"zz", b"yyyy", 7)
    for unit, parts in ((PFrame(False, True, False), (motion, None)), (PFrame(False, True, True), (motion, residual)),
                        (PFrame(), (None, residual))):
        assert split_inter_frame(inter_frame_bytes(InterFrameParts(parts[0], None, parts[1])), unit) == (
            parts[0], None, parts[1])
    with pytest.raises(BitstreamError, match="trailing"):
        split_inter_frame(inter_frame_bytes(InterFrameParts(motion, None, residual)), PFrame(False, True, False))


# ---------------------------------------------------------------------- the search


@pytest.mark.parametrize("shift", [(5, -3), (0.25, 0.75), (-12.5, 2)])
def test_search_finds_a_global_shift(shift):
    big = smooth_image(200, 260, seed=2)
    dx, dy = shift
    # the reference holds the target's content at (x + dx, y + dy): sample it there
    target = big[20:116, 20:180]
    # reference(x) = target(x - shift): warp the source by -shift (exact for whole pixels)
    reference = warp(big, field_of(grid_shape(260, 200, 16), 16, -round(4 * dx), -round(4 * dy)))[20:116, 20:180]
    field = estimate(target, reference, 32)
    inner = field.vectors[1:-1, 1:-1].reshape(-1, 2) / 4  # nodes whose window lies inside the frame
    assert np.abs(np.median(inner, 0) - shift).max() <= 0.25
    predicted = warp(reference, field)
    assert np.abs(predicted[8:-8, 8:-8].astype(int) - target[8:-8, 8:-8]).mean() < 3


def test_search_tries_offsets_in_chunks_as_it_would_one_at_a_time(monkeypatch):
    """The window errors of many offsets, computed in batches, equal one offset's at a
    time; the neighbour costs of many candidate sets equal a loop over them."""
    target = torch.from_numpy(smooth_image(40, 72, seed=3)[..., 0].astype(np.float32))[None, None]
    reference = torch.from_numpy(smooth_image(40, 72, seed=4)[..., 0].astype(np.float32))[None, None]
    shape = grid_shape(72, 40, 16)
    window_error = search._WindowError(target, reference, 16, shape)
    flow = torch.randn(1, 40, 72, 2)
    offsets = torch.randn(9, 2) * 3
    batched = window_error(flow, offsets)
    monkeypatch.setattr(search, "_CHUNK_PIXELS", 1)
    single = torch.stack([window_error(flow, offset[None])[0] for offset in offsets])
    assert batched.shape == (9, 1, *shape) and torch.equal(batched, single)

    chosen, candidates = torch.randn(1, *shape, 2), torch.randn(5, 1, *shape, 2)
    rows, cols = shape
    for d in range(5):
        expected = torch.zeros(1, rows, cols)
        for i in range(rows):
            for j in range(cols):
                for ni, nj in ((i, j - 1), (i, j + 1), (i - 1, j), (i + 1, j)):
                    if 0 <= ni < rows and 0 <= nj < cols:
                        expected[0, i, j] += (chosen[0, ni, nj] - candidates[d, 0, i, j]).abs().sum()
        assert torch.allclose(search._neighbour_costs(chosen, candidates)[d], expected)


def test_best_field_searches_the_spacings_side_by_side_as_one_by_one():
    """The searches run on worker threads: the same field as a search per spacing, and
    the caller's thread count afterwards."""
    big = smooth_image(120, 200, seed=7)
    target, reference = big[10:106, 10:170], big[13:109, 6:166]
    fields = [estimate(target, reference, spacing) for spacing in (16, 32, 64)]
    costs = [float(np.abs(warp(reference, f).astype(int) - target).sum()) + coding.coded_bits(f) for f in fields]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        field, _, cost = best_field(target, reference,
                                    lambda bits, pred: bits - 8 * 4 + float(np.abs(pred.astype(int) - target).sum()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    best = int(np.argmin(costs))
    assert np.array_equal(field.vectors, fields[best].vectors) and cost == costs[best]


def test_best_field_prefers_no_motion_on_a_static_scene():
    frame = smooth_image(64, 96)
    field, warped, cost = best_field(frame, frame, lambda bits, pred: bits + float(np.abs(pred.astype(int) - frame).sum()))
    assert field is None and warped is frame and cost == 0.0


# ---------------------------------------------------------------------- in video files


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    codec = VideoCodec.from_pretrained(str(make_tiny_video_package(tmp_path_factory.mktemp("mvideo"), pframe=True)))
    # The tiny package's levels carry λ = 0 (distortion free: every inter frame a repeat);
    # a trained package's top λ, so that motion pays for itself.
    codec.pframe_lambdas = {level: 3.6e-3 for level in codec.pframe_lambdas}
    return codec


def encode(codec, frames, **kw):
    seen = []
    settings = VideoSettings(predictor=False, scene_cuts=False, **kw)
    data, gops = codec.encode(iter(frames), Fraction(25), settings, reconstruction=seen.append)
    return data, gops, seen


def test_a_moving_clip_codes_motion_and_decodes_exactly(codec):
    frames = clip(6, 64, 96)  # content moves 2 px right and 1 px down per frame
    data, gops, seen = encode(codec, frames)
    units = [u for _, us in gops.segments for u in us]
    assert any(u.motion for u in units) and gops.syntax == 3
    assert Container.from_bytes(data).header.params["gop_syntax"] == 3
    decoded = list(codec.decode(data))
    assert all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    err = lambda a, b: np.abs(a.astype(int) - b).mean()  # noqa: E731
    _, _, without = encode(codec, frames, motion=False)
    assert sum(map(err, frames, seen)) < sum(map(err, frames, without))


def test_without_motion_no_field_is_coded(codec):
    _, gops, _ = encode(codec, clip(4, 64, 96), motion=False)
    assert not any(u.motion for _, us in gops.segments for u in us)


def test_a_syntax_2_file_of_the_previous_release_still_decodes(codec):
    container = Container.from_bytes((DATA / "tiny-KPPPP.ulb").read_bytes())
    assert container.header.params["gop_syntax"] == 2 and video_gops(container).frame_types() == "KPPPP"
    # The tiny package is rebuilt from the same seeds; only its digest (a temporary path
    # in a config) differs from the one that wrote the file.
    container.header.model_digest = codec.package.short_digest
    decoded = np.stack(list(codec.decode(container.to_bytes())))
    expected = np.load(DATA / "tiny-KPPPP-decoded.npz")["frames"]
    mse = np.mean((decoded.astype(float) - expected) ** 2)
    assert mse == 0 or 10 * np.log10(255**2 / mse) > 40  # synthesis rounds per CPU (conftest.PIN_PSNR_DB)


def test_inter_chunks_are_checked(codec):
    data, gops, _ = encode(codec, clip(4, 64, 96))
    container = Container.from_bytes(data)
    units = [u for _, us in gops.segments for u in us]
    parts = pframe_parts(container, gops)
    assert len(parts) == len(units) and [p is not None for p in parts] == [u.has_parts for u in units]
    index = next(j for j, c in enumerate(container.chunks) if c.type == CHUNK_INTER)
    rebuilt = lambda frames: Container(container.header, container.chunks[:index] + [  # noqa: E731
        Chunk(CHUNK_INTER, inter_chunk(frames))] + container.chunks[index + 1:]).to_bytes()
    coded = [p for p in parts if p is not None]
    assert rebuilt(coded) == data
    with pytest.raises(BitstreamError, match="trailing"):
        list(codec.decode(rebuilt(coded + [b"x"])))
    with pytest.raises(BitstreamError, match="INTR"):
        list(codec.decode(Container(container.header, container.chunks[:index]).to_bytes()))
    i = next(i for i, u in enumerate(units) if u.motion)
    motion, skip_map, residual = split_inter_frame(parts[i], units[i])
    parts[i] = inter_frame_bytes(InterFrameParts(MotionPayload(8, motion.tables, motion.string), skip_map, residual))
    with pytest.raises(BitstreamError, match="spacing"):
        list(codec.decode(rebuilt([p for p in parts if p is not None])))
