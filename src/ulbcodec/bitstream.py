"""The ``.ulb`` container: a versioned, chunked, CRC-checked file format.

Layout (specified byte by byte in docs/bitstream.md)::

    +-------+---------+----------------------------------------+-----+
    | magic | version | chunk | chunk | ...                    | EOF |
    | "ULB" |  1 byte | len(varint) type(4 ASCII) payload crc32|     |
    +-------+---------+----------------------------------------+-----+

Chunks follow PNG's conventions: the type is four ASCII letters, an upper-case first
letter marks a *critical* chunk (a reader that does not know it must refuse the file), a
lower-case first letter an *ancillary* one (skipped when unknown). The CRC32 covers type
and payload. Lengths are LEB128 varints rather than PNG's 4-byte integers because at
0.005 bpp a 768x512 image is ~250 bytes in all and every byte of framing is paid for.

The reader is strict and bounded: every length is checked against the bytes actually
left in the file and against the limits below *before* anything is allocated, and every
failure raises :class:`BitstreamError` with one human-readable line.
"""

from __future__ import annotations

import os
from fractions import Fraction
import struct
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from ulbcodec.errors import BitstreamError

MAGIC = b"ULB"
VERSION = 1

# Documented limits (docs/bitstream.md). A header that exceeds them is refused before any
# buffer of that size exists.
MAX_SIDE = 32768
MAX_PIXELS = 1 << 28  # 268 MP per frame
MAX_FRAMES = 1 << 20
MAX_CHUNK_BYTES = 1 << 30
MAX_CHUNKS = 1 << 16
MAX_PARAMS = 64
MODEL_DIGEST_BYTES = 8
# An ANCH payload's z and y strings hold at least one byte per this many coded pixels.
# Without it a 60-byte file could declare 32768x8192 and start a full-size entropy
# decode (docs/robustness.md, size bombs): the decoder refuses such a file before any
# decoding, and the encoder pads y with zero bytes, which the rANS decoder never reads,
# on the rare image that codes smaller (flat images code at ~1000 px/byte with
# models/default, so the rule costs nothing in practice).
MAX_CODED_PIXELS_PER_ANCHOR_BYTE = 4096
# Video: the longest run of predicted frames (rounds and P frames) between keyframes
# (header ``max_gop``, checked against every GOPS segment), K conditioning frames and P
# frames predicted per round. Predicted frames cost no bits, so these bound the frames a
# file may declare per byte: at most 1 + MAX_GOP frames per anchor chunk.
MAX_GOP = 4096
MAX_COND_FRAMES = 64
MAX_PRED_FRAMES = 256
# Decoder limits, not format rules (`ulbc decode --max-pixels`, like libavif's and
# libwebp's): the decoded pixels of one file (frames x width x height) and those pixels
# per byte of the file. `--max-pixels none` lifts both.
DEFAULT_MAX_PIXELS = 1 << 32  # 4.3 Gpx: 2,000 frames of 1080p, 65,536 of 256x256 or smaller
MAX_PIXELS_PER_FILE_BYTE = 1 << 22
# A video frame costs at least the work of a 256x256 one (a prediction round runs the
# predictor whatever the frame size), so that a small file of many tiny frames counts.
FRAME_WORK_FLOOR = 1 << 16

DOWNSCALES = (1, 2, 4, 8)

MEDIA_IMAGE = 0
MEDIA_VIDEO = 1
MEDIA_KINDS = {MEDIA_IMAGE: "image", MEDIA_VIDEO: "video"}




# --------------------------------------------------------------------------- varints


def write_uvarint(value: int) -> bytes:
    """Unsigned LEB128."""
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class Reader:
    """Bounds-checked cursor over a bytes object; every read fails cleanly past the end."""

    def __init__(self, data: bytes, what: str = "file"):
        self.data = data
        self.pos = 0
        self.what = what

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise BitstreamError(f"truncated {self.what}: needs {n} more bytes, {self.remaining} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def uvarint(self, max_bytes: int = 10) -> int:
        value = 0
        for i in range(max_bytes):
            byte = self.u8()
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                return value
        raise BitstreamError(f"malformed varint in {self.what}")

    def bytes_with_length(self, limit: int) -> bytes:
        n = self.uvarint()
        if n > limit:
            raise BitstreamError(f"field of {n} bytes in {self.what} exceeds the limit of {limit}")
        return self.take(n)

    def expect_end(self) -> None:
        if self.remaining:
            raise BitstreamError(f"{self.remaining} unexpected trailing bytes in {self.what}")


# --------------------------------------------------------------------------- header


# Codec parameters are (id, unsigned integer) pairs so that new parameters never change
# the header layout. Ids are fixed forever once released; docs/bitstream.md lists them.
PARAM_IDS: Dict[str, int] = {
    "tile": 1,  # reserved
    "downscale": 2,  # image: coded at 1/f size, upsampled by the decoder (absent = 1)
    "level_milli": 3,  # image: exact (fractional) operating point, rate level x 1000 (absent = rate_level)
    "threshold_milli": 16,  # video: accepted perceptual distance x 1000
    "metric": 17,  # video: distance metric id
    "cond_frames": 18,  # video: K conditioning frames
    "pred_frames": 19,  # video: P frames predicted per round
    "steps": 20,  # video/generative: sampler steps
    "max_gop": 21,  # video: longest run of predicted frames
    "keyframe_decoder": 22,  # video: 0 anchor frames as keyframes, 1 generative decoding
    "anchor_level": 23,  # video: rate level of the anchors of anchored rounds
    "guide_timestep": 24,  # video: anchored rounds start denoising the anchor at this timestep
    "pframe_level": 25,  # video: rate level of the P frames (PFRM or INTR chunks)
    "gop_syntax": 26,  # video: 2 = GOPS units may be P frames, 3 = with motion, 4 = long-term, 5 = fused
    # (absent = 1: rounds)
}
PARAM_NAMES = {v: k for k, v in PARAM_IDS.items()}


@dataclass
class Header:
    """Everything a decoder needs besides the payload chunks and the model weights."""

    media: int
    width: int
    height: int
    model_digest: bytes
    rate_level: int = 0
    frames: int = 1
    fps_num: int = 0
    fps_den: int = 1
    seed: int = 0
    params: Dict[str, int] = field(default_factory=dict)

    @property
    def media_name(self) -> str:
        return MEDIA_KINDS.get(self.media, f"unknown({self.media})")

    @property
    def fps(self) -> float:
        return self.fps_num / self.fps_den if self.fps_den else 0.0

    @property
    def fps_fraction(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def validate(self) -> None:
        if self.media not in MEDIA_KINDS:
            raise BitstreamError(f"unknown media kind {self.media}")
        for name, value in (("width", self.width), ("height", self.height)):
            if not 1 <= value <= MAX_SIDE:
                raise BitstreamError(f"{name} {value} outside the supported range 1..{MAX_SIDE}")
        if self.width * self.height > MAX_PIXELS:
            raise BitstreamError(
                f"{self.width}x{self.height} exceeds the limit of {MAX_PIXELS} pixels per frame"
            )
        if not 1 <= self.frames <= MAX_FRAMES:
            raise BitstreamError(f"frame count {self.frames} outside 1..{MAX_FRAMES}")
        if self.media == MEDIA_IMAGE and self.frames != 1:
            raise BitstreamError(f"an image has exactly one frame, header says {self.frames}")
        if self.fps_den == 0:
            raise BitstreamError("frame rate denominator is zero")
        if len(self.model_digest) != MODEL_DIGEST_BYTES:
            raise BitstreamError(f"model digest must be {MODEL_DIGEST_BYTES} bytes")
        if not 0 <= self.rate_level <= 255:
            raise BitstreamError(f"rate level {self.rate_level} outside 0..255")
        if len(self.params) > MAX_PARAMS:
            raise BitstreamError(f"{len(self.params)} codec parameters exceed the limit of {MAX_PARAMS}")
        if self.params.get("downscale", 1) not in DOWNSCALES:
            raise BitstreamError(f"downscale factor {self.params['downscale']} is not one of {DOWNSCALES}")
        if "level_milli" in self.params and self.params["level_milli"] // 1000 != self.rate_level:
            raise BitstreamError(f"operating point {self.params['level_milli'] / 1000:g} does not lie in "
                                 f"[{self.rate_level}, {self.rate_level + 1}) of rate level {self.rate_level}")

    @property
    def operating_level(self) -> float:
        """The exact rate level: ``level_milli / 1000`` when the file has one, else ``rate_level``."""
        milli = self.params.get("level_milli")
        return self.rate_level if milli is None else milli / 1000

    def to_bytes(self) -> bytes:
        self.validate()
        out = bytearray([self.media])
        for value in (self.width, self.height, self.frames, self.fps_num, self.fps_den):
            out += write_uvarint(value)
        out += self.model_digest
        out.append(self.rate_level)
        out += write_uvarint(self.seed)
        out += write_uvarint(len(self.params))
        for name, value in sorted(self.params.items(), key=lambda kv: PARAM_IDS[kv[0]]):
            out += write_uvarint(PARAM_IDS[name]) + write_uvarint(int(value))
        return bytes(out)

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Header":
        r = Reader(payload, "header chunk")
        header = cls.read(r)
        r.expect_end()
        return header

    @classmethod
    def read(cls, r: Reader) -> "Header":
        media = r.u8()
        width, height, frames, fps_num, fps_den = (r.uvarint() for _ in range(5))
        digest = r.take(MODEL_DIGEST_BYTES)
        rate_level = r.u8()
        seed = r.uvarint()
        count = r.uvarint()
        if count > MAX_PARAMS:
            raise BitstreamError(f"{count} codec parameters exceed the limit of {MAX_PARAMS}")
        params = {}
        for _ in range(count):
            pid, value = r.uvarint(), r.uvarint()
            if pid not in PARAM_NAMES:
                raise BitstreamError(f"unknown codec parameter id {pid}")
            params[PARAM_NAMES[pid]] = value
        header = cls(media, width, height, digest, rate_level, frames, fps_num, fps_den, seed, params)
        header.validate()
        return header

    def as_dict(self) -> dict:
        return {
            "media": self.media_name,
            "width": self.width,
            "height": self.height,
            "frames": self.frames,
            "fps": f"{self.fps_num}/{self.fps_den}",
            "model_digest": self.model_digest.hex(),
            "rate_level": self.rate_level,
            "seed": self.seed,
            "params": dict(self.params),
        }


# --------------------------------------------------------------------------- chunks

CHUNK_HEADER = b"HEAD"
CHUNK_ANCHOR = b"ANCH"  # one entropy-coded anchor latent (image, or one video keyframe)
CHUNK_GOPS = b"GOPS"  # video: which frames are keyframes, which predicted, round by round
CHUNK_PFRAME = b"PFRM"  # video (GOP syntax 2): one conditionally coded P frame (same layout as ANCH)
CHUNK_INTER = b"INTR"  # video (GOP syntax 3): the inter frames of one GOP segment
CHUNK_COLOR = b"colr"  # ancillary: the original's colour statistics, 12 bytes (ulbcodec/color_stats.py)
KNOWN_CRITICAL = {CHUNK_HEADER, CHUNK_ANCHOR, CHUNK_GOPS, CHUNK_PFRAME, CHUNK_INTER}


@dataclass
class Chunk:
    type: bytes
    payload: bytes
    offset: int = 0  # byte offset of the chunk in the file (for `ulbc info`)

    @property
    def critical(self) -> bool:
        return self.type[:1].isupper()

    @property
    def size(self) -> int:
        """Bytes the chunk occupies in the file, framing included."""
        return len(write_uvarint(len(self.payload))) + 4 + len(self.payload) + 4


def _check_type(ctype: bytes) -> None:
    if len(ctype) != 4 or not all(65 <= c <= 90 or 97 <= c <= 122 for c in ctype):
        raise BitstreamError(f"invalid chunk type {ctype!r}")


def encode_chunk(ctype: bytes, payload: bytes) -> bytes:
    _check_type(ctype)
    crc = zlib.crc32(ctype + payload) & 0xFFFFFFFF
    return write_uvarint(len(payload)) + ctype + payload + struct.pack(">I", crc)


def iter_chunks(data: bytes) -> Iterator[Chunk]:
    """Parse the chunks after the magic/version prefix; strict, bounded."""
    r = Reader(data, "file")
    r.take(len(MAGIC) + 1)
    count = 0
    while r.remaining:
        offset = r.pos
        count += 1
        if count > MAX_CHUNKS:
            raise BitstreamError(f"more than {MAX_CHUNKS} chunks")
        length = r.uvarint(max_bytes=5)
        if length > MAX_CHUNK_BYTES:
            raise BitstreamError(f"chunk of {length} bytes exceeds the limit of {MAX_CHUNK_BYTES}")
        if length + 8 > r.remaining:
            raise BitstreamError(
                f"truncated file: chunk at byte {offset} needs {length + 8} bytes, {r.remaining} left"
            )
        ctype = r.take(4)
        _check_type(ctype)
        payload = r.take(length)
        (crc,) = struct.unpack(">I", r.take(4))
        if zlib.crc32(ctype + payload) & 0xFFFFFFFF != crc:
            raise BitstreamError(f"corrupted file: CRC mismatch in chunk {ctype.decode()} at byte {offset}")
        yield Chunk(ctype, payload, offset)


@dataclass
class Container:
    """A parsed .ulb file: the header plus the remaining chunks in file order."""

    header: Header
    chunks: List[Chunk]
    header_chunk: Optional[Chunk] = None
    version: int = VERSION
    total_bytes: int = 0

    def find(self, ctype: bytes) -> List[Chunk]:
        return [c for c in self.chunks if c.type == ctype]

    def to_bytes(self) -> bytes:
        out = bytearray(MAGIC + bytes([VERSION]))
        # The HEAD chunk ends with the number of chunks that follow, so that a file cut
        # exactly at a chunk boundary is still recognised as truncated.
        out += encode_chunk(CHUNK_HEADER, self.header.to_bytes() + write_uvarint(len(self.chunks)))
        for chunk in self.chunks:
            out += encode_chunk(chunk.type, chunk.payload)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Container":
        if len(data) < len(MAGIC) + 1 or data[: len(MAGIC)] != MAGIC:
            raise BitstreamError("not a .ulb file (wrong magic bytes)")
        version = data[len(MAGIC)]
        if version > VERSION:
            raise BitstreamError(
                f"file format version {version} is newer than this ulbc supports ({VERSION}); upgrade ulbc"
            )
        if version < 1:
            raise BitstreamError(f"invalid file format version {version}")
        header_chunk, header, chunks = None, None, []
        for chunk in iter_chunks(data):
            if header is None:
                if chunk.type != CHUNK_HEADER:
                    raise BitstreamError(f"first chunk must be HEAD, found {chunk.type.decode()}")
                r = Reader(chunk.payload, "header chunk")
                header_chunk, header = chunk, Header.read(r)
                expected = r.uvarint()
                r.expect_end()
                if expected > MAX_CHUNKS:
                    raise BitstreamError(f"header announces {expected} chunks, more than {MAX_CHUNKS}")
                continue
            if chunk.type == CHUNK_HEADER:
                raise BitstreamError("duplicated HEAD chunk")
            if chunk.critical and chunk.type not in KNOWN_CRITICAL:
                raise BitstreamError(f"unknown critical chunk {chunk.type.decode()}; upgrade ulbc")
            chunks.append(chunk)  # unknown ancillary chunks are kept but never interpreted
        if header is None:
            raise BitstreamError("truncated file: no header chunk")
        if len(chunks) != expected:
            raise BitstreamError(f"truncated file: header announces {expected} chunks, found {len(chunks)}")
        return cls(header, chunks, header_chunk, version, len(data))


# --------------------------------------------------------------------------- anchor payload


@dataclass
class AnchorPayload:
    """One entropy-coded anchor latent: z (hyper-latent) and y strings, z's spatial shape,
    and a 16-bit check of the decoded y symbols so that an entropy-decoding desync (float
    drift across machines) is detected instead of producing garbage."""

    z_shape: Tuple[int, int]
    z_string: bytes
    y_string: bytes
    symbols_check: int

    pixels_per_byte = MAX_CODED_PIXELS_PER_ANCHOR_BYTE
    what = "anchor"

    @classmethod
    def min_string_bytes(cls, width: int, height: int) -> int:
        """The fewest z + y bytes a payload of a width x height coded image may have."""
        return -(-width * height // cls.pixels_per_byte)

    def padded_for(self, width: int, height: int) -> "AnchorPayload":
        """This payload with y padded by zero bytes up to ``min_string_bytes`` (the rANS
        decoder stops after the last symbol and never reads them)."""
        short = self.min_string_bytes(width, height) - len(self.z_string) - len(self.y_string)
        return self if short <= 0 else type(self)(self.z_shape, self.z_string, self.y_string + bytes(short),
                                                  self.symbols_check)

    def check_size(self, width: int, height: int) -> None:
        """Refuse a payload too small for the coded size it is decoded at, before any work."""
        have, need = len(self.z_string) + len(self.y_string), self.min_string_bytes(width, height)
        if have < need:
            raise BitstreamError(
                f"{self.what} strings of {have} bytes cannot describe a {width}x{height} coded image "
                f"(at least {need}: one byte per {self.pixels_per_byte} coded pixels)"
            )

    def to_bytes(self) -> bytes:
        return (
            write_uvarint(self.z_shape[0])
            + write_uvarint(self.z_shape[1])
            + write_uvarint(len(self.z_string))
            + self.z_string
            + struct.pack(">H", self.symbols_check & 0xFFFF)
            + self.y_string
        )

    @classmethod
    def from_bytes(cls, payload: bytes, max_side: int = MAX_SIDE) -> "AnchorPayload":
        r = Reader(payload, f"{cls.what} chunk")
        zh, zw = r.uvarint(), r.uvarint()
        if not (1 <= zh <= max_side and 1 <= zw <= max_side):
            raise BitstreamError(f"hyper-latent shape {zh}x{zw} is out of range")
        z_string = r.bytes_with_length(len(payload))
        (check,) = struct.unpack(">H", r.take(2))
        y_string = r.take(r.remaining)
        return cls((zh, zw), z_string, y_string, check)


class PFramePayload(AnchorPayload):
    """One conditionally coded P frame (:mod:`ulbcodec.models.pframe_codec`): the same
    fields as an anchor. A P frame of a static scene codes to a few bytes, so its floor is
    one byte per 65536 coded pixels (an anchor's is one per 4096); the decoder's work per
    P frame is one frame, which the header's size already bounds."""

    pixels_per_byte = 1 << 16
    what = "P-frame"


@dataclass
class MotionPayload:
    """A P frame's coded motion field (:mod:`ulbcodec.motion`): node spacing in pixels,
    the two rANS table indices (x << 4 | y), and the rANS string of the vector differences."""

    spacing: int
    tables: int
    string: bytes

    def to_bytes(self) -> bytes:
        return bytes([self.spacing, self.tables]) + self.string

    @classmethod
    def from_bytes(cls, payload: bytes) -> "MotionPayload":
        r = Reader(payload, "motion field")
        spacing, tables = r.u8(), r.u8()
        return cls(spacing, tables, r.take(r.remaining))


class InterFrameParts(NamedTuple):
    """The coded parts of one inter frame, None where its unit has no such part: the
    motion field, the skipped-block map (:mod:`ulbcodec.entropy.block_flags` bytes: one
    flag per block of the P-frame codec's latent positions, raster order) and the residual."""

    motion: Optional[MotionPayload]
    skip_map: Optional[bytes]
    residual: Optional[PFramePayload]


def inter_frame_bytes(parts: InterFrameParts) -> bytes:
    """One inter frame's coded parts: the motion field and the skipped-block map (each
    uvarint length first) where the unit has them, then the residual's payload where it
    has one (a PFRM chunk's payload, or one frame's entry in an INTR chunk)."""
    out = b""
    if parts.motion is not None:
        field = parts.motion.to_bytes()
        out += write_uvarint(len(field)) + field
    if parts.skip_map is not None:
        out += write_uvarint(len(parts.skip_map)) + parts.skip_map
    return out + (parts.residual.to_bytes() if parts.residual is not None else b"")


def split_inter_frame(payload: bytes, unit: "PFrame") -> InterFrameParts:
    """The parts of an inter frame's bytes that ``unit`` announces (the inverse of
    :func:`inter_frame_bytes`)."""
    r = Reader(payload, "inter frame")
    motion = MotionPayload.from_bytes(r.bytes_with_length(len(payload))) if unit.motion else None
    skip_map = r.bytes_with_length(len(payload)) if unit.skip_blocks else None
    payload = r.take(r.remaining)
    if not unit.residual:
        if payload:
            raise BitstreamError(f"{len(payload)} unexpected trailing bytes in a motion-only inter frame")
        return InterFrameParts(motion, skip_map, None)
    return InterFrameParts(motion, skip_map, PFramePayload.from_bytes(payload))


def inter_chunk(frames: Sequence[bytes]) -> bytes:
    """An INTR chunk's payload: each inter frame's parts (:func:`inter_frame_bytes`), uvarint length first."""
    return b"".join(write_uvarint(len(f)) + f for f in frames)


def pframe_parts(container: "Container", gops: "GopStructure") -> List[Optional[bytes]]:
    """Each P unit's coded parts in frame order (None for a repeat), from the PFRM chunks
    (GOP syntax 2, one per P frame) or the INTR chunks (syntax 3, one per segment with
    coded inter frames); the chunk counts and lengths checked against the GOP structure."""
    syntax = container.header.params.get("gop_syntax", GOP_SYNTAX_ROUNDS)
    segments = [[u for u in units if isinstance(u, PFrame)] for _, units in gops.segments]
    pfrm_chunks, inter_chunks = container.find(CHUNK_PFRAME), container.find(CHUNK_INTER)
    if syntax not in INTER_CHUNK_SYNTAXES:
        if inter_chunks or len(pfrm_chunks) != gops.pframes:
            raise BitstreamError(f"GOPS announces {gops.pframes} P frames, the file holds {len(pfrm_chunks)} "
                                 f"PFRM and {len(inter_chunks)} INTR chunks")
        return [c.payload for c in pfrm_chunks]
    coded = [sum(u.has_parts for u in units) for units in segments]
    if pfrm_chunks or len(inter_chunks) != sum(n > 0 for n in coded):
        raise BitstreamError(f"GOPS announces {sum(n > 0 for n in coded)} segments with inter frames, the file "
                             f"holds {len(inter_chunks)} INTR and {len(pfrm_chunks)} PFRM chunks")
    out, chunks = [], iter(inter_chunks)
    for units, n in zip(segments, coded):
        if not n:
            out += [None] * len(units)
            continue
        payload = next(chunks).payload
        r = Reader(payload, "INTR chunk")
        for u in units:
            out.append(r.bytes_with_length(len(payload)) if u.has_parts else None)
        r.expect_end()
    return out


class Round(NamedTuple):
    """One prediction round: how many predicted frames the encoder accepted (1..P), and
    whether the round was guided by a small anchor of its first frame (one ANCH chunk)."""

    accepted: int
    anchored: bool = False


class PFrame(NamedTuple):
    """One inter-coded frame. Its reference is the previous decoded frame, or with
    ``forecast`` the predictor's forecast of this frame (the first frame of a prediction
    round started at it, which the decoder runs), or with ``long_term`` the last decoded
    keyframe (a warp from it blurs less than a chain of warps from frame to frame, each
    of which interpolates again). With ``motion`` the reference is first
    warped along a coded motion field; with ``residual`` the conditional P-frame codec
    codes the frame given that (warped) reference. A unit with either has coded parts
    (:func:`inter_frame_bytes`: a PFRM chunk in GOP syntax 2, an entry of its segment's
    INTR chunk in syntax 3); one with neither repeats its reference at zero bytes. With
    ``fusion_drop`` d > 0 (a residual only) the residual is coded d rate levels below the
    file's P-frame level and the decoder fuses its decode with the (warped) reference
    (:mod:`ulbcodec.models.temporal_fusion`): the reference keeps its detail, the cheap
    residual brings what changed. With ``skip_blocks`` (a residual, not fused) a coded
    map marks blocks that the residual leaves out: there the frame keeps the (warped)
    reference, as a conditional-replenishment codec's skipped blocks do."""

    forecast: bool = False
    motion: bool = False
    residual: bool = True
    long_term: bool = False
    fusion_drop: int = 0
    skip_blocks: bool = False

    @property
    def has_parts(self) -> bool:
        return self.motion or self.residual

    @property
    def parts(self) -> str:
        """Its reference and coded parts as ``ulbc encode -v`` names them, e.g.
        ``long-term+motion`` ("" for a repeat of the previous frame)."""
        return "+".join(n for n, on in (("long-term", self.long_term), ("motion", self.motion),
                                        ("residual", self.residual), (f"fused-{self.fusion_drop}", self.fusion_drop),
                                        ("skip-blocks", self.skip_blocks))
                        if on)

    @property
    def letter(self) -> str:
        """Its letter in :meth:`GopStructure.frame_types`."""
        if self.long_term:
            return "L" if self.has_parts else "l"
        return ("F" if self.forecast else "P") if self.has_parts else "s"


Unit = Union[Round, PFrame]
PFRAME_LETTERS = "PFLsl"  # every letter a PFrame unit can have (PFrame.letter)
GOP_SYNTAX_ROUNDS, GOP_SYNTAX_PFRAMES, GOP_SYNTAX_MOTION, GOP_SYNTAX_LONG_TERM, GOP_SYNTAX_FUSION = 1, 2, 3, 4, 5
GOP_SYNTAX_SKIP_BLOCKS = 6
INTER_CHUNK_SYNTAXES = (GOP_SYNTAX_MOTION, GOP_SYNTAX_LONG_TERM, GOP_SYNTAX_FUSION,
                        GOP_SYNTAX_SKIP_BLOCKS)  # inter frames in INTR chunks
MAX_FUSION_DROP = 7  # rate levels between a fused P frame's residual and the file's P-frame level
_UNIT_ROUND, _UNIT_ANCHORED, _UNIT_PFRAME, _UNIT_FORECAST = range(4)


@dataclass
class GopStructure:
    """The frame types of a video, as segments: ``k`` keyframes (coded, one ANCH chunk
    each, in frame order) followed by units: prediction rounds (:class:`Round`) and
    P frames (:class:`PFrame`: PFRM chunks, or INTR chunks with motion). A round starting at frame i draws its
    noise from (stream seed, i) alone, so the decoder replays exactly the accepted rounds.
    An anchored round's ANCH chunk stands, in frame order, among the keyframes' chunks.

    Payload: uvarint segment count, then per segment uvarint k, uvarint unit count, and one
    uvarint per unit. Syntax 1 (files before P frames; header without ``gop_syntax``):
    ``accepted << 1 | anchored``. Syntax 2: ``value << 2 | kind`` with kind 0 a round and
    1 an anchored round (value = accepted), 2 a P frame and 3 a forecast-conditioned
    P frame (value = 0: a residual, no motion). Syntax 3 (motion): as 2, with a P frame's
    value ``motion | residual << 1``. Syntax 4 (long-term reference): as 3, with
    ``| long_term << 2`` (not on a forecast-conditioned P frame). Syntax 5 (fused P
    frames): as 4, with ``| fusion_drop << 3`` (0..7, nonzero only with a residual).
    Syntax 6 (skipped blocks): as 5, with ``| skip_blocks << 6`` (only with a residual and
    no fusion).
    """

    segments: List[Tuple[int, List[Unit]]]

    @property
    def frames(self) -> int:
        return sum(k + sum(_unit_frames(u) for u in units) for k, units in self.segments)

    @property
    def keyframes(self) -> int:
        return sum(k for k, _ in self.segments)

    @property
    def anchored_rounds(self) -> int:
        return sum(isinstance(u, Round) and u.anchored for _, units in self.segments for u in units)

    def pframe_units(self) -> List[PFrame]:
        """Every P-frame unit, in frame order."""
        return [u for _, units in self.segments for u in units if isinstance(u, PFrame)]

    @property
    def pframes(self) -> int:
        return len(self.pframe_units())

    @property
    def predicted_frames(self) -> int:
        return sum(u.accepted for _, units in self.segments for u in units if isinstance(u, Round))

    @property
    def coded_inter_frames(self) -> int:
        return sum(u.has_parts for u in self.pframe_units())

    @property
    def residual_frames(self) -> int:
        """P frames whose parts include the P-frame codec's residual (the others warp or repeat)."""
        return sum(u.residual for u in self.pframe_units())

    @property
    def fused_frames(self) -> int:
        """P frames whose residual's decode is fused with their reference."""
        return sum(u.fusion_drop > 0 for u in self.pframe_units())

    @property
    def skip_block_frames(self) -> int:
        """P frames whose residual leaves blocks to the reference."""
        return sum(u.skip_blocks for u in self.pframe_units())

    @property
    def syntax(self) -> int:
        """The oldest syntax that holds these units (files that need no motion stay readable
        by ulbc versions before it)."""
        units = self.pframe_units()
        if any(u.skip_blocks for u in units):
            return GOP_SYNTAX_SKIP_BLOCKS
        if any(u.fusion_drop for u in units):
            return GOP_SYNTAX_FUSION
        if any(u.long_term for u in units):
            return GOP_SYNTAX_LONG_TERM
        if any(u.motion or not u.residual for u in units):
            return GOP_SYNTAX_MOTION
        return GOP_SYNTAX_PFRAMES if units else GOP_SYNTAX_ROUNDS

    def frame_types(self) -> str:
        """One letter per frame, capitals for frames that cost bits: K keyframe, P P frame,
        F P frame conditioned on the predictor's forecast, L P frame from the last
        keyframe, p predicted (zero bits), A the first frame of an anchored round
        (predicted, guided by a small anchor), s a repeated reference and l a repeated
        last keyframe (zero bytes)."""
        out = []
        for k, units in self.segments:
            out.append("K" * k)
            for u in units:
                if isinstance(u, PFrame):
                    out.append(u.letter)
                else:
                    out.append(("A" if u.anchored else "p") + "p" * (u.accepted - 1))
        return "".join(out)

    def to_bytes(self, syntax: Optional[int] = None) -> bytes:
        syntax = self.syntax if syntax is None else syntax
        if syntax == GOP_SYNTAX_ROUNDS and self.pframes:
            raise ValueError("GOP syntax 1 cannot hold P frames")
        out = bytearray(write_uvarint(len(self.segments)))
        for k, units in self.segments:
            out += write_uvarint(k) + write_uvarint(len(units))
            for u in units:
                if syntax == GOP_SYNTAX_ROUNDS:
                    out += write_uvarint(u.accepted << 1 | int(u.anchored))
                elif isinstance(u, PFrame):
                    value = int(u.motion) | int(u.residual) << 1 | int(u.long_term) << 2 | u.fusion_drop << 3 \
                        | int(u.skip_blocks) << 6 if syntax in INTER_CHUNK_SYNTAXES else 0
                    if syntax == GOP_SYNTAX_PFRAMES and (u.motion or not u.residual):
                        raise ValueError("GOP syntax 2 cannot hold motion or repeated frames")
                    if u.long_term and (syntax < GOP_SYNTAX_LONG_TERM or u.forecast):
                        raise ValueError(f"GOP syntax {syntax} cannot hold this long-term P frame")
                    if u.fusion_drop and (syntax < GOP_SYNTAX_FUSION or not u.residual
                                          or not 0 < u.fusion_drop <= MAX_FUSION_DROP):
                        raise ValueError(f"GOP syntax {syntax} cannot hold this fused P frame")
                    if u.skip_blocks and (syntax < GOP_SYNTAX_SKIP_BLOCKS or not u.residual or u.fusion_drop):
                        raise ValueError(f"GOP syntax {syntax} cannot hold this P frame with skipped blocks")
                    out += write_uvarint(value << 2 | (_UNIT_FORECAST if u.forecast else _UNIT_PFRAME))
                else:
                    out += write_uvarint(u.accepted << 2 | (_UNIT_ANCHORED if u.anchored else _UNIT_ROUND))
        return bytes(out)

    @classmethod
    def from_bytes(cls, payload: bytes, frames: int, cond_frames: int, pred_frames: int,
                   syntax: int = GOP_SYNTAX_ROUNDS, max_gop: Optional[int] = None) -> "GopStructure":
        """Parse and check against the header: every count bounded by the frame count, and
        with ``max_gop`` every run of predicted frames (a segment's units) by it."""
        if syntax not in (GOP_SYNTAX_ROUNDS, GOP_SYNTAX_PFRAMES, *INTER_CHUNK_SYNTAXES):
            raise BitstreamError(f"unknown GOP syntax {syntax}")
        r = Reader(payload, "GOP chunk")
        count = r.uvarint()
        if not 1 <= count <= frames:
            raise BitstreamError(f"GOP chunk has {count} segments for {frames} frames")
        segments, total = [], 0
        for _ in range(count):
            k, n = r.uvarint(), r.uvarint()
            if not 1 <= k <= cond_frames or n > frames:
                raise BitstreamError(f"GOP segment with {k} keyframes and {n} units is out of range")
            units = [_read_unit(r.uvarint(), syntax) for _ in range(n)]
            rounds = [u.accepted for u in units if isinstance(u, Round)]
            if any(not 1 <= a <= pred_frames for a in rounds):
                raise BitstreamError(f"a prediction round accepts 1..{pred_frames} frames, found "
                                     f"{_abridged(rounds)}")
            run = sum(_unit_frames(u) for u in units)
            if max_gop is not None and run > max_gop:
                raise BitstreamError(f"GOP chunk has a run of {run} predicted frames, the header's max_gop is "
                                     f"{max_gop}")
            total += k + run
            if total > frames:
                raise BitstreamError(f"GOP chunk describes more than the {frames} frames of the header")
            segments.append((k, units))
        r.expect_end()
        if total != frames:
            raise BitstreamError(f"GOP chunk describes {total} frames, the header {frames}")
        return cls(segments)


def _abridged(values: list, keep: int = 8) -> str:
    """A list for an error line: at most ``keep`` items."""
    return str(values) if len(values) <= keep else f"[{', '.join(map(str, values[:keep]))}, ... ({len(values)} in all)]"


def _unit_frames(unit: Unit) -> int:
    return 1 if isinstance(unit, PFrame) else unit.accepted


def _read_unit(value: int, syntax: int) -> Unit:
    if syntax == GOP_SYNTAX_ROUNDS:
        return Round(value >> 1, bool(value & 1))
    kind, rest = value & 3, value >> 2
    if kind in (_UNIT_PFRAME, _UNIT_FORECAST):
        if syntax in INTER_CHUNK_SYNTAXES and rest <= 3:
            return PFrame(kind == _UNIT_FORECAST, bool(rest & 1), bool(rest & 2))
        if syntax >= GOP_SYNTAX_LONG_TERM and rest <= 7 and kind == _UNIT_PFRAME:
            return PFrame(False, bool(rest & 1), bool(rest & 2), True)
        drop = rest >> 3
        if syntax >= GOP_SYNTAX_FUSION and 0 < drop <= MAX_FUSION_DROP and rest & 2 and not (
                kind == _UNIT_FORECAST and rest & 4):
            return PFrame(kind == _UNIT_FORECAST, bool(rest & 1), True, bool(rest & 4), drop)
        if syntax >= GOP_SYNTAX_SKIP_BLOCKS and drop == 8 and rest & 2 and not (kind == _UNIT_FORECAST and rest & 4):
            return PFrame(kind == _UNIT_FORECAST, bool(rest & 1), True, bool(rest & 4), skip_blocks=True)
        if rest:
            raise BitstreamError(f"P-frame unit with an invalid value {rest}")
        return PFrame(kind == _UNIT_FORECAST)
    return Round(rest, kind == _UNIT_ANCHORED)


def video_gops(container: "Container") -> GopStructure:
    """The GOP structure of a video file, checked against its header before any frame is
    decoded: K, P and max_gop in range, one GOPS chunk, every run of predicted frames at
    most max_gop, the frame count exact."""
    h = container.header
    for name, low, high in (("cond_frames", 1, MAX_COND_FRAMES), ("pred_frames", 1, MAX_PRED_FRAMES),
                            ("max_gop", 0, MAX_GOP)):
        if not low <= h.params.get(name, -1) <= high:
            raise BitstreamError(f"video header's {name} {h.params.get(name, 'missing')} outside {low}..{high}")
    chunks = container.find(CHUNK_GOPS)
    if len(chunks) != 1:
        raise BitstreamError(f"a video file needs exactly one GOPS chunk, found {len(chunks)}")
    return GopStructure.from_bytes(chunks[0].payload, h.frames, h.params["cond_frames"], h.params["pred_frames"],
                                   h.params.get("gop_syntax", GOP_SYNTAX_ROUNDS), h.params["max_gop"])


def check_work(container: "Container", max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> int:
    """The decode-work budget of a file, from its header and size alone, before any
    decoding; every refusal is one line. With ``max_pixels`` (None: no limit) the file's
    decoding work, frames x max(width x height, FRAME_WORK_FLOOR) pixels, must be at most
    ``max_pixels`` and at most MAX_PIXELS_PER_FILE_BYTE per byte of the file; a video's
    GOP structure must keep the header's bounds (runs of predicted frames <= max_gop).
    Returns the work in pixels."""
    h = container.header
    work = h.frames * max(h.width * h.height, FRAME_WORK_FLOOR if h.media == MEDIA_VIDEO else 1)
    what = f"{h.frames} frames of {h.width}x{h.height}" if h.media == MEDIA_VIDEO else f"{h.width}x{h.height}"
    if max_pixels is not None and work > max_pixels:
        raise BitstreamError(f"decoding {what} ({work:,} pixels of work) is over the --max-pixels limit of "
                             f"{max_pixels:,}")
    if max_pixels is not None and work > MAX_PIXELS_PER_FILE_BYTE * max(container.total_bytes, 1):
        raise BitstreamError(f"a {container.total_bytes}-byte file declaring {what} ({work:,} pixels of work) is "
                             f"out of proportion to its size (at most {MAX_PIXELS_PER_FILE_BYTE:,} per byte; "
                             "--max-pixels none lifts this)")
    if h.media == MEDIA_VIDEO:
        video_gops(container)
    return work


MAX_FILE_BYTES = MAX_CHUNKS * 16 + MAX_CHUNK_BYTES


def read_file(path) -> Container:
    """Read and parse a .ulb file, with size bounded before and while reading."""
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise BitstreamError(f"file of {size} bytes is larger than any valid .ulb file")
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # a file that grew after the check is still bounded
    if len(data) > MAX_FILE_BYTES:
        raise BitstreamError("file is larger than any valid .ulb file")
    return Container.from_bytes(data)


def describe(container: Container) -> dict:
    """Every header field and each chunk's size: what `ulbc info` prints."""
    h = container.header
    pixels = h.width * h.height * h.frames
    chunks = [
        {"type": "HEAD", "offset": container.header_chunk.offset, "bytes": container.header_chunk.size}
    ] + [{"type": c.type.decode(), "offset": c.offset, "bytes": c.size} for c in container.chunks]
    desc = {
        "version": container.version,
        **h.as_dict(),
        "bytes": container.total_bytes,
        "bpp": container.total_bytes * 8 / pixels,
        "chunks": chunks,
    }
    colors = container.find(CHUNK_COLOR)
    if len(colors) == 1:
        from ulbcodec.color_stats import ColorStats

        try:
            desc["color_stats"] = ColorStats.from_bytes(colors[0].payload).as_dict()
        except BitstreamError as exc:  # describe what is there; decoding refuses it
            desc["color_stats"] = {"error": str(exc)}
    if h.media == MEDIA_VIDEO:
        try:
            structure = video_gops(container)
        except BitstreamError as exc:  # describe what is there; decoding refuses it
            desc["gop"] = {"error": str(exc)}
            return desc
        types = structure.frame_types()
        pframes = [i for i, t in enumerate(types) if t in PFRAME_LETTERS]
        desc["gop"] = {"frame_types": types, "keyframes": [i for i, t in enumerate(types) if t == "K"],
                       "anchored": [i for i, t in enumerate(types) if t == "A"],
                       "pframes": pframes,
                       "fused": [i for i, u in zip(pframes, structure.pframe_units()) if u.fusion_drop],
                       "skip_blocks": [i for i, u in zip(pframes, structure.pframe_units()) if u.skip_blocks],
                       "rounds": [u.accepted for _, units in structure.segments for u in units
                                  if isinstance(u, Round)],
                       "frame_bytes": _frame_bytes(types, container, structure)}
    return desc


def _frame_bytes(types: str, container: Container, gops: GopStructure) -> List[int]:
    """Bytes of each frame in frame order (0 for a predicted or repeated frame): its ANCH
    chunk for K and A frames; for P, F and L frames its PFRM chunk, or (syntax 3 to 5) its
    entry in its segment's INTR chunk, the chunk's own framing not counted."""
    anchors = iter(container.find(CHUNK_ANCHOR))
    syntax = container.header.params.get("gop_syntax", GOP_SYNTAX_ROUNDS)
    try:
        parts = iter(pframe_parts(container, gops))
    except BitstreamError:
        parts = iter([])
    out = []
    for t in types:
        if t in "KA":
            chunk = next(anchors, None)
            out.append(chunk.size if chunk is not None else 0)
        elif t in PFRAME_LETTERS:
            part = next(parts, None)
            framing = Chunk(CHUNK_PFRAME, b"").size if syntax not in INTER_CHUNK_SYNTAXES else len(write_uvarint(len(part or b"")))
            out.append(len(part) + framing if part is not None else 0)
        else:
            out.append(0)
    return out
