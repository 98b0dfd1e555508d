"""The decode contract every input must satisfy, shared by the fuzz target and the tests.

    bytes ─► bitstream.Container.from_bytes ─► bitstream.describe (what `ulbc info` prints)
          ─► the CLI's work check (bitstream.check_work, as `--max-pixels`) and memory check
             (resources.estimate_decode_file, as `--max-memory`)
          ─► ImageCodec.decode_container   (image: tiny seeded random anchor codec) ─► HxWx3 uint8
           └ VideoCodec.decode_container   (video: tiny seeded random video model)  ─► frames x HxWx3 uint8

Every input must end in a successful decode (an array of the header's size; for a video,
exactly the header's frame count) or in an exception the CLI reports as a clean one-line
error. ``task.describe_error`` prints ``ValueError`` and ``OSError`` as plain messages and
anything else as "internal error ...; please report it", so exactly those two are *clean*
(``CLEAN_ERRORS``); the documented ones are ``BitstreamError``, ``DecodeError`` and
``MemoryLimitError`` (all ValueError subclasses). With ``strict=True`` an undocumented
ValueError/OSError is a failure too. Any other exception, a wrong output, a native crash,
a hang or a memory blow-up is a finding.

``Limits`` are what the run is configured with:

- ``max_memory``: the product's own ``--max-memory`` check (the estimate from the header,
  before any decoding). Inputs over it are refused as the CLI refuses them.
- ``max_pixels``: the product's ``ulbc decode --max-pixels`` check (``bitstream.check_work``:
  GOP runs within the header's max_gop, decoded pixels within the limit and within
  MAX_PIXELS_PER_FILE_BYTE per byte of the file), before any decoding.
- ``max_video_pixels``: harness-only, frames x width x height of a video. Predicted frames
  cost no bits (that is the codec), so a small file may declare many of them and the
  decode time grows with that count (docs/robustness.md, finding 4); above the bound an
  input stops right before decoding (every check before it still runs) and counts as
  ``skipped``, so that fuzzing keeps exploring instead of spending minutes on one input.

Also a command line, used by tests/test_fuzz_regressions.py to run inputs in a child
process (a native crash must not take pytest down)::

    python fuzz/decode_check.py FILE...                 # check files, one JSON line each
    python fuzz/decode_check.py --mutate 2000 --seed 1  # random structure-aware mutation of the seeds
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import struct
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT / "src") not in sys.path:  # running from a checkout without `pip install -e`
    sys.path.append(str(ROOT / "src"))

import torch  # noqa: E402

from ulbcodec import bitstream  # noqa: E402
from ulbcodec.bitstream import BitstreamError, Container  # noqa: E402
from ulbcodec.image import DecodeError, ImageCodec, coded_size  # noqa: E402
from ulbcodec.resources import Budget, MemoryLimitError, estimate_decode_file, parse_size  # noqa: E402
from ulbcodec.video import VideoCodec  # noqa: E402

CORPUS_DIR = HERE / "corpus"
CRASHES_DIR = HERE / "crashes"

# The fuzz model: a frozen copy of tests/conftest.py's TINY_CONFIG and seed at the time
# the seeds were made, so that editing the test fixture never silently turns the corpus
# into "wrong model" files. Deterministic (seeded): the seeds carry its digest.
FUZZ_MODEL_CONFIG = dict(N=16, M=32, num_slices=2, context_window=3, vae_channels=0, bypass_channels=4,
                         num_rate_levels=3, token_channels=16, num_token_blocks=1)
FUZZ_MODEL_SEED = 0
FUZZ_MODEL_NAME = "tiny"
FUZZ_RATE_LEVELS = 3
# The video fuzz model: same idea, a frozen copy of tests/conftest.py's tiny video model
# (anchor codec, CogVideoX VAE and transformer for generative keyframes, a UNet2DModel
# predictor, K=2 -> P=3, 1 sampler step, a P-frame codec; its levels carry λs so that
# the encoder codes motion and residuals, not only repeats).
FUZZ_VIDEO_NAME = "tinyvideo"
FUZZ_VIDEO = {"cond_frames": 2, "pred_frames": 3, "steps": 1, "residual_scale": 0.5}
FUZZ_VIDEO_LAMBDAS = (1e-3, 1e-2, 1e-1)
FUZZ_PFRAME = dict(N=8, M=16, context_widths=[8, 8, 8], num_rate_levels=FUZZ_RATE_LEVELS)
FUZZ_LATENT = 4
FUZZ_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=FUZZ_LATENT,
                temporal_compression_ratio=4, sample_height=64, sample_width=64)
FUZZ_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=FUZZ_LATENT,
                        out_channels=FUZZ_LATENT, time_embed_dim=16, text_embed_dim=8, num_layers=1, sample_width=8,
                        sample_height=8, sample_frames=5, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
                        max_text_seq_length=3, use_rotary_positional_embeddings=True)
FUZZ_PREDICTOR = dict(sample_size=8, in_channels=FUZZ_LATENT * 5, out_channels=FUZZ_LATENT * 3,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      block_out_channels=(8, 8), layers_per_block=1, add_attention=False, norm_num_groups=4)

CLEAN_ERRORS = (ValueError, OSError)  # what task.describe_error reports as a plain one-line error
DOCUMENTED_ERRORS = (BitstreamError, DecodeError, MemoryLimitError)


class FuzzFailure(AssertionError):
    """The decoder broke its contract on this input (wrong output, undocumented error in strict mode)."""


# --------------------------------------------------------------------------- model


def build_package(root: Path) -> Path:
    """Write the tiny seeded random image package (and the video package beside it)
    under ``root`` and return the image package's path."""
    from ulbcodec.models.anchor_codec import AnchorCodec
    from ulbcodec.packages import RateLevel, save_package

    with torch.random.fork_rng():  # seeded without disturbing the caller's random state
        torch.manual_seed(FUZZ_MODEL_SEED)
        model = AnchorCodec(**FUZZ_MODEL_CONFIG)
        model.update(force=True)
    save_package(Path(root) / FUZZ_MODEL_NAME, FUZZ_MODEL_NAME, {"anchor_codec": model.eval()},
                 [RateLevel(i) for i in range(FUZZ_RATE_LEVELS)], description="tiny random model for fuzzing")
    _build_video_package(Path(root))
    return Path(root) / FUZZ_MODEL_NAME


def _build_video_package(root: Path) -> Path:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, UNet2DModel

    from ulbcodec.models.anchor_codec import AnchorCodec
    from ulbcodec.models.next_frame import SCHEDULER_CONFIG
    from ulbcodec.models.pframe_codec import PFrameCodec
    from ulbcodec.packages import RateLevel, save_package

    with torch.random.fork_rng():
        torch.manual_seed(FUZZ_MODEL_SEED)
        anchor = AnchorCodec(**{**FUZZ_MODEL_CONFIG, "bypass_channels": FUZZ_LATENT})
        anchor.update(force=True)
        modules = {"anchor_codec": anchor.eval(), "vae": AutoencoderKLCogVideoX(**FUZZ_VAE).eval(),
                   "transformer": CogVideoXTransformer3DModel(**FUZZ_TRANSFORMER).eval(),
                   "scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG), "prompt_embeds": torch.randn(1, 3, 8),
                   "predictor": UNet2DModel(**FUZZ_PREDICTOR).eval(),
                   "predictor_scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)}
        modules["pframe"] = PFrameCodec(**FUZZ_PFRAME)
        modules["pframe"].update(force=True)
    levels = [RateLevel(i, lmbda) for i, lmbda in enumerate(FUZZ_VIDEO_LAMBDAS)]
    save_package(root / FUZZ_VIDEO_NAME, FUZZ_VIDEO_NAME, {k: m.eval() if hasattr(m, "eval") else m
                                                           for k, m in modules.items()}, levels,
                 extra={"video": FUZZ_VIDEO}, description="tiny random video model for fuzzing")
    return root / FUZZ_VIDEO_NAME


@dataclass
class Decoders:
    """The fuzz target's two decoders; a file goes to the one its header's media asks for."""

    image: ImageCodec
    video: VideoCodec

    def for_header(self, header):
        return self.video if header.media == bitstream.MEDIA_VIDEO else self.image


def build_codec(model_dir: Optional[Path] = None) -> Decoders:
    """The fuzz decoders, one intra-op thread. Builds the packages into a temporary folder
    unless ``model_dir`` (the image package; the video one beside it) already holds them."""
    torch.set_num_threads(1)
    if model_dir is None or not (Path(model_dir) / "ulbc_model.json").is_file() \
            or not (Path(model_dir).parent / FUZZ_VIDEO_NAME / "ulbc_model.json").is_file():
        root = Path(tempfile.mkdtemp(prefix="ulbc-fuzz-model-")) if model_dir is None else Path(model_dir).parent
        model_dir = build_package(root)
    return Decoders(ImageCodec.from_pretrained(str(model_dir)),
                    VideoCodec.from_pretrained(str(Path(model_dir).parent / FUZZ_VIDEO_NAME)))


# --------------------------------------------------------------------------- the check


@dataclass
class Limits:
    """What a run is configured with (see the module docstring); ``None`` = unbounded."""

    max_memory: Optional[int] = None  # bytes, as `ulbc decode --max-memory`
    max_video_pixels: Optional[int] = None  # frames x width x height (harness-only)
    max_pixels: Optional[int] = None  # decoded pixels, as `ulbc decode --max-pixels` (its default in the fuzzer)


NO_LIMITS = Limits()
# The fuzz target's default: `--max-memory 1G` (~4 MP coded at the anchor path's rates)
# and videos of at most 40 frames of 64x64 (a few seconds with the tiny video model).
FUZZ_LIMITS = Limits(max_memory=1 << 30, max_video_pixels=40 * 64 * 64, max_pixels=bitstream.DEFAULT_MAX_PIXELS)


@dataclass
class Outcome:
    status: str  # "decoded" | "rejected" | "skipped"
    stage: str  # "container" | "budget" | "decode"
    error_type: str = ""
    error: str = ""
    documented: bool = True
    seconds: float = 0.0
    shape: Tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _clean(exc: BaseException, stage: str, strict: bool, t0: float) -> Outcome:
    documented = isinstance(exc, DOCUMENTED_ERRORS)
    if strict and not documented:
        raise FuzzFailure(f"undocumented {type(exc).__name__} at {stage}: {exc}") from exc
    return Outcome("rejected", stage, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                   documented, time.perf_counter() - t0)


def _decode(codec, container: Container) -> Tuple[int, ...]:
    """Decode fully; the output's shape (frames first for a video), checked against the header."""
    header = container.header
    frame_shape = (header.height, header.width, 3)
    if isinstance(codec, VideoCodec):
        frames = 0
        for frame in codec.decode_container(container):
            _check_array(frame, frame_shape)
            frames += 1
        if frames != header.frames:
            raise FuzzFailure(f"decoded {frames} frames, header says {header.frames}")
        return (frames, *frame_shape)
    _check_array(codec.decode_container(container), frame_shape)  # the CLI's defaults
    return frame_shape


def _check_array(rgb, expected: Tuple[int, ...]) -> None:
    if not (hasattr(rgb, "shape") and tuple(rgb.shape) == expected and str(rgb.dtype) == "uint8"):
        raise FuzzFailure(f"decoded {getattr(rgb, 'shape', type(rgb))} {getattr(rgb, 'dtype', '')}, "
                          f"header says {expected} uint8")


def check_input(data: bytes, decoders: Decoders, limits: Limits = NO_LIMITS, strict: bool = False) -> Outcome:
    """Run one input through the container reader, the memory check and the decoder.

    Returns the outcome when the contract holds; raises ``FuzzFailure`` (or lets the
    unexpected exception through) when it does not.
    """
    t0 = time.perf_counter()
    try:
        container = Container.from_bytes(data)
    except CLEAN_ERRORS as exc:
        return _clean(exc, "container", strict, t0)
    bitstream.describe(container)  # `ulbc info` on any file that parses must not fail
    header = container.header
    codec = decoders.for_header(header)
    try:
        bitstream.check_work(container, limits.max_pixels)  # as `ulbc decode --max-pixels`
        if limits.max_memory is not None:
            generative = isinstance(codec, VideoCodec) or codec.is_generative
            Budget(limits.max_memory).check(estimate_decode_file(header, codec.package, generative),
                                            f"decoding {header.width}x{header.height}")
    except CLEAN_ERRORS as exc:
        return _clean(exc, "budget", strict, t0)
    if (limits.max_video_pixels is not None and header.media == bitstream.MEDIA_VIDEO
            and header.frames * header.width * header.height > limits.max_video_pixels):
        return Outcome("skipped", "budget", seconds=time.perf_counter() - t0)
    try:
        shape = _decode(codec, container)
    except CLEAN_ERRORS as exc:
        return _clean(exc, "decode", strict, t0)
    return Outcome("decoded", "decode", seconds=time.perf_counter() - t0, shape=shape)


# --------------------------------------------------------------------------- structure-aware mutation
#
# libFuzzer's byte mutations almost never survive the CRC-32 of each chunk, so they only
# test the framing. These helpers parse a file leniently (any field values), change one
# field or chunk, and write it back with correct lengths, CRCs and chunk count (most of
# the time), so that mutations reach the header checks, the payload parser and the
# entropy decoder. Used by the atheris custom mutator and by the in-test random fuzz.


def uvarint(value: int) -> bytes:
    return bitstream.write_uvarint(max(0, value))



def split_chunks(data: bytes) -> Optional[Tuple[bytes, List[List[bytes]]]]:
    """(magic+version, [[type, payload], ...]) ignoring CRCs, or None if the framing is broken."""
    if len(data) < 4:
        return None
    r, chunks = bitstream.Reader(data), []
    r.pos = 4
    try:
        while r.pos < len(data):
            n = r.uvarint(5)
            ctype = r.take(4)
            payload = r.take(n)
            r.take(4)
            chunks.append([ctype, payload])
    except ValueError:
        return None
    return data[:4], chunks


def join_chunks(prefix: bytes, chunks: Sequence[Sequence[bytes]], rng: Optional[random.Random] = None) -> bytes:
    out = bytearray(prefix)
    for ctype, payload in chunks:
        crc = zlib.crc32(bytes(ctype) + bytes(payload)) & 0xFFFFFFFF
        if rng is not None and rng.random() < 0.03:
            crc ^= 1 << rng.randrange(32)
        out += uvarint(len(payload)) + bytes(ctype) + bytes(payload) + struct.pack(">I", crc)
    return bytes(out)


HEAD_INTS = ("media", "width", "height", "frames", "fps_num", "fps_den", "rate_level", "seed", "count")


def parse_head(payload: bytes) -> Optional[dict]:
    r = bitstream.Reader(payload)
    try:
        f = {"media": r.u8()}
        for k in ("width", "height", "frames", "fps_num", "fps_den"):
            f[k] = r.uvarint()
        f["digest"] = r.take(8)
        f["rate_level"] = r.u8()
        f["seed"] = r.uvarint()
        f["params"] = [(r.uvarint(), r.uvarint()) for _ in range(min(r.uvarint(), 200))]
        f["count"] = r.uvarint()
        f["tail"] = r.take(r.remaining)
    except ValueError:
        return None
    return f


def encode_head(f: dict) -> bytes:
    out = bytearray([f["media"] & 0xFF])
    for k in ("width", "height", "frames", "fps_num", "fps_den"):
        out += uvarint(f[k])
    out += bytes(f["digest"])[:8].ljust(8, b"\0")
    out.append(f["rate_level"] & 0xFF)
    out += uvarint(f["seed"]) + uvarint(len(f["params"]))
    for pid, value in f["params"]:
        out += uvarint(pid) + uvarint(value)
    return bytes(out + uvarint(f["count"]) + f["tail"])


def parse_anch(payload: bytes) -> Optional[dict]:
    r = bitstream.Reader(payload)
    try:
        zh, zw, zlen = r.uvarint(), r.uvarint(), r.uvarint()
        z = r.take(zlen)
        (check,) = struct.unpack(">H", r.take(2))
        return {"zh": zh, "zw": zw, "z": z, "check": check, "y": r.take(r.remaining)}
    except ValueError:
        return None


def encode_anch(f: dict, zlen: Optional[int] = None) -> bytes:
    z = bytes(f["z"])
    return (uvarint(f["zh"]) + uvarint(f["zw"]) + uvarint(len(z) if zlen is None else zlen) + z
            + struct.pack(">H", f["check"] & 0xFFFF) + bytes(f["y"]))


INTERESTING = (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 65, 127, 128, 255, 256, 511, 512, 1023, 1024, 4095,
               4096, 8191, 8192, 16383, 16384, 32767, 32768, 32769, 65535, 65536, (1 << 20), (1 << 20) + 1,
               (1 << 28), (1 << 31) - 1, 1 << 31, 1 << 32, (1 << 35) - 1, 1 << 63, (1 << 64) - 1, (1 << 70) - 1)


SIDES = (1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 575, 576, 577, 1023, 1024,
         2048, 4096, 8192, 16384, 32767, 32768, 32769)


def random_bytes_mutation(data: bytes, max_size: int, rng: random.Random) -> bytes:
    """A small libFuzzer-like byte mutator (for the in-test fuzz, no atheris needed)."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(10)
        if not b:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
            continue
        i = rng.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i] = rng.randrange(256)
        elif op == 2:
            b[i] = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF))
        elif op == 3:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 4:
            del b[i:i + rng.randrange(1, 9)]
        elif op == 5:
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randrange(1, 33)]
        elif op == 6:
            n = rng.randrange(1, 65)
            b[i:i + n] = bytes([rng.choice((0x00, 0xFF))]) * n
        elif op == 7:
            del b[i:]
        elif op == 8:
            b[i], b[-1 - i] = b[-1 - i], b[i]
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 17)))
    return bytes(b[:max_size])


ByteMutator = Callable[[bytes, int], bytes]


def _resync_anchor(chunks, head: dict) -> None:
    """Make the ANCH z shape match the (mutated) header's coded size, so that the decoder gets past that check."""
    down = dict(head["params"]).get(2, 1) or 1
    if not 1 <= head["width"] <= 1 << 20 or not 1 <= head["height"] <= 1 << 20:
        return
    cw, ch = coded_size(head["width"], head["height"], down)
    for chunk in chunks:
        if chunk[0] == bitstream.CHUNK_ANCHOR:
            anch = parse_anch(bytes(chunk[1]))
            if anch is not None:
                anch["zh"], anch["zw"] = -(-ch // 64), -(-cw // 64)
                chunk[1] = encode_anch(anch)


def mutate(data: bytes, max_size: int, rng: random.Random, byte_mutator: Optional[ByteMutator] = None) -> bytes:
    """One structure-aware mutation of a .ulb file (see the comment above)."""
    bm = byte_mutator or (lambda d, n: random_bytes_mutation(d, n, rng))
    parsed = split_chunks(data)
    if parsed is None or rng.random() < 0.05:
        return bm(data, max_size)
    prefix, chunks = parsed
    chunks = [list(c) for c in chunks]
    op = rng.randrange(10)
    heads = [c for c in chunks if c[0] == bitstream.CHUNK_HEADER]
    anchs = [c for c in chunks if c[0] == bitstream.CHUNK_ANCHOR]
    head = parse_head(heads[0][1]) if heads else None
    fix_count = rng.random() < 0.9
    if op <= 2 and head is not None:  # one header field
        key = rng.choice(HEAD_INTS + ("digest", "params", "params", "size"))
        if key == "size":  # both sides at once: small, odd, tile-boundary or huge images
            head["width"], head["height"] = (rng.choice(SIDES) for _ in range(2))
        elif key == "digest":
            head["digest"] = bytes(rng.randrange(256) for _ in range(8)) if rng.random() < 0.5 else bytes(8)
        elif key == "params":
            choice = rng.randrange(4)
            if choice == 0:
                head["params"] = [(2, rng.choice((0, 1, 2, 3, 4, 8, 16, 1 << 40)))]
            elif choice == 1:
                pid = rng.choice((0, 1, 2, 3, 15, 16, 21, 22, 23, 127, 128, 1 << 35))
                head["params"].append((pid, rng.choice(INTERESTING)))
            elif choice == 2:
                head["params"] = [(rng.choice((1, 16, 17, 18, 19, 20, 21)), rng.choice(INTERESTING))
                                  for _ in range(rng.choice((0, 1, 5, 64, 65)))]
            else:
                head["params"] = head["params"][:-1]
        elif key in ("media", "rate_level"):
            head[key] = rng.choice((0, 1, 2, 3, 4, 255, rng.randrange(256)))
        else:
            head[key] = (rng.choice(INTERESTING) if rng.random() < 0.5
                         else max(0, head[key] + rng.choice((-1, 1, -16, 16, 63, 64, 65))))
        if key == "count":
            fix_count = False
        if key in ("width", "height", "params", "size") and rng.random() < 0.8:
            _resync_anchor(chunks, head)
        heads[0][1] = encode_head(head)
    elif op <= 5 and anchs:  # one ANCH field
        anch = parse_anch(bytes(anchs[0][1]))
        if anch is None:
            anchs[0][1] = bm(bytes(anchs[0][1]), max_size)
        else:
            zlen = None
            what = rng.randrange(8)
            if what == 0:
                anch["z"] = bm(anch["z"], max_size)
            elif what in (1, 2):
                anch["y"] = bm(anch["y"], max_size)
            elif what == 3:
                anch["check"] = rng.randrange(1 << 16)
            elif what == 4:
                anch[rng.choice(("zh", "zw"))] = rng.choice(INTERESTING)
            elif what == 5:
                zlen = max(0, len(anch["z"]) + rng.choice((-1, 1, 2, 1000, 1 << 31)))
            elif what == 6:  # runs that drive the rANS decoder into its bypass / renormalisation paths
                part = rng.choice(("y", "z"))
                fill = bytes([rng.choice((0x00, 0xFF))]) * rng.choice((1, 4, 16, 256, 4096))
                anch[part] = fill if rng.random() < 0.5 else anch[part] + fill
            else:
                part = rng.choice(("y", "z"))
                anch[part] = anch[part][: rng.randrange(len(anch[part]) + 1)]
            anchs[0][1] = encode_anch(anch, zlen)
    elif op <= 7 and chunks:  # chunk structure
        what = rng.randrange(6)
        i = rng.randrange(len(chunks))
        if what == 0 and len(chunks) > 1:
            del chunks[i]
        elif what == 1:
            chunks.insert(i, list(chunks[rng.randrange(len(chunks))]))
        elif what == 2:
            j = rng.randrange(len(chunks))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif what == 3:
            ctype = rng.choice((b"teXt", b"zzzz", b"XTRA", b"GOPS", b"ANCH", b"HEAD", b"head", b"AN1H", b"\0\0\0\0"))
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
            chunks.insert(rng.randrange(1, len(chunks) + 1), [ctype, payload])
        elif what == 4:
            chunks[i][0] = rng.choice((b"teXt", b"XTRA", b"GOPS", b"ANCH", b"HEAD", b"anch", b"AN\xffH"))
        else:
            chunks[i][1] = bm(bytes(chunks[i][1]), max_size)
    else:  # any chunk's payload, or the prefix
        if chunks and rng.random() < 0.8:
            c = rng.choice(chunks)
            c[1] = bm(bytes(c[1]), max_size)
        else:
            prefix = bytes(prefix[:3]) + bytes([rng.choice((0, 1, 2, 255))])
    if fix_count:
        chunks = fix_chunk_count(chunks)
    return join_chunks(prefix, chunks, rng)[:max_size]


def fix_chunk_count(chunks: List[List[bytes]]) -> List[List[bytes]]:
    """Set the HEAD chunk's count of following chunks (when HEAD comes first and parses)."""
    chunks = [list(c) for c in chunks]
    if chunks and chunks[0][0] == bitstream.CHUNK_HEADER:
        head = parse_head(bytes(chunks[0][1]))
        if head is not None:
            head["count"] = len(chunks) - 1
            chunks[0][1] = encode_head(head)
    return chunks


# --------------------------------------------------------------------------- command line


def seed_inputs(dirs: Sequence[Path] = (CORPUS_DIR,)) -> List[Tuple[str, bytes]]:
    files = []
    for d in dirs:
        for p in sorted(Path(d).iterdir()) if Path(d).is_dir() else []:
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".md":
                files.append((p.name, p.read_bytes()))
    return files


def _limits(args) -> Limits:
    return Limits(args.max_memory, args.max_video_pixels, bitstream.DEFAULT_MAX_PIXELS)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="inputs to check (one JSON line each)")
    ap.add_argument("--model-dir", type=Path, help="an already built fuzz model package (else built in a temp dir)")
    ap.add_argument("--max-memory", type=parse_size, help="refuse inputs as `ulbc decode --max-memory` does")
    ap.add_argument("--max-video-pixels", type=int, help="skip videos of more frames x pixels than this")
    ap.add_argument("--strict", action="store_true", help="undocumented ValueError/OSError count as failures")
    ap.add_argument("--mutate", type=int, default=0, metavar="N", help="check N random mutations of the seed corpus")
    ap.add_argument("--seed", type=int, default=0, help="random seed for --mutate")
    ap.add_argument("--last-input", type=Path, help="--mutate: write each input here before checking it")
    args = ap.parse_args(argv)
    codec = build_codec(args.model_dir)
    limits = _limits(args)
    if args.mutate:
        rng = random.Random(args.seed)
        seeds = seed_inputs()
        valid = [data for name, data in seeds if name.startswith("valid-")]
        others = [data for name, data in seeds if not name.startswith("valid-")]
        stats: Dict[str, int] = {}
        slowest, t0 = 0.0, time.perf_counter()
        for i in range(args.mutate):
            data = rng.choice(valid if rng.random() < 0.75 or not others else others)
            for _ in range(rng.choice((1, 1, 2, 3))):
                data = mutate(data, 1 << 16, rng)
            if args.last_input:
                args.last_input.write_bytes(data)
            try:
                out = check_input(data, codec, limits, args.strict)
            except BaseException:
                traceback.print_exc()
                print(json.dumps({"failed_input": i, "hex": data.hex()}), flush=True)
                return 1
            key = f"{out.status}:{out.stage}" + ("" if out.documented else f":{out.error_type}")
            stats[key] = stats.get(key, 0) + 1
            slowest = max(slowest, out.seconds)
        print(json.dumps({"inputs": args.mutate, "seconds": round(time.perf_counter() - t0, 3),
                          "slowest_s": round(slowest, 4), "outcomes": stats}), flush=True)
        return 0
    status = 0
    for path in args.files:
        data = path.read_bytes()
        try:
            out = check_input(data, codec, limits, args.strict)
        except BaseException as exc:
            traceback.print_exc()
            print(json.dumps({"file": str(path), "status": "FAILED", "error_type": type(exc).__name__,
                              "error": str(exc)[:300]}), flush=True)
            status = 1
            continue
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # whole process so far
        print(json.dumps({"file": str(path), **out.as_dict(), "peak_rss_mb": peak_mb}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
