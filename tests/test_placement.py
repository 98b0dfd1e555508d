"""Device placement (``--device``, ``--offload``, bfloat16 weights on accelerators) and
the device-memory estimate, tested on the CPU: the accelerator-only parts through their
pure logic, the bfloat16-weights path end to end with tiny models."""

from __future__ import annotations

import types
from fractions import Fraction

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ulbcodec.cli import cli
from ulbcodec.image import ImageCodec
from ulbcodec.packages import ModelPackage
from ulbcodec.placement import (DeviceError, DeviceMemoryError, Placement, device_estimate, device_report,
                                parameter_count, resolve_device)
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import make_tiny_generative_package, make_tiny_video_package

CUDA = torch.device("cuda")  # a device object needs no CUDA; nothing here runs on it


@pytest.fixture(scope="module")
def generative(tmp_path_factory):
    return ModelPackage.load_manifest(make_tiny_generative_package(tmp_path_factory.mktemp("placement")))


def test_device_names_are_checked_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="not a torch device"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cannot use cuda devices"):
            resolve_device("cuda:0")
        r = CliRunner().invoke(cli, ["decode", "x.ulb", "-o", "x.png", "--device", "cuda"])
        assert r.exit_code == 2 and "cannot use cuda devices" in r.stderr


def test_precision_policy():
    cpu, gpu = Placement(torch.device("cpu")), Placement(CUDA, "model")
    assert cpu.diffusers_dtype == torch.float32 and gpu.diffusers_dtype == torch.bfloat16
    assert gpu.offloading and gpu.home == torch.device("cpu")
    assert not Placement(torch.device("cpu"), "model").offloading  # nothing to offload to on the CPU
    assert Placement(CUDA).home == CUDA
    assert Placement(torch.device("cpu"), weights_dtype=torch.bfloat16).diffusers_dtype == torch.bfloat16


def test_cpu_compute_dtype_is_decided_in_one_place(monkeypatch, generative):
    """bfloat16 autocast only where the CPU computes it natively (AMX, or AVX512_BF16 while
    torch runs its AVX-512 kernels); float32 on AVX2 / AVX-512 without bf16 and wherever
    torch runs AVX2 or plain kernels; $ULBC_CPU_DTYPE overrides; accelerators: bf16 weights."""
    from ulbcodec import placement

    monkeypatch.delenv(placement.CPU_DTYPE_ENV, raising=False)
    dtype = placement.cpu_compute_dtype
    assert dtype(frozenset({"avx2", "fma"}), "AVX2") == torch.float32
    assert dtype(frozenset({"avx2", "avx512f"}), "AVX512") == torch.float32
    assert dtype(frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX512") == torch.bfloat16
    assert dtype(frozenset({"avx2", "avx512f", "avx512_bf16"}), "AVX2") == torch.float32  # ATEN_CPU_CAPABILITY=avx2
    assert dtype(frozenset({"avx512f", "amx_tile", "amx_bf16"}), "AVX512") == torch.bfloat16
    assert dtype(frozenset({"avx512f", "amx_tile", "amx_bf16"}), "DEFAULT") == torch.float32
    monkeypatch.setenv(placement.CPU_DTYPE_ENV, "bfloat16")
    assert placement.cpu_compute_dtype(frozenset()) == torch.bfloat16
    assert Placement(torch.device("cpu")).compute_dtype == torch.bfloat16
    assert ImageCodec(generative).next_frame.dtype == torch.bfloat16  # what the pipeline runs in
    monkeypatch.setenv(placement.CPU_DTYPE_ENV, "float32")
    assert Placement(torch.device("cpu")).compute_dtype == torch.float32
    assert ImageCodec(generative).next_frame.dtype == torch.float32
    assert Placement(CUDA).compute_dtype == torch.bfloat16
    assert Placement(torch.device("cpu"), weights_dtype=torch.bfloat16).compute_dtype == torch.bfloat16
    monkeypatch.setenv(placement.CPU_DTYPE_ENV, "half")
    with pytest.raises(ValueError, match="ULBC_CPU_DTYPE"):
        placement.cpu_compute_dtype()


class _Module:
    """Records where .to() sends it (a real move needs an accelerator)."""

    def __init__(self):
        self.where, self.moves = torch.device("cpu"), []

    def parameters(self):
        yield types.SimpleNamespace(device=self.where)

    def to(self, device):
        self.where = torch.device(device)
        self.moves.append(self.where.type)
        return self


def test_offload_moves_a_module_for_the_outermost_use_only():
    placement, module = Placement(torch.device("meta"), "model"), _Module()
    with placement.use(module):
        assert module.where.type == "meta"
        with placement.use(module):  # a tile inside a stage: no extra round trip
            pass
        assert module.where.type == "meta"
    assert module.moves == ["meta", "cpu"]
    with Placement(torch.device("meta"), "none").use(module):
        pass
    assert module.moves == ["meta", "cpu"]


def test_parameter_counts_come_from_the_headers(generative):
    for name in ("anchor_codec", "vae", "transformer"):
        module = generative.build(name)
        assert parameter_count(generative, name) == sum(p.numel() for p in module.state_dict().values())


def test_device_estimate_terms(generative):
    full = device_estimate(generative, 1024, 768, True, Placement(CUDA, "none"))
    offloaded = device_estimate(generative, 1024, 768, True, Placement(CUDA, "model"))
    anchor = 4 * parameter_count(generative, "anchor_codec")
    vae, transformer = (2 * parameter_count(generative, n) for n in ("vae", "transformer"))
    assert full.weights == anchor + vae + transformer  # anchor codec fp32, diffusers models bf16
    assert offloaded.weights == anchor + max(vae, transformer) < full.weights
    assert device_estimate(generative, 2048, 1536, True, Placement(CUDA)).working > full.working
    anchor_only = device_estimate(generative, 1024, 768, False, Placement(CUDA))
    assert anchor_only.weights == anchor and anchor_only.peak < full.peak
    line = full.describe(CUDA, "decoding 1024x768", free=8 << 30)
    assert line.startswith("decoding 1024x768 on cuda: estimated peak device memory ")
    assert "bfloat16" in line and "model offload off" in line and "8.00 GiB free" in line


def test_device_report_prints_once_per_size_and_refuses_what_cannot_fit(generative):
    placement = Placement(torch.device("cuda", 7), "none")
    free = 64 << 30
    first = device_report(generative, placement, 640, 480, True, "decoding 640x480", free=free)
    assert first and "estimated peak device memory" in first
    assert device_report(generative, placement, 640, 480, True, "decoding 640x480", free=free) is None
    assert device_report(generative, placement, 2560, 1920, True, "decoding 2560x1920", free=free)
    with pytest.raises(DeviceMemoryError, match="free; --offload model keeps one large component"):
        device_report(generative, placement, 640, 480, True, "decoding 640x480", free=1 << 20)
    assert device_report(generative, Placement(torch.device("cpu")), 640, 480, True, "x", free=1) is None


def test_auto_offload_is_settled_per_package(generative):
    auto = Placement(CUDA, "auto")
    assert auto.for_package(generative, free=64 << 30).offload == "none"
    assert auto.for_package(generative, free=1 << 20).offload == "model"
    assert Placement(torch.device("cpu"), "auto").for_package(generative).offload == "none"


def test_bfloat16_weights_decode_like_float32(generative, photo):
    """The accelerator path's dtypes (bf16 diffusers weights, fp32 anchor codec), on the CPU."""
    fp32 = ImageCodec(generative)
    bf16 = ImageCodec(generative, Placement(torch.device("cpu"), weights_dtype=torch.bfloat16))
    assert bf16.next_frame.transformer.dtype == torch.bfloat16 and bf16.next_frame.vae.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.float32  # entropy parameters stay float32
    rgb = photo[:64, :96]
    data = fp32.encode(rgb, 1).data
    assert bf16.encode(rgb, 1).data == data  # the anchor (the bitstream) does not depend on the placement
    a, b = fp32.decode(data), bf16.decode(data)
    assert np.array_equal(b, bf16.decode(data))  # deterministic
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 30  # the same image up to bf16 rounding


def test_bfloat16_video_predictor_round_trips(tmp_path):
    codec = VideoCodec(ModelPackage.load_manifest(make_tiny_video_package(tmp_path)),
                       Placement(torch.device("cpu"), weights_dtype=torch.bfloat16))
    assert codec.predictor.unet.dtype == torch.bfloat16
    y, x = np.mgrid[0:48, 0:72]
    frames = np.clip([np.stack([128 + 90 * np.sin((x + 2 * t) / 7), 128 + 90 * np.cos((y + t) / 5),
                                np.full_like(x, 100.0)], -1) for t in range(7)], 0, 255).astype(np.uint8)
    seen = []
    data, gops = codec.encode(iter(frames), Fraction(25), VideoSettings(threshold=10.0, max_gop=4, seed=3),
                              reconstruction=seen.append)
    assert gops.frame_types().count("K") < 7  # frames were predicted, by the bf16 UNet
    assert all(np.array_equal(a, b) for a, b in zip(seen, codec.decode(data)))
