"""Image codec pipeline: pixels <-> .ulb bytes with an anchor-codec model package.

::

    encode:  RGB uint8 ─► [downscale 1/f, Lanczos] ─► [0,1] float ─► replicate-pad to 64
             ─► g_a (tiled) ─► y ─► entropy coding (whole image, fp32, 1 thread) ─► z/y strings
             HEAD(size, model digest, rate level, f) + ANCH(strings, symbol check) ─► .ulb

    decode:  .ulb ─► strict container parse ─► model digest check ─► entropy decoding
             ─► symbol check ─► g_s (tiled) ─► anchor frame ─┬──────────────────────────┐
                                      └► bypass latent ─► next-frame decoder (generative │
                                          packages; models/next_frame.py) ─► image       │
             ─► crop ─► clamp ─► RGB uint8 ─► [upscale xf, Lanczos]  ◄── --anchor-only ──┘

With a generative package, the decoder's output is the next-frame decoder's image;
``anchor_only=True`` returns the anchor frame instead (a fast preview that never loads
the diffusion weights). Anchor codecs conditioned on the VAE latent (``vae_channels``,
as NeFIC's) get it from the package's VAE at the encoder only.

A package may hold one anchor codec and one transformer LoRA per rate level (imported
NeFIC checkpoints, ``importers/nefic.py``; the LoRA runtime is ``models/lora.py``): the codec keeps one level's codec in memory and
puts that level's LoRA on the transformer before decoding with it.

Operating points are (downscale f, rate level). The model's lowest level still pays for
its hyper-latent (about 0.02 bpp at full size); coding a 1/2 or 1/4 size image, as the
classical baselines must at these rates too, reaches further down. The rate level is
continuous for a package with one gain-vector anchor codec: a fractional level
interpolates the neighbouring levels' gains geometrically (AnchorCodec), on a grid of
1/1000, stored in the header as ``level_milli`` (docs/bitstream.md). ``encode_to_bpp``
searches the downscale and then bisects the continuous level to land just under the
target.

The pipeline owns no learned maths: it composes the model's ``analyze`` /
``encode_latent`` / ``decode_latent`` / ``synthesize``, the tiling helper and the
container. bpp is always the real file size x 8 / pixels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ulbcodec import bitstream
from ulbcodec.bitstream import AnchorPayload, BitstreamError, Container, Header
from ulbcodec import packages
from ulbcodec.color_stats import ColorStats, color_fix
from ulbcodec.tiling import TILE_WORKERS, tiled_apply, tile_workers  # noqa: F401  (TILE_WORKERS: ulbcodec.image.TILE_WORKERS)
from ulbcodec.placement import Placement
from ulbcodec.refinement import MAX_PIXELS as REFINE_MAX_PIXELS
from ulbcodec.refinement import RefineSettings, refine_latent

# Tile cores for the transforms, in pixels. 512 px tiles keep peak memory of a 12 MP
# image well under 2 GB; the 64 px margin is 4 latent rows of context.
TILE_CORE = 512
TILE_MARGIN = 64
PAD_MULTIPLE = 64
DOWNSCALES = bitstream.DOWNSCALES
# encode_to_bpp with continuous levels: stop once the file is within 3 % under the target,
# after at most this many bisection encodes (1/2^10 of a level is the header's 1/1000 grid).
BPP_TOLERANCE = 0.03
BPP_SEARCH_STEPS = 10


class DecodeError(ValueError):
    """The file decodes to nothing trustworthy (wrong model, desynchronised stream)."""


@dataclass
class EncodeResult:
    data: bytes
    rate_level: float  # an int, or a fractional operating point (continuous levels)
    width: int
    height: int
    downscale: int = 1
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def bpp(self) -> float:
        return len(self.data) * 8 / (self.width * self.height)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    return torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1)[None].float().div_(255)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Lanczos resampling (Pillow): the same filter on both sides of the downscale mode."""
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.LANCZOS))


def coded_size(width: int, height: int, downscale: int) -> Tuple[int, int]:
    """Size of the image actually coded at downscale factor f (rounded up, at least 1)."""
    return -(-width // downscale), -(-height // downscale)


def pad_replicate(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Pad bottom/right by repeating the border (cheaper to code than zeros)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    # replicate padding needs pad < size for 'reflect' only; 'replicate' works for any size
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


class ImageCodec:
    """Encode/decode images with one model package (loaded once, reused for a batch)."""

    def __init__(self, package: packages.ModelPackage, device="cpu"):
        """``device``: a torch device name, or a :class:`~ulbcodec.placement.Placement`
        (device, diffusers weights dtype, model offload)."""
        self.package = package
        self.placement = Placement.of(device).for_package(package)
        self.device = self.placement.device
        # per-level packages: the level whose anchor codec is loaded (None: one codec for all)
        self._model_level = self.default_level if package.per_level("anchor_codec") else None
        self.model = package.build("anchor_codec", device=str(self.device), level=self._model_level)
        self._next_frame = None
        self._lora_level: Optional[int] = None  # the level whose LoRA is on the transformer (-1: the only one)
        self.last_timings: Dict[str, float] = {}

    @property
    def is_generative(self) -> bool:
        return self.package.is_generative

    def _pipeline(self):
        """The next-frame decoder, built on first use (anchor-only work never loads it)."""
        if self._next_frame is None:
            if not self.is_generative:
                raise DecodeError(f"model {self.package.name!r} has no generative decoder")
            from ulbcodec.models.next_frame import NextFramePipeline

            place = self.placement

            def build(name):
                return self.package.build(name, device=str(place.home), dtype=place.diffusers_dtype)

            from ulbcodec.models.nefic_decode import is_published

            self._next_frame = NextFramePipeline(build("vae"), build("transformer"), build("scheduler"),
                                                 build("prompt_embeds").to(self.device), dtype=place.compute_dtype,
                                                 placement=place,
                                                 output=self.package.next_frame_setting("output"),
                                                 published=is_published(self.package))
        return self._next_frame

    def next_frame_for(self, rate_level: Optional[int] = None):
        """The next-frame decoder with the package's LoRA of ``rate_level`` on its
        transformer (default: the one already on it, else the default level's)."""
        pipe = self._pipeline()
        lora = self.package.components.get("lora")
        if lora is not None:
            if rate_level is None:
                rate_level = self.default_level if self._lora_level is None else self._lora_level
            if not self.package.per_level("lora"):
                rate_level = -1  # one LoRA for every level
            if rate_level != self._lora_level:
                from ulbcodec.models.lora import apply_lora

                apply_lora(pipe.transformer, self.package.build("lora", level=rate_level),
                           lora.get("config", {}).get("alpha"), source=f"model {self.package.name!r}: LoRA")
                self._lora_level = rate_level
        return pipe

    @property
    def next_frame(self):
        """The next-frame decoder (see :meth:`next_frame_for`)."""
        return self.next_frame_for()

    def _anchor_codec(self, rate_level: int):
        """(anchor codec, level to give it) for ``rate_level``: in a per-level package the
        level's own codec (loaded in place of the previous one) at its only level, 0."""
        if self._model_level is None:
            return self.model, rate_level
        if rate_level != self._model_level:
            self.model = self.package.build("anchor_codec", device=str(self.device), level=rate_level)
            self._model_level = rate_level
        return self.model, 0

    @classmethod
    def from_pretrained(cls, name_or_path: str = "default", device="cpu") -> "ImageCodec":
        return cls(packages.ModelPackage.load_manifest(packages.resolve(name_or_path)), device)

    @property
    def rate_levels(self) -> List[int]:
        return [lv.level for lv in self.package.rate_levels] or [0]

    @property
    def color_stats_default(self) -> bool:
        """Whether files carry colour statistics by default: yes. The published NeFIC's
        outputs include the colour fix; on ulbc's own models its 21 bytes buy more than
        they cost on every measure but MS-SSIM (BENCHMARKS.md, "Colour statistics chunk").
        ``encode(color_stats=False)`` (``--no-color-stats``) leaves them out."""
        return True

    @property
    def default_level(self) -> int:
        """The level used without --quality/--bpp: the package's choice, else the middle one."""
        level = self.package.extra.get("default_level")
        return level if level in self.rate_levels else self.rate_levels[len(self.rate_levels) // 2]

    # ------------------------------------------------------------------ encode

    @property
    def continuous_levels(self) -> bool:
        """Whether fractional rate levels work: one anchor codec whose gain vectors are the
        package's levels 0..L-1 (a per-level package has one codec per level: no)."""
        levels = self.rate_levels
        return (not self.package.per_level("anchor_codec") and len(levels) > 1
                and levels == list(range(len(levels))) and getattr(self.model, "num_rate_levels", 0) == len(levels))

    def _check_level(self, rate_level):
        """``rate_level`` as used: an offered int, or a float in the levels' range snapped
        to the header's 1/1000 grid (an int when it lands on one)."""
        if isinstance(rate_level, float) and not rate_level.is_integer():
            level = round(rate_level * 1000) / 1000
            if not self.continuous_levels:
                raise ValueError(f"model {self.package.name!r} offers only whole rate levels, got {rate_level}")
            if not self.rate_levels[0] <= level <= self.rate_levels[-1]:
                raise ValueError(f"rate level {rate_level} outside the range of model {self.package.name!r} "
                                 f"({self.rate_levels[0]}..{self.rate_levels[-1]})")
            return int(level) if level.is_integer() else level
        if isinstance(rate_level, float):
            rate_level = int(rate_level)
        if rate_level not in self.rate_levels:
            raise ValueError(f"rate level {rate_level} not offered by model {self.package.name!r} "
                             f"(levels {self.rate_levels[0]}..{self.rate_levels[-1]})")
        return rate_level

    @torch.no_grad()
    def analyze(self, rgb: np.ndarray, rate_level: int) -> torch.Tensor:
        x = pad_replicate(to_tensor(rgb).to(self.device))
        model, level = self._anchor_codec(rate_level)
        if model.vae_channels == 0:
            return tiled_apply(lambda t: model.analyze(t, rate_level=level), x,
                               Fraction(1, 16), TILE_CORE, TILE_MARGIN, tile_workers())
        # NeFIC-style encoder: g_a also sees the VAE latent of the (padded) original.
        pipe = self._pipeline()
        if pipe.published:  # the whole image through diffusers' VAE (its own tiling), as published
            vae_latent = pipe.encode_latent(x)
        else:
            vae_latent = tiled_apply(pipe.encode_latent, x, Fraction(1, 8), TILE_CORE, TILE_MARGIN, 1)
        return tiled_apply(lambda t, v: model.analyze(t, v, rate_level=level), x,
                           Fraction(1, 16), TILE_CORE, TILE_MARGIN, tile_workers(), side=[(vae_latent, Fraction(1, 8))])

    @torch.no_grad()
    def encode(self, rgb: np.ndarray, rate_level: int, downscale: int = 1,
               refine: Optional[RefineSettings] = None, color_stats: Optional[bool] = None) -> EncodeResult:
        """Code one image at one operating point into complete .ulb file bytes; with
        ``refine`` the latent is refined first (:mod:`ulbcodec.refinement`). ``color_stats``
        adds the coded image's colour statistics (a 12-byte ``colr`` chunk, applied by the
        decoder as NeFIC's colour fix; default: :attr:`color_stats_default`)."""
        rate_level = self._check_level(rate_level)
        if downscale not in DOWNSCALES:
            raise ValueError(f"downscale must be one of {DOWNSCALES}, got {downscale}")
        height, width = rgb.shape[:2]
        params = {"downscale": downscale} if downscale > 1 else {}
        if isinstance(rate_level, float):  # a fractional operating point (whole levels stay as before)
            params["level_milli"] = round(rate_level * 1000)
        header = Header(bitstream.MEDIA_IMAGE, width, height, self.package.short_digest, math.floor(rate_level),
                        params=params)
        header.validate()  # refuse oversized inputs before any work
        if downscale > 1:
            rgb = resize(rgb, *coded_size(width, height, downscale))
        payload = self.encode_anchor(rgb, rate_level, refine)
        chunks = [bitstream.Chunk(bitstream.CHUNK_ANCHOR, payload.to_bytes())]
        if self.color_stats_default if color_stats is None else color_stats:
            chunks.append(bitstream.Chunk(bitstream.CHUNK_COLOR, ColorStats.of_rgb(rgb).to_bytes()))
        data = Container(header, chunks).to_bytes()
        return EncodeResult(data, rate_level, width, height, downscale, dict(self.last_timings))

    @torch.no_grad()
    def encode_anchor(self, rgb: np.ndarray, rate_level: int, refine: Optional[RefineSettings] = None) -> AnchorPayload:
        """The entropy-coded anchor of one image (or video keyframe), at its own size."""
        refine = refine if refine is not None and refine.steps > 0 else None
        lmbda = self._refinement_lambda(rgb, rate_level) if refine else None
        t0 = time.perf_counter()
        y = self.analyze(rgb, rate_level)
        t1 = time.perf_counter()
        model, level = self._anchor_codec(rate_level)
        if refine:
            y = refine_latent(model, to_tensor(rgb).to(self.device), y, level, lmbda, refine)
        t2 = time.perf_counter()
        coded = model.encode_latent(y)
        self.last_timings = {"analysis_s": t1 - t0, **({"refine_s": t2 - t1} if refine else {}),
                             "entropy_encode_s": time.perf_counter() - t2}
        (y_string,), (z_string,) = coded["strings"]
        payload = AnchorPayload(tuple(coded["shape"]), z_string, y_string, coded["symbols_crc32"] & 0xFFFF)
        return payload.padded_for(rgb.shape[1], rgb.shape[0])

    def _refinement_lambda(self, rgb: np.ndarray, rate_level) -> float:
        """The level's λ for :func:`refine_latent` (between levels: geometric interpolation,
        as the gains), after checking that refinement can run."""
        lmbdas = {lv.level: lv.lmbda for lv in self.package.rate_levels}
        low, frac = math.floor(rate_level), rate_level - math.floor(rate_level)
        lmbda = lmbdas.get(low, 0.0)
        if frac and lmbda and lmbdas.get(low + 1):
            lmbda = lmbda ** (1 - frac) * lmbdas[low + 1] ** frac
        if not lmbda:
            raise ValueError(f"model {self.package.name!r} records no λ for rate level {rate_level}: "
                             "latent refinement needs the level's rate-distortion trade-off")
        if rgb.shape[0] * rgb.shape[1] > REFINE_MAX_PIXELS:
            raise ValueError(f"latent refinement handles images up to {REFINE_MAX_PIXELS / 1e6:.1f} MP (1080p), got "
                             f"{rgb.shape[1]}x{rgb.shape[0]}: drop --refine-steps or use --downscale")
        return lmbda

    def encode_to_bpp(
        self, rgb: np.ndarray, target_bpp: float, downscales: Sequence[int] = (1, 2, 4),
        refine: Optional[RefineSettings] = None, color_stats: Optional[bool] = None,
    ) -> Tuple[EncodeResult, bool]:
        """The largest file at or under ``target_bpp`` over the operating points.

        Factors are tried from full size down and the first one with a level under the
        target wins: at equal rate the full-size image keeps more detail. Within a factor
        the file size grows with the level, so a binary search over the whole levels needs
        log2(levels) encodes; with :attr:`continuous_levels`, the bracket it leaves
        (a level under the target, the next one over) is then bisected on the continuous
        level until the file lands within :data:`BPP_TOLERANCE` under the target (at most
        :data:`BPP_SEARCH_STEPS` more encodes; the best file under the target is kept).
        Returns (result, met); when nothing lands under the target, the smallest file
        found is returned with ``met=False``. ``refine`` refines every candidate
        (each search step pays for a refinement); ``color_stats`` as in :meth:`encode`
        (its bytes count towards the target).
        """
        levels, smallest = self.rate_levels, None
        for downscale in downscales:
            lo, hi, best, over = 0, len(levels) - 1, None, None
            while lo <= hi:
                mid = (lo + hi) // 2
                result = self.encode(rgb, levels[mid], downscale, refine, color_stats)
                if smallest is None or len(result.data) < len(smallest.data):
                    smallest = result
                if result.bpp <= target_bpp:
                    best, lo = result, mid + 1
                else:
                    over, hi = result, mid - 1
            if best is None:
                continue
            if self.continuous_levels and over is not None:
                best = self._bisect_level(rgb, target_bpp, best, over, downscale, refine, color_stats)
            return best, True
        return smallest, False

    def _bisect_level(self, rgb, target_bpp, under: EncodeResult, over: EncodeResult, downscale, refine,
                      color_stats) -> EncodeResult:
        """Bisection of the continuous level between a file under the target and one over
        it (the rate grows with the level), on the header's 1/1000 grid."""
        lo, hi = under.rate_level, over.rate_level
        for _ in range(BPP_SEARCH_STEPS):
            if under.bpp >= (1 - BPP_TOLERANCE) * target_bpp or hi - lo <= 0.0015:
                break
            result = self.encode(rgb, self._check_level(float((lo + hi) / 2)), downscale, refine, color_stats)
            if result.bpp <= target_bpp:
                under, lo = result, result.rate_level
            else:
                hi = result.rate_level
        return under

    # ------------------------------------------------------------------ decode

    def check_model(self, header: Header) -> None:
        if header.model_digest != self.package.short_digest:
            found = packages.find_by_digest(header.model_digest)
            hint = f"; model {found.name!r} matches it (use --model {found.name})" if found else ""
            raise DecodeError(
                f"file was encoded with model {header.model_digest.hex()}, but model "
                f"{self.package.name!r} is {self.package.short_digest.hex()}{hint}"
            )

    @torch.no_grad()
    def decode_container(self, container: Container, anchor_only: bool = False, steps: int = 1,
                         seed: Optional[int] = None, color_fix: bool = True,
                         record: Optional[dict] = None) -> np.ndarray:
        """Decode a parsed file. ``anchor_only`` skips the generative decoder; ``steps > 1``
        decodes from seeded noise (default seed: the one in the file) instead of one step.
        A ``colr`` chunk's colour fix is applied unless ``color_fix`` is False; ``record``
        (a dict) receives the intermediates of a published NeFIC decode."""
        header = container.header
        if header.media != bitstream.MEDIA_IMAGE:
            raise DecodeError(f"file holds a {header.media_name}, not an image")
        self.check_model(header)
        if header.rate_level not in self.rate_levels:
            raise DecodeError(f"rate level {header.rate_level} is not offered by model {self.package.name!r}")
        chunks = container.find(bitstream.CHUNK_ANCHOR)
        if len(chunks) != 1:
            raise BitstreamError(f"an image file needs exactly one ANCH chunk, found {len(chunks)}")
        payload = AnchorPayload.from_bytes(chunks[0].payload)
        downscale = header.params.get("downscale", 1)
        width, height = coded_size(header.width, header.height, downscale)
        colors = container.find(bitstream.CHUNK_COLOR) if color_fix else []
        if len(colors) > 1:
            raise BitstreamError(f"an image file holds at most one colr chunk, found {len(colors)}")
        level = header.operating_level
        if level != header.rate_level and not self.continuous_levels:
            raise DecodeError(f"operating point {level:g} needs continuous rate levels, which model "
                              f"{self.package.name!r} does not have")
        rgb = self.decode_anchor(payload, width, height, level, anchor_only, steps,
                                 header.seed if seed is None else seed,
                                 ColorStats.from_bytes(colors[0].payload) if colors else None, record)
        t0 = time.perf_counter()
        if downscale > 1:
            rgb = resize(rgb, header.width, header.height)
        self.last_timings["upscale_s"] = time.perf_counter() - t0
        return rgb

    @torch.no_grad()
    def decode_anchor(self, payload: AnchorPayload, width: int, height: int, rate_level: int,
                      anchor_only: bool = False, steps: int = 1, seed: int = 0,
                      color_stats: Optional[ColorStats] = None, record: Optional[dict] = None) -> np.ndarray:
        """One anchor payload → HxWx3 uint8 RGB at the coded size (generative unless
        ``anchor_only`` or the package has no next-frame decoder), colour-fixed to
        ``color_stats`` if given (ulbcodec/color_stats.py)."""
        if tuple(payload.z_shape) != (-(-height // PAD_MULTIPLE), -(-width // PAD_MULTIPLE)):
            raise BitstreamError(
                f"hyper-latent shape {payload.z_shape} does not match a {width}x{height} coded image"
            )
        payload.check_size(width, height)
        generative = self.is_generative and not anchor_only
        # Models are loaded (on first use) before the clock starts: loading is start-up,
        # reported with it, not decoding time.
        model, level = self._anchor_codec(rate_level)
        pipe = self.next_frame_for(math.floor(rate_level)) if generative else None
        t0 = time.perf_counter()
        try:
            decoded = model.decode_latent([[payload.y_string], [payload.z_string]], payload.z_shape)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DecodeError(f"entropy decoding failed ({exc})") from None
        if decoded["symbols_crc32"] & 0xFFFF != payload.symbols_check:
            raise DecodeError(
                "entropy decoding desynchronised (symbol check mismatch): the file is corrupted, or was "
                "encoded on a machine whose floating point differs from this one"
            )
        t1 = time.perf_counter()
        y_hat, core, margin = decoded["y_hat"], TILE_CORE // 16, TILE_MARGIN // 16
        if generative:
            x_hat, bypass = tiled_apply(lambda t: model.synthesize(t, rate_level=level, with_bypass=True),
                                        y_hat, (Fraction(16), Fraction(2)), core, margin, tile_workers())
        else:
            x_hat = tiled_apply(lambda t: model.synthesize(t, rate_level=level, with_bypass=False)[0],
                                y_hat, Fraction(16), core, margin, tile_workers())
        t2 = time.perf_counter()
        self.last_timings = {"entropy_decode_s": t1 - t0, "synthesis_s": t2 - t1}
        if record is not None:
            record.update(anchor_frame_raw=x_hat.float().clone(), bypass_latent=bypass.float().clone()
                          if generative else None)
        if generative:
            x_hat = pipe.decode_image(x_hat.clamp(0, 1), bypass, steps=steps, seed=seed, record=record)
            self.last_timings["next_frame_s"] = time.perf_counter() - t2
        x_hat = x_hat[:, :, :height, :width]
        if color_stats is not None:
            if record is not None:
                record["x_hat"] = x_hat.float().clone()
            x_hat = color_fix(x_hat, color_stats)
        if record is not None:
            record["output"] = x_hat.float().clone()
        return to_uint8(x_hat)

    def decode(self, data: bytes, **options) -> np.ndarray:
        """Decode complete .ulb file bytes to HxWx3 uint8 RGB (options: see decode_container)."""
        return self.decode_container(Container.from_bytes(data), **options)
