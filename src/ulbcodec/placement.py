"""Where the models run and in which precision: ``--device`` and ``--offload``.

The published NeFIC decoder and CogVideoX run their VAE and transformer in bfloat16; the
anchor codec computes the entropy model's parameters, which encoder and decoder must
reproduce exactly, so it stays in float32 everywhere::

    component                      cpu                              cuda (any accelerator)
    anchor codec (entropy params)  float32                          float32
    VAE, transformer               float32 weights; bf16 autocast   bfloat16 weights and compute
                                   where native (AMX,              (as published; half the memory)
                                   AVX512_BF16), else float32
                                   (cpu_compute_dtype)
    predictor                      float32                          bfloat16 weights and compute

Model CPU offload (``--offload model``) keeps the diffusers components in host memory
and moves each one to the device for its own step (VAE encode, transformer, VAE decode,
predictor) and back, so that the device holds the anchor codec, ONE large component and
the working set at a time: CogVideoX-5B's transformer is ~11 GB in bfloat16, its VAE
0.4 GB, so a 24 GB card runs NeFIC with room for 2K images. ``auto`` (the default)
offloads when a 1-megapixel job with every component on the device would not fit its
free memory; a job that does not fit even so is refused before it starts, in one line.
Large images are already bounded by the tiled VAE and transformer (models/next_frame.py:
VAE tiles of 512 or 1024 px by the VAE's width; transformer tiles of its training size,
32 to 64 latents, in batches), which is what diffusers' VAE tiling and slicing would give.

:func:`device_estimate` is printed before a job on an accelerator (one line, the first
file and any larger one): weights resident on the device in their run dtype (exact, from
the safetensors headers), the whole-image tensors, one tile's (one batch of transformer
tiles') working set and the CUDA context. The working-set figures are derived from the tensor shapes, not measured: no GPU
has been lent to this project yet (README, "GPU").
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import torch

# the packages' own file layout and checked safetensors header reader
from ulbcodec.tiling import tile_batch, transformer_tile, vae_tile
from ulbcodec.packages import component_folder, safetensors_header, weight_file_sets
from ulbcodec.resources import MiB, format_size, padded_pixels

OFFLOAD_MODES = ("auto", "none", "model")
# Device-side constants of the estimate (see the module docstring).
CUDA_CONTEXT_BYTES = 512 * MiB  # kernels and the allocator's own pages, outside torch's count
WHOLE_IMAGE_BYTES_PER_PIXEL = 64  # padded input/anchor/output frames in fp32 + latents at 1/8
LIVE_TILE_TENSORS = 8  # activations alive at once at the VAE's widest full-resolution layer


# The CPU flags under which bfloat16 matmuls and convolutions run natively in oneDNN, each
# with the torch kernel capability that must be active to use it: AMX tiles (Intel Sapphire
# Rapids and later) and AVX512_BF16's dot products (AMD Zen 4, Intel Cooper Lake), the
# latter only while torch runs its AVX-512 kernels. Elsewhere bfloat16 is emulated, slower
# than float32 and rounded on top (docs/measurements.md, "CPUs without AMX").
NATIVE_BF16 = (("amx_bf16", ("AVX512", "AVX2")), ("avx512_bf16", ("AVX512",)))
CPU_DTYPE_ENV = "ULBC_CPU_DTYPE"  # float32 | bfloat16: overrides cpu_compute_dtype()


def cpu_flags() -> frozenset:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_compute_dtype(flags: Optional[frozenset] = None, capability: Optional[str] = None) -> torch.dtype:
    """The precision of the diffusion stages (VAE, transformer) on this CPU, decided in
    this one place: bfloat16 autocast where the CPU computes bfloat16 natively (AMX, or
    AVX512_BF16 under torch's AVX-512 kernels), float32 elsewhere (faster there, and exact
    to the weights). ``$ULBC_CPU_DTYPE`` overrides. The anchor codec's entropy path is
    float32 whatever this says (entropy/coding.py)."""
    forced = os.environ.get(CPU_DTYPE_ENV, "").strip().lower()
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    if forced:
        raise ValueError(f"${CPU_DTYPE_ENV} must be float32 or bfloat16, got {forced!r}")
    flags = cpu_flags() if flags is None else flags
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    native = any(flag in flags and capability in kernels for flag, kernels in NATIVE_BF16)
    return torch.bfloat16 if native else torch.float32


class DeviceError(ValueError):
    """``--device`` names no device this torch build can use (one line)."""


def resolve_device(text: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:1``, ``mps``, ... → a usable torch.device, or DeviceError."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = bool(backend and getattr(backend, "is_available", lambda: False)())
    if not available:
        raise DeviceError(f"{text}: this torch build ({torch.__version__}) cannot use {device.type} devices "
                          f"(install a torch build with {device.type} support)")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{text}: there {'is' if count == 1 else 'are'} only {count} {device.type} device(s)")
    return device


@dataclass(frozen=True)
class Placement:
    """The device of a codec's models, the dtype of its diffusers weights, and whether
    those components are offloaded to host memory between uses (``offload``: one of
    OFFLOAD_MODES; "auto" is settled per package by :meth:`for_package`)."""

    device: torch.device = torch.device("cpu")
    offload: str = "none"
    weights_dtype: Optional[torch.dtype] = None  # None: the policy of the table above

    @classmethod
    def of(cls, device) -> "Placement":
        """A Placement as given, or the default one of a device name."""
        return device if isinstance(device, Placement) else cls(torch.device(device))

    @property
    def diffusers_dtype(self) -> torch.dtype:
        if self.weights_dtype is not None:
            return self.weights_dtype
        return torch.float32 if self.device.type == "cpu" else torch.bfloat16

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the diffusion stages compute in: their weights' dtype where that is not
        float32 (accelerators; ``weights_dtype``), else on the CPU :func:`cpu_compute_dtype`
        (bfloat16 autocast over float32 weights where native)."""
        if self.diffusers_dtype != torch.float32 or self.device.type != "cpu":
            return self.diffusers_dtype
        return cpu_compute_dtype()

    @property
    def offloading(self) -> bool:
        return self.offload == "model" and self.device.type != "cpu"

    @property
    def home(self) -> torch.device:
        """Where a diffusers component lives between uses."""
        return torch.device("cpu") if self.offloading else self.device

    def for_package(self, package, free: Optional[int] = None) -> "Placement":
        """Settle ``auto``: offload when a 1-megapixel job with every component on the
        device would not fit its free memory (``free``: given, or asked of the device)."""
        if self.offload != "auto":
            return self
        if self.device.type == "cpu":
            return replace(self, offload="none")
        whole = device_estimate(package, 1024, 1024, package.is_generative, replace(self, offload="none"),
                                video="predictor" in package.components)
        free = free_memory(self.device) if free is None else free
        return replace(self, offload="model" if free is not None and whole.peak > free else "none")

    @contextlib.contextmanager
    def use(self, module) -> Iterator[None]:
        """Run ``module`` on the device for the duration of the block (a no-op unless offloading)."""
        if not self.offloading or module is None or _on(module, self.device):
            yield  # also when nested inside a block that already brought it over
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to(self.home)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _on(module, device: torch.device) -> bool:
    param = next(module.parameters(), None)
    return param is not None and param.device.type == device.type and (
        device.index is None or param.device.index == device.index)


# ------------------------------------------------------------------ device memory estimate


def _tensor_elements(path: Path) -> int:
    header = json.loads(safetensors_header(path)[8:])
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            n = 1
            for dim in info["shape"]:
                n *= dim
            total += n
    return total


def parameter_count(package, component: str) -> int:
    """Elements of a component's weights, read from its safetensors headers (no load)."""
    sets = weight_file_sets(package.root, package.components[component])
    return max(sum(_tensor_elements(f) for f in files if f.is_file()) for files in sets)


@dataclass(frozen=True)
class DeviceEstimate:
    weights: int  # bytes resident on the device at the peak
    working: int  # whole-image tensors + one tile's activations
    context: int
    offload: bool
    dtype: torch.dtype

    @property
    def peak(self) -> int:
        return self.weights + self.working + self.context

    def describe(self, device: torch.device, what: str, free: Optional[int] = None) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        text = (f"{what} on {device}: estimated peak device memory {format_size(self.peak)} "
                f"(weights {format_size(self.weights)} {dtype}, working set {format_size(self.working)}, "
                f"context {format_size(self.context)}; model offload {'on' if self.offload else 'off'})")
        return text + (f", {format_size(free)} free" if free is not None else "")


def device_estimate(package, width: int, height: int, generative: bool, placement: Placement,
                    downscale: int = 1, video: bool = False) -> DeviceEstimate:
    """Peak device memory of coding one width x height image (or a video's frames) with
    ``package`` under ``placement``; see the module docstring for the terms."""
    run_bytes = torch.finfo(placement.diffusers_dtype).bits // 8
    anchor = 4 * parameter_count(package, "anchor_codec")  # float32 on every device
    # the diffusers components (VAE, transformer, predictor): in a sub-directory or referenced
    large = [n for n, c in package.components.items()
             if c.get("diffusers") or c.get("external")] if (generative or video) else []
    sizes = [run_bytes * parameter_count(package, n) for n in large]
    resident = anchor + (max(sizes, default=0) if placement.offloading else sum(sizes))
    coded = padded_pixels(width, height, downscale)
    working = WHOLE_IMAGE_BYTES_PER_PIXEL * coded
    if generative or video:
        vae = _diffusers_config(package, next((package.components[n] for n in large if "vae" in n), None))
        full_res_channels = vae.get("block_out_channels", [128])[0]  # its widest full-resolution layer
        # GroupNorm upcasts to float32 on diffusers' graph, hence at least 4 bytes per value
        tile_px = vae_tile(full_res_channels) ** 2
        working += LIVE_TILE_TENSORS * tile_px * full_res_channels * max(run_bytes, 4)
        tf = next((package.components[n] for n in large if n in ("transformer", "predictor")), None)
        tf_config = _diffusers_config(package, tf)
        width_model = tf_config.get("num_attention_heads", 0) * tf_config.get("attention_head_dim", 0)
        # one batch of tiles (models/next_frame.py): two temporal tokens per patch of 2x2 latents
        side, _ = transformer_tile(tf_config)
        tokens = 2 * (side // 2) ** 2 + tf_config.get("max_text_seq_length", 0)
        # attention scores when the kernel materialises them (heads x tokens^2), or the MLP
        working += run_bytes * tile_batch(side) * max(tf_config.get("num_attention_heads", 0) * tokens ** 2,
                                                12 * tokens * width_model)
    context = CUDA_CONTEXT_BYTES if placement.device.type == "cuda" else 0
    return DeviceEstimate(resident, working, context, placement.offloading, placement.diffusers_dtype)


def _diffusers_config(package, comp: Optional[dict]) -> dict:
    if comp is None:
        return {}
    folder = component_folder(package.root, comp)
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / "config.json").read_text())
    return {}


def free_memory(device: torch.device) -> Optional[int]:
    """Free bytes on an accelerator (None where torch cannot say, and on the CPU)."""
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):
            return torch.cuda.mem_get_info(device)[0]
    return None


class DeviceMemoryError(ValueError):
    """A job's estimate does not fit the device's free memory (one line)."""


_announced: dict = {}  # (device, package digest) -> the largest estimate printed so far


def device_report(package, placement: Placement, width: int, height: int, generative: bool, what: str,
                  downscale: int = 1, video: bool = False, free: Optional[int] = None) -> Optional[str]:
    """Before a job on an accelerator: the line to print (the first job of a batch and any
    that needs >10% more than the last one printed; None otherwise), or DeviceMemoryError
    when the estimate exceeds the free device memory (``free``: given, or asked)."""
    if placement.device.type == "cpu":
        return None
    estimate = device_estimate(package, width, height, generative, placement, downscale, video)
    free = free_memory(placement.device) if free is None else free
    if free is not None and estimate.peak > free:
        hint = "" if placement.offloading else "; --offload model keeps one large component on the device at a time"
        raise DeviceMemoryError(f"{what} needs an estimated {format_size(estimate.peak)} of {placement.device} "
                                f"memory, {format_size(free)} free{hint}")
    key = (str(placement.device), package.digest)
    if estimate.peak <= 1.1 * _announced.get(key, 0):
        return None
    _announced[key] = estimate.peak
    return estimate.describe(placement.device, what, free)
