"""Write the seed corpus fuzz/corpus/ (and, with --crashes, the hand-made reproducers in fuzz/crashes/).

    .venv/bin/python fuzz/make_seeds.py            # rewrites fuzz/corpus/
    .venv/bin/python fuzz/make_seeds.py --crashes  # also rewrites the hand-made files in fuzz/crashes/

Seeds are encoded with the fuzz model of fuzz/decode_check.py (tiny, seeded, deterministic),
so they decode with the model the fuzz target builds. ``valid-*`` files must decode;
``edge-*`` files are hand-made malformed or unusual files that must be refused cleanly
(or, for the few valid oddities, decode). Everything is deterministic: running the
script again gives the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_check as dc  # noqa: E402

from ulbcodec import bitstream as bs  # noqa: E402
from ulbcodec.bitstream import AnchorPayload, Chunk, Container, Header  # noqa: E402
from ulbcodec.video import VideoSettings  # noqa: E402

# (width, height, rate level, downscale, content)
VALID = [
    (1, 1, 0, 1, "noise"),
    (2, 3, 2, 1, "gradient"),
    (17, 9, 1, 1, "noise"),
    (64, 64, 0, 1, "flat"),
    (64, 64, 2, 1, "checker"),
    (65, 64, 1, 1, "gradient"),
    (100, 70, 2, 1, "noise"),
    (130, 200, 1, 1, "gradient"),
    (300, 40, 0, 1, "checker"),
    (8, 260, 2, 1, "noise"),
    (200, 150, 1, 2, "gradient"),
    (257, 129, 2, 4, "noise"),
    (520, 300, 0, 8, "checker"),
    (3, 5, 1, 8, "flat"),
]


# Videos, coded with the video fuzz model: (width, height, frames, rate level, settings).
# A threshold of 0.9 accepts the random predictor's frames; 0 refuses them all. The
# first five are keyframes and rounds only (GOP syntax 1), as before P frames.
VALID_VIDEOS = [
    (16, 16, 3, 0, dict(threshold=0.9, pframes=False)),
    (64, 48, 9, 1, dict(threshold=0.9, pframes=False)),
    (33, 17, 6, 2, dict(threshold=0.0, pframes=False)),
    (24, 24, 8, 1, dict(threshold=0.9, generative_keyframes=True, max_gop=3, pframes=False)),
    (40, 32, 7, 2, dict(threshold=0.9, seed=7, pframes=False)),
    # P frames (GOP syntax 3: motion, residuals, repeats in INTR chunks; syntax 4, the
    # long-term reference, among the hand-made cases)
    (64, 48, 6, 2, dict(threshold=0.0, predictor=False, long_term=False)),
    (48, 40, 7, 1, dict(threshold=0.0, long_term=False)),
    (40, 24, 5, 2, dict(threshold=0.0, predictor=False, motion=False, long_term=False)),
]


def clip(width: int, height: int, frames: int) -> np.ndarray:
    """A smooth moving pattern (what the predictor can follow)."""
    y, x = np.mgrid[0:height, 0:width]
    out = [np.stack([128 + 90 * np.sin((x + 2 * t) / 7), 128 + 90 * np.cos((y + t) / 5), np.full_like(x, 100.0)], -1)
           for t in range(frames)]
    return np.clip(out, 0, 255).astype(np.uint8)


def image(width: int, height: int, content: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if content == "noise":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if content == "flat":
        return np.full((height, width, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    if content == "checker":
        v = (((yy // 8) + (xx // 8)) % 2 * 255).astype(np.uint8)
        return np.stack([v, 255 - v, v // 2], axis=-1)
    g = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    return np.stack([g, (yy * 255 // max(height - 1, 1)).astype(np.uint8), 255 - g], axis=-1)


def raw_chunk(ctype: bytes, payload: bytes, crc_xor: int = 0) -> bytes:
    return bs.write_uvarint(len(payload)) + ctype + payload + ((zlib_crc(ctype + payload) ^ crc_xor).to_bytes(4, "big"))


def zlib_crc(data: bytes) -> int:
    import zlib

    return zlib.crc32(data) & 0xFFFFFFFF


def edge_cases(valid: dict, digest: bytes) -> dict:
    """Hand-made inputs: one per malformed-file class (and a few valid oddities)."""
    base = valid["valid-064x064-q2-f1-checker.ulb"]
    prefix, chunks = dc.split_chunks(base)
    head, anch = chunks[0][1], chunks[1][1]
    fields = dc.parse_head(head)
    a = dc.parse_anch(anch)

    def file(*raw_chunks: bytes, prefix: bytes = b"ULB\x01") -> bytes:
        return prefix + b"".join(raw_chunks)

    def head_with(**kw) -> bytes:
        f = dict(fields, **kw)
        return dc.encode_head(f)

    def anch_with(**kw) -> bytes:
        return dc.encode_anch(dict(a, **kw))

    H = lambda **kw: raw_chunk(b"HEAD", head_with(**kw))  # noqa: E731
    A = raw_chunk(b"ANCH", anch)
    out = {
        "edge-empty.ulb": b"",
        "edge-magic-only.ulb": b"ULB",
        "edge-no-chunks.ulb": b"ULB\x01",
        "edge-version-0.ulb": b"ULB\x00" + base[4:],
        "edge-version-2.ulb": b"ULB\x02" + base[4:],
        "edge-wrong-magic.ulb": b"PNG\x01" + base[4:],
        "edge-trailing-byte.ulb": base + b"\0",
        "edge-cut-at-chunk-boundary.ulb": file(H()),
        "edge-cut-mid-chunk.ulb": base[:-5],
        "edge-crc-flipped.ulb": file(H(), raw_chunk(b"ANCH", anch, crc_xor=1)),
        "edge-length-varint-6-bytes.ulb": b"ULB\x01" + b"\x80" * 5 + b"\x01" + b"HEAD",
        "edge-length-over-limit.ulb": b"ULB\x01" + bs.write_uvarint((1 << 30) + 1) + b"HEAD",
        "edge-chunk-type-not-letters.ulb": file(H(), raw_chunk(b"AN\xffH", anch)),
        "edge-first-chunk-not-head.ulb": file(A, H()),
        "edge-duplicate-head.ulb": file(H(count=2), A, H()),
        "edge-unknown-critical-chunk.ulb": file(H(count=2), A, raw_chunk(b"XTRA", b"x")),
        "edge-unknown-ancillary-chunk.ulb": file(H(count=2), raw_chunk(b"teXt", b"comment"), A),  # valid: decodes
        "edge-two-anch.ulb": file(H(count=2), A, A),
        "edge-no-anch.ulb": file(H(count=0)),
        "edge-gops-in-image.ulb": file(H(count=2), A, raw_chunk(b"GOPS", b"")),
        "edge-count-too-high.ulb": file(H(count=2), A),
        "edge-count-over-limit.ulb": file(H(count=(1 << 16) + 1), A),
        "edge-head-trailing-bytes.ulb": file(raw_chunk(b"HEAD", head + b"\0"), A),
        "edge-head-truncated.ulb": file(raw_chunk(b"HEAD", head[:10]), A),
        "edge-media-video.ulb": file(H(media=1, frames=2, fps_num=25), A),
        "edge-media-unknown.ulb": file(H(media=7), A),
        "edge-image-two-frames.ulb": file(H(frames=2), A),
        "edge-fps-den-zero.ulb": file(H(fps_den=0), A),
        "edge-width-zero.ulb": file(H(width=0), A),
        "edge-width-32769.ulb": file(H(width=32769), A),
        "edge-pixels-over-limit.ulb": file(H(width=32768, height=8193), A),
        "edge-varint-11-bytes.ulb": file(raw_chunk(b"HEAD", bytes([0]) + b"\xff" * 10 + b"\x01" + head[2:]), A),
        "edge-wrong-model.ulb": file(H(digest=b"\xde\xad\xbe\xef" * 2), A),
        "edge-rate-level-not-offered.ulb": file(H(rate_level=7), A),
        "edge-downscale-3.ulb": file(H(params=[(2, 3)]), A),
        "edge-unknown-param-id.ulb": file(H(params=[(99, 1)]), A),
        "edge-65-params.ulb": file(H(params=[(16, i) for i in range(65)]), A),
        "edge-reserved-params.ulb": file(H(params=[(1, 5), (16, 160), (20, 4)]), A),  # valid: decodes
        "edge-z-shape-mismatch.ulb": file(H(), raw_chunk(b"ANCH", anch_with(zh=2))),
        "edge-z-shape-zero.ulb": file(H(), raw_chunk(b"ANCH", anch_with(zh=0))),
        "edge-z-len-past-end.ulb": file(H(), raw_chunk(b"ANCH", dc.encode_anch(a, zlen=len(a["z"]) + 1000))),
        "edge-anch-no-check.ulb": file(H(), raw_chunk(b"ANCH", dc.encode_anch(dict(a, y=b""))[:-2])),
        "edge-symbols-check-wrong.ulb": file(H(), raw_chunk(b"ANCH", anch_with(check=a["check"] ^ 0x5555))),
        "edge-y-bit-flipped.ulb": file(H(), raw_chunk(b"ANCH", anch_with(y=bytes([a["y"][0] ^ 1]) + a["y"][1:]))),
        "edge-z-bit-flipped.ulb": file(H(), raw_chunk(b"ANCH", anch_with(z=bytes([a["z"][0] ^ 0x10]) + a["z"][1:]))),
        "edge-y-extra-words.ulb": file(H(), raw_chunk(b"ANCH", anch_with(y=a["y"] + b"\0" * 8))),
        "edge-swapped-z-y.ulb": file(H(), raw_chunk(b"ANCH", anch_with(z=a["y"], y=a["z"]))),
    }
    assert prefix == b"ULB\x01"
    return out


def video_edge_cases(valid: dict) -> dict:
    """Hand-made malformed videos: GOP structure, anchors and predictor settings."""
    base = valid["valid-064x048x09-q1-video.ulb"]
    prefix, chunks = dc.split_chunks(base)
    head, gops, anchors = chunks[0][1], chunks[1][1], [c[1] for c in chunks[2:]]
    fields = dc.parse_head(head)

    def file(*raw_chunks: bytes) -> bytes:
        return prefix + b"".join(raw_chunks)

    def H(**kw) -> bytes:  # noqa: N802
        return raw_chunk(b"HEAD", dc.encode_head(dict(fields, **kw)))

    params = dict(fields["params"])
    A = [raw_chunk(b"ANCH", a) for a in anchors]
    G = raw_chunk(b"GOPS", gops)
    n = len(chunks) - 1

    def gop(*segments) -> bytes:  # segments: (k, [round values])
        out = bs.write_uvarint(len(segments))
        for k, rounds in segments:
            out += bs.write_uvarint(k) + bs.write_uvarint(len(rounds)) + b"".join(map(bs.write_uvarint, rounds))
        return raw_chunk(b"GOPS", out)

    return {
        "edge-video-no-gops.ulb": file(H(count=n - 1), *A),
        "edge-video-two-gops.ulb": file(H(count=n + 1), G, G, *A),
        "edge-video-anchor-missing.ulb": file(H(count=n - 1), G, *A[:-1]),
        "edge-video-extra-anchor.ulb": file(H(count=n + 1), G, *A, A[0]),
        "edge-video-gops-frames-short.ulb": file(H(frames=fields["frames"] + 1), G, *A),
        "edge-video-round-too-long.ulb": file(H(count=2), gop((1, [7 << 1])), A[0]),  # P = 3
        "edge-video-round-before-k-frames.ulb": file(H(frames=3, count=2), gop((1, [2 << 1])), A[0]),
        "edge-video-round-zero.ulb": file(H(count=2), gop((1, [0])), A[0]),
        "edge-video-anchored-no-level.ulb": file(H(frames=5, count=4), gop((2, [1 << 1 | 1, 2 << 1])),
                                                 A[0], A[1], A[0]),
        "edge-video-k-mismatch.ulb": file(H(params=sorted({**params, bs.PARAM_IDS["cond_frames"]: 3}.items())), G, *A),
        "edge-video-steps-zero.ulb": file(H(params=sorted({**params, bs.PARAM_IDS["steps"]: 0}.items())), G, *A),
        "edge-video-image-model.ulb": file(H(digest=b"\0" * 8), G, *A),
        "edge-video-gops-empty.ulb": file(H(), raw_chunk(b"GOPS", b""), *A),
        # decode-work budget (bitstream.check_work), refused before any frame is decoded:
        # a run of predicted frames longer than the header's max_gop; max_gop over 4096;
        # the one round of 1,048,574 frames (P in the header 2^20, K=2); 2^20 frames
        # declared (work over the default --max-pixels)
        "edge-video-run-over-max-gop.ulb": file(H(params=sorted({**params, bs.PARAM_IDS["max_gop"]: 2}.items())),
                                                G, *A),
        "edge-video-max-gop-4097.ulb": file(H(params=sorted({**params, bs.PARAM_IDS["max_gop"]: 4097}.items())),
                                            G, *A),
        "edge-video-round-of-2e20-frames.ulb": file(
            H(frames=1 << 20, count=3, params=sorted({**params, bs.PARAM_IDS["pred_frames"]: 1 << 20}.items())),
            gop((2, [((1 << 20) - 2) << 1])), A[0], A[1]),
        "edge-video-2e20-frames-declared.ulb": file(H(frames=1 << 20), G, *A),
        # valid, decodes: the first round (frames 2-4) anchored, its anchor a copy of the
        # first keyframe's, at the keyframes' level (random models never make one themselves)
        "edge-video-anchored-round.ulb": file(
            H(frames=5, count=4, params=sorted({**params, bs.PARAM_IDS["anchor_level"]: fields["rate_level"],
                                                  bs.PARAM_IDS["guide_timestep"]: 600}.items())),
            gop((2, [3 << 1 | 1])), A[0], A[1], A[0]),
        **inter_edge_cases(valid["valid-064x048x06-q2-video.ulb"]),
    }


def inter_edge_cases(base: bytes) -> dict:
    """Hand-made malformed P frames (GOP syntax 3): INTR chunks against the GOP units; and
    the same P frames from the last keyframe (GOP syntax 4, valid), or so marked in a
    syntax-3 file (refused)."""
    container = Container.from_bytes(base)
    gops = bs.video_gops(container)
    head, chunks = container.header, container.chunks
    inter = next(i for i, c in enumerate(chunks) if c.type == bs.CHUNK_INTER)
    frames = bs.pframe_parts(container, gops)
    coded = [f for f in frames if f is not None]

    def with_chunks(new) -> bytes:
        return Container(head, new).to_bytes()

    def with_inter(payload: bytes, ctype: bytes = bs.CHUNK_INTER) -> bytes:
        return with_chunks(chunks[:inter] + [Chunk(ctype, payload)] + chunks[inter + 1:])

    units = [u for _, us in gops.segments for u in us]
    first = next(i for i, u in enumerate(units) if u.motion)
    motion, residual = bs.split_inter_frame(frames[first], units[first])
    bad_spacing = list(coded)
    bad_spacing[sum(f is not None for f in frames[:first])] = bs.inter_frame_bytes(
        bs.MotionPayload(8, motion.tables, motion.string), residual)
    long_term = bs.GopStructure([(k, [u._replace(long_term=True) if isinstance(u, bs.PFrame) and not u.forecast
                                      else u for u in us]) for k, us in gops.segments])
    gops_at = next(i for i, c in enumerate(chunks) if c.type == bs.CHUNK_GOPS)
    with_long_term = chunks[:gops_at] + [Chunk(bs.CHUNK_GOPS, long_term.to_bytes())] + chunks[gops_at + 1:]
    return {
        "edge-video-long-term.ulb": Container(
            dataclasses.replace(head, params={**head.params, "gop_syntax": bs.GOP_SYNTAX_LONG_TERM}),
            with_long_term).to_bytes(),
        "edge-video-long-term-in-syntax-3.ulb": with_chunks(with_long_term),
        "edge-video-intr-missing.ulb": with_chunks(chunks[:inter] + chunks[inter + 1:]),
        "edge-video-intr-trailing.ulb": with_inter(bs.inter_chunk(coded) + b"\0"),
        "edge-video-intr-short.ulb": with_inter(bs.inter_chunk(coded[:-1])),
        "edge-video-intr-as-pfrm.ulb": with_inter(bs.inter_chunk(coded), bs.CHUNK_PFRAME),
        "edge-video-motion-spacing-8.ulb": with_inter(bs.inter_chunk(bad_spacing)),
        "edge-video-motion-huge-length.ulb": with_inter(bs.write_uvarint(1 << 40) + bs.inter_chunk(coded)),
    }


def crash_reproducers(codec, digest: bytes) -> dict:
    """Hand-made reproducers of the findings (docs/robustness.md); see fuzz/crashes/README.md."""
    def image_file(width, height, z, y, check=0, params=None) -> bytes:
        header = Header(bs.MEDIA_IMAGE, width, height, digest, 1, params=params or {})
        cw, ch = -(-width // (params or {}).get("downscale", 1)), -(-height // (params or {}).get("downscale", 1))
        payload = AnchorPayload((-(-ch // 64), -(-cw // 64)), z, y, check)
        return Container(header, [Chunk(bs.CHUNK_ANCHOR, payload.to_bytes())]).to_bytes()

    # A valid 4096x1024 stream relabelled 32768x8192 with downscale 8: an 11 KB file that
    # decodes to 268 MP (upscale bomb); and the same header class at full size, 82 bytes.
    flat = np.full((1024, 4096, 3), 128, np.uint8)
    coded = Container.from_bytes(codec.encode(flat, 1).data)
    header = Header(bs.MEDIA_IMAGE, 32768, 8192, digest, 1, params={"downscale": 8})
    return {
        "rans-overread-empty-z-2048x2048.ulb": image_file(2048, 2048, b"", b""),
        "rans-overread-short-z-2048x2048.ulb": image_file(2048, 2048, b"\0" * 8, b"\0" * 16),
        # the same short z, with y filled up to the format's minimum anchor size (1024 bytes):
        # it reaches the rANS decoder, and crashed it (SIGSEGV) without rans_safe's padding
        "rans-overread-short-z-sized-2048x2048.ulb": image_file(2048, 2048, b"\0" * 8, b"\0" * 1016),
        "size-bomb-32768x8192.ulb": image_file(32768, 8192, b"\0" * 16, b"\0" * 16),
        "size-bomb-downscale8-valid-stream.ulb": Container(header, coded.chunks).to_bytes(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description="write the fuzz seed corpus")
    ap.add_argument("--out", type=Path, default=dc.CORPUS_DIR)
    ap.add_argument("--crashes", action="store_true", help="also write the hand-made reproducers to fuzz/crashes/")
    args = ap.parse_args()
    decoders = dc.build_codec(Path(tempfile.mkdtemp(prefix="ulbc-seeds-")) / dc.FUZZ_MODEL_NAME)
    codec, digest = decoders.image, decoders.image.package.short_digest
    valid = {}
    for i, (w, h, level, down, content) in enumerate(VALID):
        data = codec.encode(image(w, h, content, seed=i), level, down).data
        name = f"valid-{w:03d}x{h:03d}-q{level}-f{down}-{content}.ulb"
        valid[name] = data
    videos = {}
    for w, h, n, level, settings in VALID_VIDEOS:
        data, gops = decoders.video.encode(iter(clip(w, h, n)), Fraction(25),
                                           VideoSettings(rate_level=level, **settings))
        videos[f"valid-{w:03d}x{h:03d}x{n:02d}-q{level}-video.ulb"] = data
        print(f"video {w}x{h}x{n}: {gops.frame_types()}, {len(data)} bytes")
    files = {**valid, **videos, **edge_cases(valid, digest), **video_edge_cases(videos)}
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    total = sum(len(d) for d in files.values())
    print(f"wrote {len(files)} seeds, {total} bytes, to {args.out}")
    if args.crashes:
        dc.CRASHES_DIR.mkdir(exist_ok=True)
        for name, data in crash_reproducers(codec, digest).items():
            (dc.CRASHES_DIR / name).write_bytes(data)
            print(f"wrote {dc.CRASHES_DIR / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
