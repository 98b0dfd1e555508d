"""The .ulb container: round trips and every malformed-file class, each a clean error."""

from __future__ import annotations

import random

import pytest

from ulbcodec import bitstream as bs
from ulbcodec.bitstream import AnchorPayload, BitstreamError, Chunk, Container, Header


def make_file(width=40, height=30, extra_chunks=()) -> bytes:
    header = Header(bs.MEDIA_IMAGE, width, height, b"\x01" * 8, rate_level=2, seed=7)
    payload = AnchorPayload((1, 1), b"zz", b"yyyy", 0xBEEF).to_bytes()
    return Container(header, [Chunk(bs.CHUNK_ANCHOR, payload), *extra_chunks]).to_bytes()


def test_round_trip_preserves_every_field():
    header = Header(bs.MEDIA_VIDEO, 640, 360, bytes(range(8)), rate_level=5, frames=90, fps_num=30000,
                    fps_den=1001, seed=123456789, params={"threshold_milli": 160, "cond_frames": 2})
    data = Container(header, [Chunk(bs.CHUNK_ANCHOR, b"abc")]).to_bytes()
    parsed = Container.from_bytes(data)
    assert parsed.header == header
    assert [(c.type, c.payload) for c in parsed.chunks] == [(bs.CHUNK_ANCHOR, b"abc")]
    assert parsed.total_bytes == len(data)


def test_anchor_payload_round_trip():
    p = AnchorPayload((3, 5), b"z" * 300, b"y" * 1000, 0x1234)
    assert AnchorPayload.from_bytes(p.to_bytes()) == p


def test_framing_is_small():
    # magic+version, HEAD chunk and ANCH framing: what an image pays on top of its strings
    assert len(make_file()) - len(b"zz") - len(b"yyyy") <= 50


def test_wrong_magic():
    with pytest.raises(BitstreamError, match="magic"):
        Container.from_bytes(b"PNG\x01" + make_file()[4:])
    with pytest.raises(BitstreamError, match="magic"):
        Container.from_bytes(b"")


def test_future_version():
    data = bytearray(make_file())
    data[3] = bs.VERSION + 1
    with pytest.raises(BitstreamError, match="newer"):
        Container.from_bytes(bytes(data))


def test_every_truncation_is_refused():
    data = make_file()
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            Container.from_bytes(data[:n])
    # including exactly at a chunk boundary: the header announces the chunk count
    head_end = Container.from_bytes(data).chunks[0].offset
    with pytest.raises(BitstreamError, match="announces 1 chunks, found 0"):
        Container.from_bytes(data[:head_end])


def test_random_byte_flips_never_pass_silently():
    data = make_file()
    rng = random.Random(0)
    for _ in range(500):
        corrupted = bytearray(data)
        pos = rng.randrange(len(data))
        corrupted[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(BitstreamError):
            Container.from_bytes(bytes(corrupted))


def test_oversized_dimensions_refused_before_allocation():
    for w, h in ((bs.MAX_SIDE + 1, 10), (10, 0), (30000, 30000)):
        header = Header(bs.MEDIA_IMAGE, 1, 1, b"\0" * 8)
        header.width, header.height = w, h
        raw = bytearray([bs.MEDIA_IMAGE]) + bs.write_uvarint(w) + bs.write_uvarint(h)
        raw += bs.write_uvarint(1) + bs.write_uvarint(0) + bs.write_uvarint(1) + b"\0" * 8 + b"\0" + b"\0\0\0"
        data = bs.MAGIC + bytes([bs.VERSION]) + bs.encode_chunk(bs.CHUNK_HEADER, bytes(raw))
        with pytest.raises(BitstreamError, match="range|exceeds"):
            Container.from_bytes(data)


def test_huge_chunk_length_refused():
    data = bs.MAGIC + bytes([bs.VERSION]) + bs.write_uvarint(1 << 40) + b"HEAD"
    with pytest.raises(BitstreamError):
        Container.from_bytes(data)


def test_unknown_critical_chunk_refused_ancillary_kept():
    with pytest.raises(BitstreamError, match="unknown critical chunk XTRA"):
        Container.from_bytes(make_file(extra_chunks=[Chunk(b"XTRA", b"?")]))
    parsed = Container.from_bytes(make_file(extra_chunks=[Chunk(b"note", b"hello")]))
    assert len(parsed.chunks) == 2
    assert parsed.find(b"note")[0].payload == b"hello"


def test_duplicated_header_refused():
    data = make_file()
    head = bs.encode_chunk(bs.CHUNK_HEADER, Container.from_bytes(data).header.to_bytes() + b"\0")
    with pytest.raises(BitstreamError, match="duplicated"):
        Container.from_bytes(data + head)


def test_trailing_garbage_refused():
    with pytest.raises(BitstreamError):
        Container.from_bytes(make_file() + b"\x00\x01")


def test_describe_reports_chunks_and_bpp():
    data = make_file()
    desc = bs.describe(Container.from_bytes(data))
    assert desc["bytes"] == len(data)
    assert desc["bpp"] == pytest.approx(len(data) * 8 / (40 * 30))
    assert [c["type"] for c in desc["chunks"]] == ["HEAD", "ANCH"]
    assert sum(c["bytes"] for c in desc["chunks"]) + 4 == len(data)
