"""CompressAI imports on CPU-only torch without torchvision (see README, Installation)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.mark.skipif(HAS_TORCHVISION, reason="a real torchvision is installed: no placeholder is used")
def test_compressai_imports_and_placeholder_is_inert():
    code = """
import sys
from ulbcodec._compressai import compressai, PLACEHOLDER_ATTR
from compressai.entropy_models import EntropyBottleneck
from compressai.registry import transforms as reg
assert compressai.__version__.startswith("1.2.8"), compressai.__version__
assert "torchvision" not in sys.modules, "placeholder must not stay registered"
assert getattr(reg.torchvision, PLACEHOLDER_ATTR)
try:
    reg.torchvision.transforms.ToTensor
except ImportError as exc:
    assert "torchvision is not installed" in str(exc)
else:
    raise AssertionError("placeholder attribute access must raise")
import diffusers.utils
assert not diffusers.utils.is_torchvision_available()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_entropy_coding_round_trips_exactly():
    import torch

    from ulbcodec._compressai import compressai  # noqa: F401
    from compressai.entropy_models import EntropyBottleneck

    torch.manual_seed(0)
    eb = EntropyBottleneck(8).eval()
    eb.update(force=True)
    x = torch.randn(1, 8, 6, 7) * 3
    strings = eb.compress(x)
    assert eb.compress(x) == strings  # same bytes on repeat
    assert torch.equal(eb.decompress(strings, x.shape[-2:]), eb.quantize(x, "dequantize", eb._get_medians()))


def test_codec_imports_only_the_compressai_core():
    """Start-up (issue 28): the codec loads the entropy models, rANS coder, layers and
    CompressionModel, not CompressAI's datasets/registry/zoo (torch_geometric, torch._dynamo)
    nor scipy.stats; the rest of CompressAI still loads on demand."""
    code = """
import sys
import ulbcodec.models.anchor_codec, ulbcodec.models.pframe_codec, ulbcodec.image
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch_geometric", "torchvision", "diffusers")
               or m.startswith(("compressai.datasets", "compressai.registry", "compressai.zoo",
                                "compressai.latent_codecs.", "torch._dynamo", "scipy.stats")))
assert not [m for m in heavy if m != "compressai.latent_codecs.base"], heavy
import compressai
assert compressai.get_entropy_coder() == "ans" and compressai.__version__.startswith("1.2.8")
from compressai.models import MeanScaleHyperprior  # the rest of CompressAI, on demand
from compressai.zoo import bmshj2018_factorized
assert "torchvision" not in sys.modules or not hasattr(sys.modules["torchvision"], "__ulbc_placeholder__")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
