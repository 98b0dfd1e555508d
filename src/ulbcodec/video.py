"""Video codec: keyframes + autoregressive diffusion prediction, with an encoder-side
perceptual threshold (after Li et al. 2024, with a real decoder).

::

    encoder                                              decoder
    ───────                                              ───────
    K frames ─► image codec (ANCH chunks) ─► decoded     ANCH ─► image decoder ─► K frames
    loop:                                                for each round in GOPS:
      predict P frames from the last K decoded             predict from the last K decoded
        (noise seeded by (seed, first frame index))          (same seed, same frame index)
      accept the longest prefix with                       keep the accepted a frames
        distance(pred_j, original_j) <= threshold
      none accepted: [--anchored] code a small anchor     anchored round: ANCH ─► anchor
        of the first frame, predict again from it          frame ─► guide the prediction
        (SDEdit-style guide); still none ─►
      next K keyframes (also after max_gop frames)
    HEAD(K, P, steps, threshold, metric, max_gop, seed[, anchor level, guide timestep])
      + GOPS(segments, rounds) + ANCH (keyframes and round anchors, in frame order)

The decoder never sees the originals: the GOPS chunk tells it, round by round, how many
predicted frames the encoder accepted, and each round's noise depends only on the stream
seed and the index of the round's first frame. Everything is in the file and counted in
bpp. Predictions run on a fixed number of threads (models/frame_predictor.py), so the
decoder's frames equal the encoder's on the same machine and build.

Memory is bounded by a window of K + P frames on either side: frames are streamed in
and out, never the whole clip.
"""

from __future__ import annotations

import collections
import itertools
import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ulbcodec import bitstream
from ulbcodec.bitstream import (AnchorPayload, BitstreamError, Chunk, Container, GopStructure, Header,
                                InterFrameParts, PFrame, PFramePayload, Round, inter_chunk, inter_frame_bytes,
                                pframe_parts, split_inter_frame, write_uvarint)
from ulbcodec.entropy.block_flags import decode_flags, encode_flags
from ulbcodec.image import DecodeError, ImageCodec, pad_replicate, to_tensor, to_uint8
from ulbcodec import packages
from ulbcodec.losses.rate_distortion import MSE_WEIGHT, PERCEPTUAL_MIN_SIDE, perceptual_terms
from ulbcodec.models.frame_predictor import fixed_threads
from ulbcodec.models.latent_conditional_codec import LatentConditionalCodec, TemporalLatentPrior
from ulbcodec.motion import coding as motion_coding
from ulbcodec.motion.field import warp
from ulbcodec.motion.search import best_field

METRICS = {"ms-ssim": 1, "lpips": 2}
# Fused P frames: the encoder tries residuals this many levels below the P-frame level
# (clamped at level 0), the range the temporal fusion was trained on (train/temporal_fusion.py).
FUSION_DROPS = (2, 3, 4)
# Skipped blocks fade into coded ones over 2·radius pixels: a hard copy's seams add a block
# grid, a wide fade ghosts two frames over each other (BENCHMARKS.md, "Skipped blocks").
SKIP_FADE_RADIUS = 2
MAX_STEPS = 100  # sampler steps a file may ask for: bounds the decoder's work per round
METRIC_NAMES = {v: k for k, v in METRICS.items()}


def frame_distance(ref: np.ndarray, dist: np.ndarray, metric: str = "ms-ssim") -> float:
    """Perceptual distance of two HxWx3 uint8 frames, 0 = identical.

    ``ms-ssim``: 1 − MS-SSIM (1 − SSIM for frames under 161 px, where MS-SSIM is
    undefined). ``lpips``: LPIPS (AlexNet) where its package and weights are installed;
    elsewhere :class:`~ulbcodec.metrics.MetricUnavailable` names what is missing.
    """
    from ulbcodec import metrics

    if metric == "ms-ssim":
        if min(ref.shape[:2]) >= metrics.MS_SSIM_MIN_SIDE:
            return 1.0 - metrics.ms_ssim(ref, dist)
        from pytorch_msssim import ssim

        to = lambda a: torch.from_numpy(np.array(a, dtype=np.float32)).permute(2, 0, 1)[None]  # noqa: E731
        return 1.0 - float(ssim(to(ref), to(dist), data_range=255.0, win_size=min(11, min(ref.shape[:2]) // 2 * 2 - 1)))
    if metric == "lpips":
        return metrics.lpips(ref, dist)
    raise ValueError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")


@dataclass
class VideoSettings:
    threshold: float = 0.4  # 1 - MS-SSIM: the shipped model's keyframes alone sit at 0.25-0.4 on our clips
    metric: str = "ms-ssim"
    max_gop: int = 64
    seed: int = 0
    rate_level: Optional[int] = None
    generative_keyframes: bool = False
    # Anchored rounds: when a round accepts nothing, first try one guided by a small
    # anchor of its first frame (``anchor_level``: default the lowest) before keyframes.
    anchored: bool = False
    anchor_level: Optional[int] = None
    guide_timestep: int = 600
    steps: Optional[int] = None  # sampler steps of every prediction (default: the model's); in the file
    keyframe_group: Optional[int] = None  # keyframes coded when a prediction fails, 1..K (default K)
    # Conditional P frames (a package with a ``pframe`` component): a frame the predictor
    # cannot carry is coded given the previous decoded frame instead of restarting with
    # keyframes; keyframes come at the start, at scene cuts and after max_gop frames.
    pframes: bool = True
    pframe_level: Optional[float] = None  # default: the keyframe level (one λ scale)
    predictor: bool = True  # False: never run the diffusion predictor (P frames only)
    scene_cuts: bool = True  # False: never replace a P frame by a keyframe of lower R + λD (ablations, tests)
    motion: bool = True  # False: P frames without coded motion (ablations)
    long_term: bool = True  # False: P frames never reference the last keyframe (ablations; GOP syntax 3 files)
    # Mode decisions (not the motion search) also weigh this × (detail + VIF losses,
    # losses/rate_distortion.py): VMAF's features, which MSE alone trades for smoothness.
    perceptual_weight: float = 0.0
    skip_blocks: bool = True  # False: P frames never leave blocks to their reference (ablations)


@dataclass
class FrameRecord:
    """One coded frame, as ``ulbc encode -v`` reports it: its type letter
    (:meth:`GopStructure.frame_types`), the bytes of its chunk (0 for a predicted frame),
    the predictor's distance to the original that decided it (None where the predictor
    did not run), and for an inter frame which parts it codes."""

    index: int
    type: str
    bytes: int
    distance: Optional[float] = None
    parts: str = ""  # an inter frame's reference and coded parts: "motion", "long-term+motion+residual", ...


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def _block_errors(decoded: np.ndarray, target: np.ndarray, block: int, grid: Tuple[int, int]) -> np.ndarray:
    """Squared error of ``decoded`` summed over each ``block``-pixel block of a ``grid``
    [rows, cols] that covers the frame from its top-left corner (0 past its edges)."""
    h, w = target.shape[:2]
    error = np.zeros((grid[0] * block, grid[1] * block))
    error[:h, :w] = ((decoded.astype(np.float64) - target) ** 2).sum(axis=2)
    return error.reshape(grid[0], block, grid[1], block).sum(axis=(1, 3))


def _box_sum(values: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Sum over a window of 2·radius + 1 along ``axis``, edges replicated (integers)."""
    pad = [(0, 0)] * values.ndim
    pad[axis] = (radius + 1, radius)
    sums = np.cumsum(np.pad(values, pad, mode="edge"), axis=axis)
    n = values.shape[axis]
    return np.take(sums, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis) - np.take(sums, np.arange(n),
                                                                                              axis=axis)


def keep_reference(decoded: np.ndarray, reference: np.ndarray, skip: np.ndarray, block: int,
                   radius: int = SKIP_FADE_RADIUS) -> np.ndarray:
    """``decoded`` with the ``block``-pixel blocks that ``skip`` marks taken from ``reference``,
    cross-faded where a skipped block meets a coded one: the weight of the reference is the
    share of skipped pixels in the (2·radius+1)-pixel square around each pixel, in 64ths.
    Integer arithmetic: every machine composes the same frame."""
    h, w = decoded.shape[:2]
    mask = np.repeat(np.repeat(skip, block, axis=0), block, axis=1)[:h, :w].astype(np.int64)
    count = _box_sum(_box_sum(mask, radius, 0), radius, 1)
    area = (2 * radius + 1) ** 2
    weight = ((count * 64 + area // 2) // area)[..., None]
    out = (weight * reference.astype(np.int64) + (64 - weight) * decoded.astype(np.int64) + 32) >> 6
    return out.astype(np.uint8)


@dataclass
class _Decoded:
    """A decoded frame of the history and its predictor latent, computed on first use."""

    frame: np.ndarray
    latent: Optional[torch.Tensor] = None


@dataclass
class _ReferenceModes:
    """The encoder's inter-frame modes on one reference: its best motion (None: repeat)
    and the reference as it gives it, the candidates (cost, unit, parts, decoded) of
    repeat, warp and P frames, the fused P frames' and the P frame with skipped blocks'
    (None until tried), and what the latter start from: the P frame on the (warped)
    reference, decoded, and its estimated bits per skippable block (None: the codec has
    no skippable blocks, or the encode does not skip)."""

    unit: PFrame  # the repeat or warp: the reference and motion flags the other modes share
    motion: Optional[bitstream.MotionPayload]
    warped: np.ndarray
    candidates: List[Tuple[float, PFrame, Optional[bytes], np.ndarray]]
    fused: Optional[List[Tuple[float, PFrame, Optional[bytes], np.ndarray]]] = None
    skipped: Optional[List[Tuple[float, PFrame, Optional[bytes], np.ndarray]]] = None
    coded: Optional[np.ndarray] = None
    block_bits: Optional[np.ndarray] = None

    @property
    def warp_cost(self) -> float:
        return min(c[0] for c in self.candidates if not c[1].residual)


def file_bpp(data: bytes) -> float:
    """bpp of a complete .ulb file: its size x 8 / (width x height x frames)."""
    h = Container.from_bytes(data).header
    return len(data) * 8 / (h.width * h.height * h.frames)


def is_video_package(package: packages.ModelPackage) -> bool:
    return bool(package.extra.get("video")) and "predictor" in package.components


class VideoCodec:
    """Encode/decode frame sequences with a video model package (an image model plus a
    frame predictor: components ``predictor`` and ``predictor_scheduler``, settings in
    ``extra.video``)."""

    def __init__(self, package: packages.ModelPackage, device="cpu", image: Optional[ImageCodec] = None):
        if not is_video_package(package):
            raise packages.ModelError(f"model {package.name!r} has no frame predictor (not a video model)")
        video = package.extra["video"]
        self.package = package
        self.image = image if image is not None and image.package is package else ImageCodec(package, device)
        self.cond_frames, self.pred_frames, self.steps = video["cond_frames"], video["pred_frames"], video["steps"]
        self.residual_scale = video.get("residual_scale")
        self._predictor = None
        self.has_pframes = "pframe" in package.components
        self._pframe = None
        self.has_fusion = self.has_pframes and "temporal_fusion" in package.components
        self._fusion = None
        # (key, modes) of the last _reference_modes calls, one per reference kind
        self._last_modes: Deque[Tuple[tuple, _ReferenceModes]] = collections.deque(maxlen=3)
        # λ per P-frame level: the package's rate levels (keyframes and P frames share them;
        # a package may offer keyframe levels above the P-frame codec's own, _codec_level)
        self.pframe_lambdas = {lv.level: lv.lmbda for lv in package.rate_levels} if self.has_pframes else {}
        self._perceptual_weight = 0.0  # of the encode under way (VideoSettings.perceptual_weight)
        self._skip_blocks = True  # of the encode under way (VideoSettings.skip_blocks)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "video", device="cpu") -> "VideoCodec":
        return cls(packages.ModelPackage.load_manifest(packages.resolve(name_or_path)), device)

    @property
    def predictor(self):
        """The frame predictor: the package's UNet in the image model's latent space, or a
        pretrained image-to-video model (``extra.video.predictor``, models/i2v_predictor.py)."""
        if self._predictor is None:
            kind = self.package.extra["video"].get("predictor", "unet")
            if kind == "unet":
                from ulbcodec.models.frame_predictor import FramePredictionPipeline

                place = self.image.placement
                unet = self.package.build("predictor", device=str(place.home), dtype=place.diffusers_dtype)
                self._predictor = FramePredictionPipeline(self.image.next_frame, unet,
                                                          self.package.build("predictor_scheduler"),
                                                          self.cond_frames, self.pred_frames, self.residual_scale)
            else:
                from ulbcodec.models import i2v_predictor

                if kind != i2v_predictor.KIND:
                    raise packages.ModelError(f"model {self.package.name!r}: unknown frame predictor {kind!r}")
                self._predictor = i2v_predictor.from_package(self.package, self.image.placement)
                if (self.cond_frames, self.pred_frames) != (1, self._predictor.pred_frames):
                    raise packages.ModelError(f"model {self.package.name!r}: an image-to-video predictor "
                                              f"conditions on K=1 frame, the package says K={self.cond_frames}")
        return self._predictor

    # ------------------------------------------------------------------ shared by both sides

    @property
    def pframe_codec(self):
        """The conditional P-frame codec (:mod:`ulbcodec.models.pframe_codec`, or the keyframe
        codec with a temporal prior over its symbols: :mod:`ulbcodec.models.latent_conditional_codec`),
        or None for a package without one (its files use keyframes and predictions only)."""
        if self._pframe is None and self.has_pframes:
            component = self.package.build("pframe", device=str(self.image.placement.home))
            if isinstance(component, TemporalLatentPrior):  # P frames in the keyframe codec's own latent
                if self.package.per_level("anchor_codec"):
                    raise packages.ModelError(f"model {self.package.name!r}: a temporal latent prior needs one "
                                              "keyframe codec for every level, not one per level")
                component = LatentConditionalCodec(self.image.model, component)
            self._pframe = component
        return self._pframe

    @property
    def temporal_fusion(self):
        """The network that fuses a fused P frame's low-rate decode with its (warped)
        reference (:mod:`ulbcodec.models.temporal_fusion`), or None for a package without one."""
        if self._fusion is None and self.has_fusion:
            self._fusion = self.package.build("temporal_fusion", device=str(self.image.placement.home)).eval()
        return self._fusion

    def _fusion_levels(self, level: int) -> List[int]:
        """The residual levels of the fused P frames the encoder tries at P-frame level ``level``."""
        if not self.has_fusion:
            return []
        return sorted({max(0, level - d) for d in FUSION_DROPS} - {level}, reverse=True)

    def _fuse(self, decoded: np.ndarray, reference: np.ndarray, level: int, reference_level: int) -> np.ndarray:
        """A fused P frame: its residual's decode (at ``level``) fused with its (warped)
        reference (of the P-frame level); on the fixed thread count, like P-frame synthesis,
        so that the encoder's fused frame (the next frame's reference) equals the decoder's."""
        h, w = decoded.shape[:2]
        home = self.image.placement.home
        with fixed_threads(), torch.no_grad():
            out = self.temporal_fusion(pad_replicate(to_tensor(decoded), 4).to(home),
                                       pad_replicate(to_tensor(reference), 4).to(home), level, reference_level)
        return to_uint8(out[..., :h, :w])

    def _keyframe_decode(self, payload: AnchorPayload, width: int, height: int, level: int, generative: bool):
        if not generative:  # the anchor path is bit-exact for any thread count (docs/bitstream.md)
            return self.image.decode_anchor(payload, width, height, level, anchor_only=True)
        with fixed_threads():  # the generative decoder is not; a fixed thread count keeps both sides equal
            return self.image.decode_anchor(payload, width, height, level, anchor_only=False)

    def _latent(self, frame: np.ndarray) -> torch.Tensor:
        return self.predictor.encode_frame(pad_replicate(to_tensor(frame), self.predictor.multiple)[0])

    def _predict(self, history: Deque["_Decoded"], seed: int, first_frame: int, steps: int,
                 guide: Optional[torch.Tensor] = None, guide_timestep: int = 0) -> Iterator[np.ndarray]:
        """The next P frames after ``history`` (the last K decoded frames), decoded lazily:
        a caller that stops early saves the rest of the VAE work. ``guide``: the latent of
        the round's anchor (anchored rounds)."""
        h, w = history[-1].frame.shape[:2]
        for entry in history:  # latents on first use: a clip coded with P frames alone needs none
            if entry.latent is None:
                entry.latent = self._latent(entry.frame)
        latents = self.predictor.predict_latents(torch.stack([e.latent for e in history]), seed, first_frame,
                                                 steps, guide, guide_timestep)
        return (to_uint8(self.predictor.decode_frame(latent)[None, :, :h, :w]) for latent in latents)

    def _anchor_guide(self, payload: AnchorPayload, width: int, height: int, level: int) -> torch.Tensor:
        """The latent of an anchored round's anchor frame (decoded without the generative decoder)."""
        return self._latent(self.image.decode_anchor(payload, width, height, level, anchor_only=True))

    def _codec_level(self, level: float) -> float:
        """The P-frame codec's gain level for a P-frame level: the level itself, or the
        codec's top level when the package's keyframe codec offers higher ones (their λ
        still steers the encoder's choices, :meth:`_rd_cost`)."""
        return min(level, self.pframe_codec.num_rate_levels - 1)

    def _padded(self, frame: np.ndarray) -> torch.Tensor:
        return pad_replicate(to_tensor(frame), self.pframe_codec.required_multiple).to(self.image.placement.home)

    def _skip_grid(self, width: int, height: int) -> Tuple[int, int]:
        """(rows, cols) of the P-frame codec's skippable blocks over a frame (padded)."""
        multiple, block = self.pframe_codec.required_multiple, self.pframe_codec.skip_block
        return -(-height // multiple) * multiple // block, -(-width // multiple) * multiple // block

    def _code_pframe(self, frame: np.ndarray, ref: np.ndarray, level: int, skip: Optional[np.ndarray] = None,
                     block_bits: bool = False) -> Tuple[PFramePayload, np.ndarray, Optional[np.ndarray]]:
        """(payload, the P-frame codec's decode as the decoder will rebuild it, and with
        ``block_bits`` the estimated bits of each skippable block, else None) of ``frame``
        coded given ``ref``, without the blocks that ``skip`` marks. Both need a codec with
        ``skip_block``s (block bits are None without)."""
        h, w = frame.shape[:2]
        options = {} if skip is None else {"skip": torch.from_numpy(skip)}
        if block_bits and self.pframe_codec.skip_block:
            options["position_bits"] = True
        with fixed_threads():  # g_s is not thread-count invariant; the entropy path is (models/pframe_codec.py)
            out = self.pframe_codec.compress(self._padded(frame), self._padded(ref), self._codec_level(level),
                                             **options)
        y_string, z_string = out["strings"]
        payload = PFramePayload(tuple(out["shape"]), z_string, y_string, out["symbols_crc32"] & 0xFFFF)
        bits = out["position_bits"].double().numpy() if "position_bits" in out else None
        return payload.padded_for(w, h), to_uint8(out["x_hat"][..., :h, :w]), bits

    def _decode_pframe(self, payload: PFramePayload, ref: np.ndarray, level: int,
                       skip: Optional[np.ndarray] = None) -> np.ndarray:
        h, w = ref.shape[:2]
        multiple = self.pframe_codec.required_multiple
        if tuple(payload.z_shape) != (-(-h // multiple), -(-w // multiple)):
            raise BitstreamError(f"P-frame hyper-latent shape {payload.z_shape} does not match a {w}x{h} frame")
        payload.check_size(w, h)
        with fixed_threads():
            try:
                out = self.pframe_codec.decompress([payload.y_string, payload.z_string], payload.z_shape,
                                                   self._padded(ref), self._codec_level(level),
                                                   **({} if skip is None else {"skip": torch.from_numpy(skip)}))
            except (RuntimeError, ValueError, IndexError) as exc:
                raise DecodeError(f"P-frame entropy decoding failed ({exc})") from None
        if out["symbols_crc32"] & 0xFFFF != payload.symbols_check:
            raise DecodeError("P-frame entropy decoding desynchronised (decoded-symbol check failed): "
                              "a corrupted file, or a machine whose arithmetic differs from the encoder's")
        return to_uint8(out["x_hat"][..., :h, :w])

    def _rd_cost(self, bits: float, decoded: np.ndarray, target: np.ndarray, level: int,
                 perceptual: bool = True) -> float:
        """R + λ·D of one coded frame at a level's λ (R in bits per pixel, D the training
        objective's MSE term, plus ``perceptual_weight`` × (detail + VIF losses) where the
        encode asks for it and ``perceptual``): what the encoder compares P-frame modes and
        keyframes by."""
        distortion = MSE_WEIGHT * (_mse(decoded, target) / 255**2)
        if perceptual and self._perceptual_weight and min(target.shape[:2]) >= PERCEPTUAL_MIN_SIDE:
            with torch.no_grad():
                detail, vif = perceptual_terms(to_tensor(decoded), to_tensor(target))
            distortion += self._perceptual_weight * float(detail + vif)
        return bits / (target.shape[0] * target.shape[1]) + self.pframe_lambdas[level] * distortion

    def _best_pframe(self, target: np.ndarray, previous: np.ndarray, forecast: Optional[np.ndarray],
                     level: int, motion: bool = True, keyframe: Optional[np.ndarray] = None
                     ) -> Tuple[float, PFrame, Optional[bytes], np.ndarray]:
        """(cost, unit, coded parts or None, decoded) of the inter frame of ``target`` with
        the lowest R + λ·D over up to three references (the previous decoded frame, the
        predictor's forecast of this frame where there is one, and the last decoded
        keyframe where it is not the previous frame) and four modes: the reference
        repeated (zero bytes), the reference warped along a coded motion field, the
        conditional P-frame codec given the (warped) reference, and (a package with a
        temporal fusion) that codec at lower levels, its decode fused with the (warped)
        reference. Fused P frames are tried on one reference only, the one whose repeat or
        warp costs least: each costs a P frame and a fusion per level tried. R counts the
        parts and their length prefix in the segment's INTR chunk. A residual P frame
        comes back with skipped blocks where those cost less, but with the cost of the
        frame without them (BENCHMARKS.md, "Skipped blocks")."""
        if keyframe is previous:
            keyframe = None
        references = ((previous, PFrame(residual=False)), (forecast, PFrame(forecast=True, residual=False)),
                      (keyframe, PFrame(residual=False, long_term=True)))
        entries = [self._reference_modes(target, ref, kind, level, motion) for ref, kind in references
                   if ref is not None]
        best_warp = min(entries, key=lambda e: e.warp_cost)
        if best_warp.fused is None:
            best_warp.fused = self._fused_candidates(target, best_warp, level)
        best = min((c for e in entries for c in e.candidates + (e.fused or [])), key=lambda c: c[0])
        if not best[1].residual:
            return best
        # Skipped blocks only refine the residual P frame chosen without them: its cost
        # still decides against repeats, warps, predictions and keyframes.
        for entry in entries:
            if entry.skipped is None:
                entry.skipped = self._skip_block_candidates(target, entry, level)
        refined = [c for e in entries for c in e.skipped if c[0] < best[0]]
        return (best[0], *min(refined, key=lambda c: c[0])[1:]) if refined else best

    def _candidate(self, target: np.ndarray, level: int, unit: PFrame, parts: InterFrameParts, decoded: np.ndarray
                   ) -> Tuple[float, PFrame, Optional[bytes], np.ndarray]:
        """(R + λD, unit, its coded parts or None, decoded) of one inter-frame mode."""
        part = inter_frame_bytes(parts) if unit.has_parts else None
        bits = 8 * (len(part) + len(write_uvarint(len(part)))) if part is not None else 0
        return self._rd_cost(bits, decoded, target, level), unit, part, decoded

    def _reference_modes(self, target: np.ndarray, ref: np.ndarray, reference: PFrame, level: int,
                         motion: bool) -> "_ReferenceModes":
        """The modes of :meth:`_best_pframe` on one reference but the fused ones (and, for
        a P-frame codec whose reconstruction does not depend on its reference, that codec
        given the unwarped reference as well). The last results of each reference are
        kept: the encoder asks for the same frame and references twice when a prediction
        loses to a P frame (once to judge it, once to code the P frame)."""
        key = (target, ref, reference, level, motion)
        for last_key, last in self._last_modes:
            if all(a is b if isinstance(a, np.ndarray) else a == b for a, b in zip(key, last_key)):
                return last
        entry = _ReferenceModes(reference, None, ref, [self._candidate(target, level, reference, InterFrameParts(
            None, None, None), ref)])
        if motion:
            field, entry.warped, _ = best_field(target, ref,
                                                lambda bits, pred: self._rd_cost(bits, pred, target, level, False))
            if field is not None:
                entry.motion = motion_coding.compress(field)
                entry.unit = reference._replace(motion=True)
                entry.candidates.append(self._candidate(target, level, entry.unit,
                                                        InterFrameParts(entry.motion, None, None), entry.warped))
        payload, entry.coded, entry.block_bits = self._code_pframe(target, entry.warped, level,
                                                                   block_bits=self._skip_blocks)
        entry.candidates.append(self._candidate(target, level, entry.unit._replace(residual=True),
                                                InterFrameParts(entry.motion, None, payload), entry.coded))
        if entry.motion is not None and self.pframe_codec.reconstruction_ignores_reference:
            # the reference only informs its entropy model: the motion's bytes may cost
            # more than the prediction they save
            payload, decoded, _ = self._code_pframe(target, ref, level)
            entry.candidates.append(self._candidate(target, level, reference._replace(residual=True),
                                                    InterFrameParts(None, None, payload), decoded))
        self._last_modes.append((key, entry))
        return entry

    def _skip_block_candidates(self, target: np.ndarray, entry: "_ReferenceModes", level: int
                               ) -> List[Tuple[float, PFrame, Optional[bytes], np.ndarray]]:
        """The P frame on ``entry``'s (warped) reference with skipped blocks: each block of
        the P-frame codec's latent positions is left to the reference where that costs less
        in R + λD than the block's coded decode (``entry.coded``) and estimated bits; the
        P frame is then coded without those blocks. No candidate where the entry has no
        block bits, or where no block, or every block, would be skipped (a repeat or warp
        is already a candidate)."""
        if entry.block_bits is None:
            return []
        block = self.pframe_codec.skip_block
        grid = entry.block_bits.shape
        weight = self.pframe_lambdas[level] * MSE_WEIGHT / (3 * 255**2)  # per squared error, in bits
        skip = weight * _block_errors(entry.warped, target, block, grid) <= (
            weight * _block_errors(entry.coded, target, block, grid) + entry.block_bits)
        if not skip.any() or skip.all():
            return []
        payload, coded, _ = self._code_pframe(target, entry.warped, level, skip)
        unit = entry.unit._replace(residual=True, skip_blocks=True)
        return [self._candidate(target, level, unit, InterFrameParts(entry.motion, encode_flags(skip), payload),
                                keep_reference(coded, entry.warped, skip, block))]

    def _fused_candidates(self, target: np.ndarray, entry: "_ReferenceModes", level: int
                          ) -> List[Tuple[float, PFrame, Optional[bytes], np.ndarray]]:
        """Fused P frames on the (warped) reference of ``entry``, one per level of
        :meth:`_fusion_levels`."""
        out = []
        for fused_level in self._fusion_levels(level):
            payload, decoded, _ = self._code_pframe(target, entry.warped, fused_level)
            unit = entry.unit._replace(residual=True, fusion_drop=level - fused_level)
            out.append(self._candidate(target, level, unit, InterFrameParts(entry.motion, None, payload),
                                       self._fuse(decoded, entry.warped, fused_level, level)))
        return out

    @staticmethod
    def _chunks(entries: List, gops: GopStructure) -> List[Chunk]:
        """The file's chunks after GOPS, in frame order, from the encoder's entries (ANCH
        chunks, and (segment, parts) of each coded inter frame): one PFRM chunk per P frame
        in GOP syntax 2, one INTR chunk per segment in syntax 3."""
        if gops.syntax not in bitstream.INTER_CHUNK_SYNTAXES:
            return [e if isinstance(e, Chunk) else Chunk(bitstream.CHUNK_PFRAME, e[1]) for e in entries]
        by_segment = collections.defaultdict(list)
        for e in entries:
            if not isinstance(e, Chunk):
                by_segment[e[0]].append(e[1])
        out, placed = [], set()
        for e in entries:
            if isinstance(e, Chunk):
                out.append(e)
            elif e[0] not in placed:  # the segment's inter frames, where its first one stands
                placed.add(e[0])
                out.append(Chunk(bitstream.CHUNK_INTER, inter_chunk(by_segment[e[0]])))
        return out

    # ------------------------------------------------------------------ encode

    def encode(self, frames: Iterable[np.ndarray], fps: Fraction, settings: VideoSettings,
               progress: Optional[Callable[[int], None]] = None,
               reconstruction: Optional[Callable[[np.ndarray], None]] = None,
               frame_log: Optional[Callable[[FrameRecord], None]] = None) -> Tuple[bytes, GopStructure]:
        """Code a stream of HxWx3 uint8 frames; returns (.ulb bytes, GOP structure).

        ``reconstruction`` is called with every frame as the decoder will output it
        (decoded keyframes, accepted predictions, P frames), in order; ``frame_log`` with
        a :class:`FrameRecord` per frame (its type, bytes and the distance that decided it)."""
        emit = reconstruction or (lambda frame: None)
        note = frame_log or (lambda record: None)
        self._last_modes.clear()
        self._perceptual_weight = settings.perceptual_weight
        self._skip_blocks = settings.skip_blocks
        K, P = self.cond_frames, self.pred_frames
        steps = self.steps if settings.steps is None else settings.steps
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"sampler steps must be 1..{MAX_STEPS}, got {steps}")
        level = self.image.default_level if settings.rate_level is None else settings.rate_level
        if level not in self.image.rate_levels:
            raise ValueError(f"rate level {level} not offered by model {self.package.name!r}")
        if settings.metric not in METRICS:
            raise ValueError(f"unknown metric {settings.metric!r} (choose from {', '.join(METRICS)})")
        if settings.threshold < 0 or settings.max_gop < 0:
            raise ValueError("threshold and max-gop must be non-negative")
        use_pframes = settings.pframes and self.has_pframes
        pframe_level = level if settings.pframe_level is None else settings.pframe_level
        if use_pframes and pframe_level not in self.pframe_lambdas:
            raise ValueError(f"P-frame rate level {pframe_level} not offered by model {self.package.name!r}")
        if not settings.predictor and not use_pframes:
            raise ValueError(f"model {self.package.name!r} has no P-frame codec: it needs the predictor")
        source = iter(frames)
        lookahead: Deque[np.ndarray] = collections.deque()

        def fill(n: int) -> int:
            while len(lookahead) < n:
                frame = next(source, None)
                if frame is None:
                    break
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or (
                        size is not None and frame.shape[:2] != (size[1], size[0])):
                    raise ValueError(f"frame {index + len(lookahead)} is {frame.dtype} {frame.shape}, "
                                     "frames must all be HxWx3 uint8 of one size")
                lookahead.append(frame)
            return len(lookahead)

        def accept(targets: List[np.ndarray], predicted: Iterator[np.ndarray]) -> Tuple[List, List, Optional]:
            """The longest prefix of predictions within the threshold of their originals and,
            with P frames, no worse in R + λ·D (at zero bits) than the best P frame from the
            frame before; their distances (with the first rejected one's), and the first
            rejected prediction."""
            out, distances = [], []
            previous = history[-1].frame
            for frame, pred in zip(targets, predicted):
                distances.append(frame_distance(frame, pred, settings.metric))
                if distances[-1] > settings.threshold or (use_pframes and self._rd_cost(
                        0, pred, frame, pframe_level) > self._best_pframe(frame, previous, None, pframe_level,
                                                                          settings.motion, last_keyframe)[0]):
                    return out, distances, pred
                out.append(pred)
                previous = pred
            return out, distances, None

        keyframe_group = K if settings.keyframe_group is None else settings.keyframe_group
        if not 1 <= keyframe_group <= K:
            raise ValueError(f"keyframe group must be 1..{K} (the model conditions on K={K} frames)")
        anchor_level = self.image.rate_levels[0] if settings.anchor_level is None else settings.anchor_level
        if anchor_level not in self.image.rate_levels:
            raise ValueError(f"anchor level {anchor_level} not offered by model {self.package.name!r}")
        index, segments, payloads, size = 0, [], [], None
        # A keyframe that a scene-cut test already coded (payload, decoded), and the bytes
        # and MSE of the last keyframe: a P frame worse on either triggers that test.
        scene_cut: Optional[Tuple[AnchorPayload, np.ndarray]] = None
        keyframe_bytes, keyframe_error = 0, 0.0
        last_keyframe: Optional[np.ndarray] = None  # the long-term reference of P frames
        history: Deque[_Decoded] = collections.deque(maxlen=K)
        while fill(1):
            h, w = lookahead[0].shape[:2]
            size = size or (w, h)
            # The first group fills the predictor's history (K frames) unless P frames do;
            # later ones may be smaller, since the history keeps the frames decoded before them.
            group = 1 if use_pframes else K if index == 0 else keyframe_group
            k = min(group, fill(group))
            for _ in range(k):  # keyframes
                frame = lookahead.popleft()
                if scene_cut is None:
                    payload = self.image.encode_anchor(frame, level)
                    decoded = self._keyframe_decode(payload, w, h, level, settings.generative_keyframes)
                else:
                    (payload, decoded), scene_cut = scene_cut, None
                payloads.append(Chunk(bitstream.CHUNK_ANCHOR, payload.to_bytes()))
                keyframe_bytes, keyframe_error = len(payloads[-1].payload), _mse(decoded, frame)
                last_keyframe = decoded if settings.long_term else None
                history.append(_Decoded(decoded))
                emit(decoded)
                note(FrameRecord(index, "K", payloads[-1].size))
                index += 1
            units, gop = [], 0
            while fill(1) and gop < settings.max_gop:
                count = min(P, fill(P), settings.max_gop - gop)
                targets = list(lookahead)[:count]
                accepted, distances, forecast, anchor = [], [], None, None
                if settings.predictor and len(history) == K:
                    accepted, distances, forecast = accept(targets, self._predict(history, settings.seed, index,
                                                                                   steps))
                    if not accepted and settings.anchored:
                        anchor = self.image.encode_anchor(targets[0], anchor_level)
                        guide = self._anchor_guide(anchor, w, h, anchor_level)
                        accepted, distances, _ = accept(targets, self._predict(
                            history, settings.seed, index, steps, guide, settings.guide_timestep))
                if accepted:
                    if anchor is not None:
                        payloads.append(Chunk(bitstream.CHUNK_ANCHOR, anchor.to_bytes()))
                    for j, pred in enumerate(accepted):
                        lookahead.popleft()
                        history.append(_Decoded(pred))
                        emit(pred)
                        cost = payloads[-1].size if anchor is not None and j == 0 else 0
                        note(FrameRecord(index + j, "A" if anchor is not None and j == 0 else "p", cost, distances[j]))
                    units.append(Round(len(accepted), anchor is not None))
                    index += len(accepted)
                    gop += len(accepted)
                    continue
                if not use_pframes:
                    break
                cost, unit, part, decoded = self._best_pframe(targets[0], history[-1].frame, forecast, pframe_level,
                                                              settings.motion, last_keyframe)
                # A scene cut (or a reference grown stale): a keyframe whose R + λ·D is lower.
                if settings.scene_cuts and (len(part or b"") > keyframe_bytes
                                            or _mse(decoded, targets[0]) > keyframe_error):
                    keyframe = self.image.encode_anchor(targets[0], level)
                    key_decoded = self._keyframe_decode(keyframe, w, h, level, settings.generative_keyframes)
                    if self._rd_cost(8 * Chunk(bitstream.CHUNK_ANCHOR, keyframe.to_bytes()).size, key_decoded,
                                     targets[0], pframe_level) <= cost:
                        scene_cut = (keyframe, key_decoded)
                        break
                lookahead.popleft()
                if part is not None:
                    payloads.append((len(segments), part))
                history.append(_Decoded(decoded))
                emit(decoded)
                note(FrameRecord(index, unit.letter, len(part) if part is not None else 0,
                                 distances[0] if distances else None, unit.parts))
                units.append(unit)
                index += 1
                gop += 1
            segments.append((k, units))
            if progress:
                progress(index)
        if not index:
            raise ValueError("the video has no frames")
        gops = GopStructure(segments)
        params = {"threshold_milli": round(settings.threshold * 1000), "metric": METRICS[settings.metric],
                  "cond_frames": K, "pred_frames": P, "steps": steps, "max_gop": settings.max_gop,
                  "keyframe_decoder": int(settings.generative_keyframes)}
        if settings.anchored:
            params.update(anchor_level=anchor_level, guide_timestep=settings.guide_timestep)
        if gops.pframes:
            params.update(pframe_level=pframe_level, gop_syntax=gops.syntax)
        header = Header(bitstream.MEDIA_VIDEO, size[0], size[1], self.package.short_digest, level, index,
                        fps.numerator, fps.denominator, settings.seed, params)
        self._last_modes.clear()
        chunks = [Chunk(bitstream.CHUNK_GOPS, gops.to_bytes())] + self._chunks(payloads, gops)
        return Container(header, chunks).to_bytes(), gops

    def encode_to_bpp(self, open_frames: Callable[[], Iterable[np.ndarray]], fps: Fraction,
                      settings: VideoSettings, target_bpp: float) -> Tuple[bytes, GopStructure, VideoSettings, bool]:
        """The largest file at or under ``target_bpp``, searching keyframe level and threshold.

        The operating points form one ladder ordered by rate: every keyframe level from the
        highest down at ``settings.threshold``, then the lowest level at thresholds growing
        by 1.5x (more predicted frames accepted). The rate falls along the ladder, so a
        binary search needs about log2(len) encodes; ``open_frames`` re-reads the clip for
        each (frames are streamed, never kept). Returns (data, gops, settings used, met);
        when nothing is under the target, the smallest file found with ``met=False``.
        """
        levels = sorted(self.image.rate_levels, reverse=True)
        base = settings.threshold if settings.threshold > 0 else 0.02
        ladder = [(lv, settings.threshold) for lv in levels]
        ladder += [(levels[-1], round(base * 1.5 ** i, 3)) for i in range(1, 7)]
        lo, hi, best, smallest = 0, len(ladder) - 1, None, None
        while lo <= hi:
            mid = (lo + hi) // 2
            level, threshold = ladder[mid]
            tried = dataclasses.replace(settings, rate_level=level, threshold=threshold)
            data, gops = self.encode(open_frames(), fps, tried)
            result = (data, gops, tried)
            if smallest is None or len(data) < len(smallest[0]):
                smallest = result
            if file_bpp(data) <= target_bpp:
                best, hi = result, mid - 1
            else:
                lo = mid + 1
        return (*best, True) if best else (*smallest, False)

    # ------------------------------------------------------------------ decode

    def decode_container(self, container: Container) -> Iterator[np.ndarray]:
        """Frames of a video file, streamed in order."""
        h = container.header
        if h.media != bitstream.MEDIA_VIDEO:
            raise DecodeError(f"file holds a {h.media_name}, not a video")
        self.image.check_model(h)
        if h.rate_level not in self.image.rate_levels:
            raise DecodeError(f"rate level {h.rate_level} is not offered by model {self.package.name!r}")
        K, P = h.params.get("cond_frames"), h.params.get("pred_frames")
        if (K, P) != (self.cond_frames, self.pred_frames):
            raise DecodeError(f"file needs K={K}, P={P}; model {self.package.name!r} predicts "
                              f"K={self.cond_frames}, P={self.pred_frames}")
        steps = h.params.get("steps")
        if steps is None or not 1 <= steps <= MAX_STEPS:
            raise BitstreamError(f"sampler steps {steps} outside 1..{MAX_STEPS}")
        gops = bitstream.video_gops(container)  # run lengths <= max_gop, before any frame
        anchors = container.find(bitstream.CHUNK_ANCHOR)
        if len(anchors) != gops.keyframes + gops.anchored_rounds:
            raise BitstreamError(f"GOPS announces {gops.keyframes} keyframes and {gops.anchored_rounds} anchored "
                                 f"rounds, the file holds {len(anchors)} anchors")
        pframes = iter(pframe_parts(container, gops))  # PFRM or INTR chunks, counts checked
        pframe_level = h.params.get("pframe_level")
        if gops.pframes:
            if not self.has_pframes:
                raise DecodeError(f"file has P frames; model {self.package.name!r} has no P-frame codec")
            if pframe_level not in self.pframe_lambdas:
                raise BitstreamError(f"P-frame rate level {pframe_level} not offered by model {self.package.name!r}")
            drops = {u.fusion_drop for u in gops.pframe_units()} - {0}
            if drops and not self.has_fusion:
                raise DecodeError(f"file has fused P frames; model {self.package.name!r} has no temporal fusion")
            if any(pframe_level - d not in self.pframe_lambdas for d in drops):
                raise BitstreamError(f"a fused P frame {max(drops)} levels below P-frame level {pframe_level} "
                                     f"is not a level of model {self.package.name!r}")
            if gops.skip_block_frames and not self.pframe_codec.skip_block:
                raise DecodeError(f"file has P frames with skipped blocks; the P-frame codec of model "
                                  f"{self.package.name!r} codes every block")
        anchor_level, guide_timestep = h.params.get("anchor_level"), h.params.get("guide_timestep")
        if gops.anchored_rounds and (anchor_level not in self.image.rate_levels or guide_timestep is None):
            raise BitstreamError("anchored rounds need a valid anchor level and guide timestep in the header")
        generative = bool(h.params.get("keyframe_decoder", 0))
        history: Deque[_Decoded] = collections.deque(maxlen=K)
        index, next_anchor, last_keyframe = 0, 0, None

        def needs_history(what: str) -> None:
            if len(history) < K:
                raise BitstreamError(f"{what} needs {K} decoded frames before it, the GOP chunk gives {len(history)}")

        for k, units in gops.segments:
            for _ in range(k):
                payload = AnchorPayload.from_bytes(anchors[next_anchor].payload)
                next_anchor += 1
                frame = last_keyframe = self._keyframe_decode(payload, h.width, h.height, h.rate_level, generative)
                history.append(_Decoded(frame))
                index += 1
                yield frame
            for unit in units:
                if isinstance(unit, PFrame):
                    ref = last_keyframe if unit.long_term else history[-1].frame
                    if unit.forecast:
                        needs_history("a forecast-conditioned P frame")
                        ref = next(self._predict(history, h.seed, index, steps))
                    frame = ref
                    part = next(pframes)
                    if part is not None:
                        parts = split_inter_frame(part, unit)
                        if parts.motion is not None:
                            frame = warp(ref, motion_coding.decompress(parts.motion, h.width, h.height))
                        skip = None if parts.skip_map is None else self._skip_map(parts.skip_map, h.width, h.height)
                        if parts.residual is not None:  # a fused P frame's: fusion_drop levels down
                            level = pframe_level - unit.fusion_drop
                            decoded = self._decode_pframe(parts.residual, frame, level, skip)
                            if unit.fusion_drop:
                                frame = self._fuse(decoded, frame, level, pframe_level)
                            elif skip is not None:
                                frame = keep_reference(decoded, frame, skip, self.pframe_codec.skip_block)
                            else:
                                frame = decoded
                    history.append(_Decoded(frame))
                    index += 1
                    yield frame
                    continue
                needs_history("a prediction round")
                guide = None
                if unit.anchored:
                    payload = AnchorPayload.from_bytes(anchors[next_anchor].payload)
                    next_anchor += 1
                    guide = self._anchor_guide(payload, h.width, h.height, anchor_level)
                # A round's frames all come from the latents of the history before it.
                predicted = self._predict(history, h.seed, index, steps, guide, guide_timestep or 0)
                for frame in itertools.islice(predicted, unit.accepted):
                    index += 1
                    yield frame
                    history.append(_Decoded(frame))

    def _skip_map(self, data: bytes, width: int, height: int) -> np.ndarray:
        try:
            return decode_flags(data, self._skip_grid(width, height))
        except ValueError as exc:
            raise BitstreamError(f"P frame's skipped-block map: {exc}") from None

    def decode(self, data: bytes) -> Iterator[np.ndarray]:
        return self.decode_container(Container.from_bytes(data))
