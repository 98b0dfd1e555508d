"""Model packages: save/load round trip, digest verification, safe loading only."""

from __future__ import annotations

import json

import pytest
import torch

from ulbcodec import packages
from ulbcodec.models.anchor_codec import AnchorCodec
from ulbcodec.packages import ModelError, ModelPackage, RateLevel, save_package

from conftest import TINY_CONFIG


def _model():
    torch.manual_seed(0)
    model = AnchorCodec(**TINY_CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.update(force=True)
    return model


def test_round_trip_half_parameters_is_exact(tmp_path):
    model = _model()
    pkg = save_package(tmp_path / "m", "m", {"anchor_codec": model}, [RateLevel(0), RateLevel(1)],
                       half_parameters=True)
    loaded = ModelPackage.load_manifest(pkg.root).build("anchor_codec")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model.compress(x, rate_level=1), loaded.compress(x, rate_level=1)
    assert a["strings"] == b["strings"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_half_parameters_refuses_unrepresentable_values(tmp_path):
    model = AnchorCodec(**TINY_CONFIG)
    with pytest.raises(ValueError, match="float16"):
        save_package(tmp_path / "m", "m", {"anchor_codec": model}, [], half_parameters=True)


def test_modified_weights_refused(tmp_path):
    pkg = save_package(tmp_path / "m", "m", {"anchor_codec": _model()}, [RateLevel(0)])
    weights = pkg.root / "anchor_codec.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match the recorded digest"):
        ModelPackage.load_manifest(pkg.root)


def test_manifest_cannot_name_arbitrary_classes_or_files(tmp_path):
    pkg = save_package(tmp_path / "m", "m", {"anchor_codec": _model()}, [RateLevel(0)])
    manifest_path = pkg.root / packages.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for field, value, message in (("class", "os.system", "unknown class"),
                                  ("weights", "anchor_codec.pt", "must be a .safetensors file"),
                                  ("weights", "../x.safetensors", "must be a .safetensors file")):
        bad = json.loads(json.dumps(manifest))
        bad["components"]["anchor_codec"][field] = value
        manifest_path.write_text(json.dumps(bad))
        with pytest.raises(ModelError, match=message):
            ModelPackage.load_manifest(pkg.root)


def test_registry_resolves_names_and_digests(tiny_model):
    assert packages.resolve("tiny") == tiny_model
    pkg = ModelPackage.load_manifest(tiny_model)
    assert packages.find_by_digest(pkg.short_digest) == tiny_model
    with pytest.raises(ModelError, match="unknown model"):
        packages.resolve("no-such-model")


def test_manifest_records_the_given_name(tmp_path):
    pkg = save_package(tmp_path / "m", "my-model", {"anchor_codec": _model()}, [RateLevel(0)], half_parameters=True)
    assert pkg.name == "my-model"


def test_build_skips_random_init_and_restores_it(tmp_path):
    """A built component is exactly its weights although torch.nn.init drew nothing for it;
    the initialisers are torch's own again afterwards (also after a failed build)."""
    originals = {name: getattr(torch.nn.init, name) for name in packages._INITIALISERS}
    pkg = save_package(tmp_path / "m", "m", {"anchor_codec": _model()}, [RateLevel(0), RateLevel(1)])
    torch.manual_seed(1)
    before = torch.rand(4)
    torch.manual_seed(1)
    loaded = ModelPackage.load_manifest(pkg.root).build("anchor_codec")
    assert torch.equal(torch.rand(4), before)  # no random draw while building
    assert all(getattr(torch.nn.init, name) is f for name, f in originals.items())
    for name, tensor in _model().state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with pytest.raises(RuntimeError), packages.skipped_weight_init():
        assert torch.equal(torch.nn.init.ones_(torch.zeros(2)), torch.zeros(2))
        raise RuntimeError("build failed")
    assert all(getattr(torch.nn.init, name) is f for name, f in originals.items())
