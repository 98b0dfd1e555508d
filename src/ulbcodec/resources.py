"""Memory bounds: parse ``--max-memory`` / ``$ULBC_MAX_MEMORY`` and estimate, before any
pixel is decoded, the peak memory (RSS) one encode or decode will need.

The estimate is a linear model in the number of pixels, deliberately simple so that it
can be checked by hand::

    peak = base(verb) + weights + max(weights,                       # loading: file + module copy
                                      per_px(verb) * coded_px        # entropy path + tiled transforms
                                      + io_px(verb) * image_px       # input / output pixel buffers
                                      + generative tile working set) # next-frame decoder only

``coded_px`` is the size actually coded, width x height after ``--downscale``, each side
padded up to a multiple of 64 (what the transforms and the entropy coder see);
``image_px`` is the size of the image read or written. The transforms run in 512 px
tiles (image.py), so their working set is a constant inside ``base``; what grows with
the image is the whole-image tensors (padded float input/output, latents, the entropy
coder's symbols) and the 8-bit pixel buffers.

The constants are fitted on measured peaks (peak RSS of the whole ``ulbc`` command by
benchmarks/speed.py, under :func:`keep_freed_memory`'s allocator settings): two image
sizes per verb give each slope and intercept. The estimate is good to about +-15 %, so a
limit meant to avoid the out-of-memory killer should sit that much under the memory
really free. The calibration table, the fit and the checks off the calibration points
are in docs/measurements.md ("Memory estimate").

The estimate is for one process. With ``--jobs N`` the limit is shared: the main process
and each local worker keep a runtime base and the files running at once share the rest
(:class:`MemoryPool`: a file waits until its estimate fits, so large files run fewer at a
time); Ray actors each get an equal part (:class:`Budget`).

Without ``--max-memory`` (or ``$ULBC_MAX_MEMORY``) the limit is 3/4 of the machine's
physical memory (:func:`default_limit`): a file the machine cannot decode is refused with
one line naming its estimate, instead of the allocator failing in the middle of entropy
decoding (which reads like a corrupted file) or the out-of-memory killer ending the job.
``--max-memory none`` lifts it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ulbcodec.bitstream import MEDIA_VIDEO

MiB = 1 << 20
GiB = 1 << 30

PAD_MULTIPLE = 64  # image.PAD_MULTIPLE (kept here so that this module stays torch-free)

ENV_VAR = "ULBC_MAX_MEMORY"

# Anchor path, fitted on benchmarks/speed.py's peaks (docs/measurements.md).
ENCODE_BASE_BYTES = 585 * MiB  # torch + CompressAI + tile working sets, without weights
ENCODE_BYTES_PER_CODED_PIXEL = 77
ENCODE_BYTES_PER_IMAGE_PIXEL = 9
DECODE_BASE_BYTES = 613 * MiB
DECODE_BYTES_PER_CODED_PIXEL = 106
DECODE_BYTES_PER_IMAGE_PIXEL = 6
# Generative decoder: fitted the same way on models/generative (docs/measurements.md).
GENERATIVE_DECODE_BYTES_PER_CODED_PIXEL = 115
GENERATIVE_DECODE_TILE_BYTES = 89 * MiB
# A VAE-conditioned anchor encoder: derived terms (the VAE encoder's tiles).
GENERATIVE_ENCODE_BYTES_PER_CODED_PIXEL = 4
VAE_ENCODER_TILE_BYTES = 256 * MiB
# Latent refinement (--refine-steps): the backward pass over the whole image holds every
# activation; measured per coded pixel, rounded up (docs/measurements.md).
REFINE_BYTES_PER_CODED_PIXEL = 2600

_UNITS = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
UNLIMITED = ("none", "off", "unlimited")


# glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh
# mmap and unmaps it on free, so each tile's activations (a 1024 px tile of 32 bf16
# channels: 64 MiB) arrive as new pages the kernel must fault in and zero, tile after
# tile. Served from the heap and kept there once freed, the same memory is reused. One
# arena for all threads, or else the tile pool's threads would each keep their own heap
# of freed tiles: faster (no page faults) and a lower peak (docs/measurements.md,
# "Allocator settings"). mallopt's parameters:
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the
    kernel: large blocks from the heap (no mmap), no trimming, one arena shared by all
    threads. The process's RSS then stays at its peak until it exits: meant for commands
    and worker processes, which run one job at a time to the end, not for a library to
    call behind its host's back. A no-op returning False on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _INT_MAX))
    return all(libc.mallopt(param, value) for param, value in settings)


OPENMP_WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def passive_openmp_waits() -> bool:
    """Have torch's OpenMP threads sleep while they wait for each other
    (``OMP_WAIT_POLICY=PASSIVE``) instead of spinning, unless the environment already
    sets a wait policy. Spinning pays where every thread has a core of its own; where
    another process holds one (a laptop, a shared machine: 2 cores, one busy), each
    parallel region waits for a thread that is not running while its partner spins, and
    a VAE encode took 0.8-1.0 s instead of 0.09-0.13 s, a frame-predictor step 1.5 s
    instead of 0.03 s (issue 28, docs/measurements.md). For commands only: it must run
    before torch is imported (libgomp reads it once); returns whether it took effect."""
    if "torch" in sys.modules or any(name in os.environ for name in OPENMP_WAIT_ENV):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


class MemoryLimitError(ValueError):
    """The estimated peak memory of a job exceeds the limit (a per-file failure)."""


def parse_size(text: str) -> Optional[int]:
    """``"2G"``, ``"500M"``, ``"1.5GiB"``, ``"800000000"`` -> bytes; ``"none"`` -> None.

    K, M, G and T are powers of 1024 (as for ``ulimit``, docker and the RSS figures this
    module is calibrated on); a trailing ``B``/``iB`` is accepted. Raises ValueError.
    """
    if text is None or text.strip().lower() in UNLIMITED:
        return None
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 2G, 500M, 1.5GiB, none)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: the limit must be positive (or 'none')")
    return value


def format_size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def padded_pixels(width: int, height: int, downscale: int = 1) -> int:
    """Pixels the transforms see: the coded size (rounded up), padded to multiples of 64."""
    w, h = -(-width // downscale), -(-height // downscale)
    return (-(-w // PAD_MULTIPLE) * PAD_MULTIPLE) * (-(-h // PAD_MULTIPLE) * PAD_MULTIPLE)


def _component_bytes(root: Path, comp: dict) -> int:
    from ulbcodec.packages import weight_file_sets

    return max(sum(f.stat().st_size for f in files if f.is_file()) for files in weight_file_sets(root, comp))


DEFAULT_LIMIT_FRACTION = 0.75
DEFAULT_SOURCE = "default"


def default_limit() -> Optional[int]:
    """3/4 of the physical memory, or None where the platform does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_LIMIT_FRACTION)
    except (AttributeError, ValueError, OSError):
        return None


def weights_bytes(package, components: Optional[Iterable[str]] = None) -> int:
    """Bytes of the weights files a job loads (all components, or those named)."""
    names = package.components if components is None else components
    return sum(_component_bytes(Path(package.root), package.components[n]) for n in names
               if n in package.components)


def estimate_decode(width: int, height: int, downscale: int = 1, generative: bool = False,
                    weights: int = 0) -> int:
    """Peak bytes of ``ulbc decode`` of one width x height image (header figures)."""
    coded = padded_pixels(width, height, downscale)
    output = DECODE_BYTES_PER_IMAGE_PIXEL * width * height
    per_pixel = DECODE_BYTES_PER_CODED_PIXEL * coded + output
    if generative:  # the next-frame stage follows the anchor path's: the larger peak counts
        per_pixel = max(per_pixel, GENERATIVE_DECODE_BYTES_PER_CODED_PIXEL * coded + output
                        + GENERATIVE_DECODE_TILE_BYTES)
    return DECODE_BASE_BYTES + weights + max(weights, per_pixel)


def estimate_encode(width: int, height: int, downscale: int = 1, uses_vae: bool = False,
                    weights: int = 0, refine: bool = False) -> int:
    """Peak bytes of ``ulbc encode`` of one width x height image (``--bpp``: downscale 1;
    ``refine``: with ``--refine-steps``)."""
    coded = padded_pixels(width, height, downscale)
    per_pixel = ENCODE_BYTES_PER_CODED_PIXEL * coded + ENCODE_BYTES_PER_IMAGE_PIXEL * width * height
    if uses_vae:
        per_pixel += GENERATIVE_ENCODE_BYTES_PER_CODED_PIXEL * coded + VAE_ENCODER_TILE_BYTES
    if refine:
        per_pixel += REFINE_BYTES_PER_CODED_PIXEL * coded
    return ENCODE_BASE_BYTES + weights + max(weights, per_pixel)


def estimate_decode_file(header, package, generative: bool) -> int:
    """Peak bytes of ``ulbc decode`` of the file with this header (``bitstream.Header``)
    with ``package``: an image at its coded size, or a video (one frame's window at a
    time, generative keyframe and predictor weights loaded)."""
    if header.media == MEDIA_VIDEO:
        return estimate_decode(header.width, header.height, 1, True, weights_bytes(package))
    weights = weights_bytes(package, None if generative else ["anchor_codec"])
    return estimate_decode(header.width, header.height, header.params.get("downscale", 1), generative, weights)


@dataclass(frozen=True)
class Budget:
    """The memory one process may use for one file (picklable: it travels to the workers).

    ``limit`` is the most one file may take; ``source`` says where the limit came from,
    for the error message. With ``workers > 1`` the whole limit ``total`` is shared:

    - ``pooled`` (local process pool, :func:`ulbcodec.batch.run`): the main process and
      each worker keep a runtime ``base``; what is left over is a pool that the files
      running at once share (:class:`MemoryPool`): a file starts only when its estimate
      above ``base`` fits what is left of it, so a large file makes the batch run fewer
      files at a time instead of failing. ``limit`` (``total - workers * base``) is the
      most one file can take while the other workers idle;
    - not pooled (Ray actors, possibly on other machines): each worker gets an equal
      part of ``total`` less the main process's base, for any file."""

    limit: int
    source: str = "--max-memory"
    workers: int = 1
    total: Optional[int] = None
    base: int = 0
    pooled: bool = False

    @classmethod
    def shared(cls, total: int, workers: int, verb: str, source: str = "--max-memory",
               pooled: bool = False) -> "Budget":
        """Split ``total`` over a pool of ``workers`` (see the class)."""
        if workers <= 1:
            return cls(total, source)
        base = ENCODE_BASE_BYTES if verb == "encode" else DECODE_BASE_BYTES
        if pooled:
            return cls(max(0, total - workers * base), source, workers, total, base, True)
        return cls(max(0, (total - base) // workers), source, workers, total, base)

    def check(self, estimate: int, what: str) -> None:
        """Raise MemoryLimitError (one line) when ``estimate`` exceeds the limit.
        ``what`` names the work, e.g. "decoding 4000x3000". In a worker of a pooled batch,
        then wait until the estimate fits what the running files leave of the pool and
        take it (given back by :func:`release_reservation` when the file is done)."""
        if estimate <= self.limit:
            if self.pooled and _POOL["pool"] is not None:
                release_reservation()
                need = max(0, estimate - self.base)
                _POOL["pool"].reserve(need)
                _POOL["held"] = need
            return
        source = "the default limit" if self.source == DEFAULT_SOURCE else self.source
        if self.workers > 1 and self.total is not None and self.pooled:
            bound = (f"the {format_size(self.limit)} one file can use under {source} {format_size(self.total)} "
                     f"with --jobs {self.workers} (the main process and each worker keep {format_size(self.base)}; "
                     f"fewer --jobs leave more)")
        elif self.workers > 1 and self.total is not None:
            bound = (f"the {format_size(self.limit)} per job left by {source} {format_size(self.total)} "
                     f"with --jobs {self.workers}")
        elif self.source == DEFAULT_SOURCE:
            bound = (f"the default limit of {format_size(self.limit)} ({DEFAULT_LIMIT_FRACTION:.0%} of this machine's "
                     f"memory; --max-memory SIZE or none changes it)")
        else:
            bound = f"the {self.source} limit of {format_size(self.limit)}"
        raise MemoryLimitError(f"{what} needs an estimated {format_size(estimate)} of memory, over {bound}")


class MemoryPool:
    """Bytes the files running at once in a local process pool may take above each
    worker's runtime base: a counter under a multiprocessing condition, created by the
    main process and handed to each worker when it starts (:func:`install_pool`). A worker
    holds nothing while it waits, so the batch cannot deadlock: any file whose share fits
    the pool's capacity runs once the files before it are done."""

    def __init__(self, capacity: int, ctx):
        self.capacity = capacity
        self._cond = ctx.Condition()
        self._free = ctx.Value("q", capacity, lock=False)

    def reserve(self, n: int) -> None:
        with self._cond:
            while self._free.value < min(n, self.capacity):
                self._cond.wait()
            self._free.value -= n

    def release(self, n: int) -> None:
        if n:
            with self._cond:
                self._free.value += n
                self._cond.notify_all()

    @property
    def free(self) -> int:
        with self._cond:
            return self._free.value


_POOL: dict = {"pool": None, "held": 0}


def install_pool(pool: Optional[MemoryPool]) -> None:
    """Make ``pool`` the memory pool of this (worker) process's budget checks."""
    _POOL["pool"], _POOL["held"] = pool, 0


def release_reservation() -> None:
    """Give back what this process's current file took of the pool, and the freed memory
    to the system (the workers run under :func:`keep_freed_memory`, which would otherwise
    keep a large file's peak for the next, smaller one)."""
    held, _POOL["held"] = _POOL["held"], 0
    if held and _POOL["pool"] is not None:
        _trim_heap()
        _POOL["pool"].release(held)


def _trim_heap() -> None:
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
