"""P frames with skipped blocks (GOP syntax 6): the block-flag coder, the latent codec
leaving positions out of its stream, the GOP syntax, and files that decode exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulbcodec import bitstream
from ulbcodec.bitstream import (BitstreamError, Container, GopStructure, InterFrameParts, PFrame, PFramePayload,
                                Round, inter_frame_bytes, split_inter_frame, write_uvarint)
from ulbcodec.entropy.block_flags import decode_flags, encode_flags
from ulbcodec.image import DecodeError
from ulbcodec.video import VideoCodec, _ReferenceModes, keep_reference

from conftest import make_tiny_video_package
from test_pframe import encode, frames_tensor
from test_pframe_latent import codec, keyframe_codec  # noqa: F401  (fixtures)


# ---------------------------------------------------------------------- block flags


def test_block_flags_round_trip_any_map():
    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, cols = (int(v) for v in rng.integers(0, 24, 2))
        flags = rng.random((rows, cols)) < rng.random()
        if trial % 4 == 0:  # contiguous regions, as skipped blocks are
            flags = np.zeros((rows, cols), dtype=bool)
            flags[rows // 3:, cols // 2:] = True
        assert np.array_equal(decode_flags(encode_flags(flags), (rows, cols)), flags)


def test_block_flags_cost_a_fraction_of_a_bit_per_flag_on_regions():
    flags = np.zeros((23, 40), dtype=bool)
    flags[5:15, 10:30] = True
    assert len(encode_flags(flags)) * 8 < 0.2 * flags.size
    assert encode_flags(np.zeros((23, 40), dtype=bool)) == b""  # nothing skipped: nothing to send


def test_block_flags_refuse_a_string_longer_than_its_flags_can_need():
    flags = np.ones((4, 4), dtype=bool)
    data = encode_flags(flags)
    with pytest.raises(ValueError, match="past its 4x4 flags"):
        decode_flags(data + bytes(8), (4, 4))
    with pytest.raises(ValueError, match="2-D"):
        encode_flags(np.zeros(3, dtype=bool))


# ---------------------------------------------------------------------- the latent codec


def test_skipped_positions_leave_the_stream_and_decode_exactly(codec):  # noqa: F811
    x, ref = frames_tensor(0), frames_tensor(1)
    full = codec.compress(x, ref, 2, position_bits=True)
    bits = full["position_bits"]
    assert bits.shape == (4, 8) and bool((bits > 0).all())
    skip = torch.zeros(4, 8, dtype=torch.bool)
    skip[:, :5] = True
    coded = codec.compress(x, ref, 2, skip=skip, position_bits=True)
    assert len(coded["strings"][0]) < len(full["strings"][0])
    assert bool((coded["position_bits"][skip] == 0).all())
    out = codec.decompress(coded["strings"], coded["shape"], ref, 2, skip=skip)
    assert out["symbols_crc32"] == coded["symbols_crc32"] and torch.equal(out["x_hat"], coded["x_hat"])
    wrong = codec.decompress(coded["strings"], coded["shape"], ref, 2)  # without the map
    assert wrong["symbols_crc32"] != coded["symbols_crc32"]
    with pytest.raises(ValueError, match="bool map"):
        codec.compress(x, ref, 2, skip=torch.zeros(4, 4, dtype=torch.bool))


# ---------------------------------------------------------------------- the GOP syntax


def test_gop_syntax_6_round_trips_skipped_blocks_and_refuses_what_it_cannot_hold():
    units = [PFrame(skip_blocks=True), PFrame(motion=True, skip_blocks=True), Round(2),
             PFrame(True, skip_blocks=True), PFrame(long_term=True, motion=True, skip_blocks=True), PFrame()]
    gops = GopStructure([(1, units)])
    assert gops.syntax == bitstream.GOP_SYNTAX_SKIP_BLOCKS and gops.skip_block_frames == 4
    assert GopStructure.from_bytes(gops.to_bytes(), 8, 2, 3, syntax=6) == gops
    with pytest.raises(ValueError, match="skipped blocks"):
        gops.to_bytes(syntax=5)
    for bad in (PFrame(residual=False, motion=True, skip_blocks=True), PFrame(fusion_drop=2, skip_blocks=True)):
        with pytest.raises(ValueError, match="skipped blocks"):
            GopStructure([(1, [bad])]).to_bytes(syntax=6)
    skip_value = (2 | 1 << 6) << 2 | 2  # a residual with skipped blocks
    for syntax, value in ((5, skip_value), (6, skip_value | 2 << 5), (6, (1 << 6) << 2 | 2)):  # old, fused, no residual
        with pytest.raises(BitstreamError, match="invalid value"):
            GopStructure.from_bytes(bytes([1, 1, 1]) + write_uvarint(value), 2, 2, 3, syntax=syntax)


def test_inter_frame_parts_carry_the_map_between_motion_and_residual():
    motion = bitstream.MotionPayload(32, 0x35, b"abc")
    residual = PFramePayload((1, 2), b"zz", b"yyyy", 7)
    for unit, parts in ((PFrame(skip_blocks=True), InterFrameParts(None, b"\x01\x02", residual)),
                        (PFrame(motion=True, skip_blocks=True), InterFrameParts(motion, b"", residual))):
        assert split_inter_frame(inter_frame_bytes(parts), unit) == parts


# ---------------------------------------------------------------------- files


def test_skipped_blocks_cross_fade_into_coded_ones():
    decoded, reference = np.zeros((40, 70, 3), np.uint8), np.full((40, 70, 3), 255, np.uint8)
    skip = np.zeros((3, 5), dtype=bool)
    assert np.array_equal(keep_reference(decoded, reference, skip, 16), decoded)
    assert np.array_equal(keep_reference(decoded, reference, ~skip, 16), reference)
    skip[:, :2] = True  # columns 0-31 skipped
    row = keep_reference(decoded, reference, skip, 16)[20, :, 0].astype(int)
    assert (row[:30] == 255).all() and (row[34:] == 0).all()  # 2 pixels either side of the boundary
    assert (np.diff(row) <= 0).all() and 0 < row[32] < 255 and row[31] + row[32] == 255  # a symmetric ramp


def half_static_clip(frames: int, h: int = 64, w: int = 96) -> np.ndarray:
    """A still top half over a bottom half that flips between black and white."""
    rng = np.random.default_rng(5)
    still = rng.integers(0, 256, (h // 2, w, 3))
    return np.stack([np.concatenate([still, np.full((h - h // 2, w, 3), 255 * (t % 2))]) for t in range(frames)]
                    ).astype(np.uint8)


@pytest.fixture(scope="module")
def latent_video(tmp_path_factory):
    root = make_tiny_video_package(tmp_path_factory.mktemp("skipvideo"), pframe="latent")
    codec = VideoCodec.from_pretrained(str(root))
    return root, codec


def choose_skipped_blocks(monkeypatch, codec):
    """Inter frames on the previous frame, the skipped-block mode wherever the encoder
    offers it (a tiny random model's R + λD would pick anything), under a λ that weighs
    distortion at all (the tiny package's are 0)."""
    monkeypatch.setattr(codec, "pframe_lambdas", {level: 1.0 for level in codec.pframe_lambdas})
    def best(self, target, previous, forecast, level, motion=True, keyframe=None):
        entry = self._reference_modes(target, previous, PFrame(residual=False), level, False)
        offered = self._skip_block_candidates(target, entry, level) or [c for c in entry.candidates if c[1].residual]
        return offered[0]

    monkeypatch.setattr(VideoCodec, "_best_pframe", best)


def test_a_file_with_skipped_blocks_decodes_exactly(latent_video, monkeypatch):
    root, codec = latent_video
    choose_skipped_blocks(monkeypatch, codec)
    frames = half_static_clip(4)
    data, gops, seen, log = encode(codec, frames, predictor=False)
    assert gops.frame_types() == "KPPP" and gops.skip_block_frames == 3
    assert all(r.parts == "residual+skip-blocks" for r in log[1:])
    assert bitstream.describe(Container.from_bytes(data))["gop"]["skip_blocks"] == [1, 2, 3]
    # each frame's skipped blocks (its map, from the file) away from coded ones are its
    # reference's; next to a coded block the two cross-fade
    container = Container.from_bytes(data)
    inside = 0
    for i, part in enumerate(bitstream.pframe_parts(container, gops), start=1):
        skip = decode_flags(split_inter_frame(part, PFrame(skip_blocks=True)).skip_map, (4, 8))[:, :6]
        assert skip.any() and not skip.all()  # the frame is 4 x 6 blocks
        padded = np.pad(skip, 1, mode="edge")
        for row, col in zip(*np.nonzero(skip)):
            if padded[row:row + 3, col:col + 3].all():
                block = np.s_[16 * row:16 * row + 16, 16 * col:16 * col + 16]
                assert np.array_equal(seen[i][block], seen[i - 1][block])
                inside += 1
    assert inside
    fresh = VideoCodec.from_pretrained(str(root))
    for threads in (1, 2):
        previous = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            assert all(np.array_equal(a, b) for a, b in zip(seen, fresh.decode(data)))
        finally:
            torch.set_num_threads(previous)
    _, plain, _, _ = encode(codec, frames, predictor=False, skip_blocks=False)
    assert plain.skip_block_frames == 0 and plain.syntax < bitstream.GOP_SYNTAX_SKIP_BLOCKS


def test_a_codec_without_skippable_blocks_and_a_bad_map_are_refused(latent_video, monkeypatch):
    root, codec = latent_video
    choose_skipped_blocks(monkeypatch, codec)
    data, _, _, _ = encode(codec, half_static_clip(2), predictor=False)
    fresh = VideoCodec.from_pretrained(str(root))
    monkeypatch.setattr(type(fresh.pframe_codec), "skip_block", None)
    with pytest.raises(DecodeError, match="codes every block"):
        list(fresh.decode(data))
    monkeypatch.undo()
    container = Container.from_bytes(data)
    unit = PFrame(skip_blocks=True)
    (part,) = bitstream.pframe_parts(container, bitstream.video_gops(container))
    parts = split_inter_frame(part, unit)
    long_map = inter_frame_bytes(parts._replace(skip_map=parts.skip_map + bytes(16)))
    chunks = [bitstream.Chunk(c.type, bitstream.inter_chunk([long_map])) if c.type == bitstream.CHUNK_INTER else c
              for c in container.chunks]
    with pytest.raises(BitstreamError, match="skipped-block map"):
        list(fresh.decode(Container(container.header, chunks).to_bytes()))


def test_skipped_blocks_refine_a_coded_frame_and_never_replace_a_repeat(latent_video, monkeypatch):
    """The encoder codes a frame with skipped blocks only where it would code that residual
    P frame anyway, and weighs it against repeats, predictions and keyframes at the cost
    of the frame without them (BENCHMARKS.md, "Skipped blocks": where MSE let skipped
    blocks replace repeats and keyframes, VMAF fell)."""
    _, codec = latent_video
    repeat, residual, skipped = PFrame(residual=False), PFrame(), PFrame(skip_blocks=True)

    def modes_costing(repeat_cost):
        def modes(self, target, ref, reference, level, motion):
            candidates = [(repeat_cost, repeat, None, ref), (2.0, residual, b"r", ref)]
            return _ReferenceModes(reference, None, ref, candidates, fused=[], skipped=[(0.5, skipped, b"s", ref)])
        return modes

    frame = half_static_clip(1)[0]
    monkeypatch.setattr(VideoCodec, "_reference_modes", modes_costing(1.0))
    assert codec._best_pframe(frame, frame, None, 0)[1] == repeat
    monkeypatch.setattr(VideoCodec, "_reference_modes", modes_costing(3.0))
    assert codec._best_pframe(frame, frame, None, 0)[:2] == (2.0, skipped)  # decided at the residual's cost
