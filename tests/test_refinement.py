"""Encoder-side latent refinement (ulbcodec.refinement, ulbc encode --refine-steps)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ulbcodec import image as image_module
from ulbcodec.cli import cli
from ulbcodec.image import ImageCodec, to_tensor
from ulbcodec.refinement import RefineSettings, refine_latent, refinement_loss

from conftest import make_tiny_package


@pytest.fixture(scope="module")
def tiny_with_lambdas(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine_models")
    make_tiny_package(root, "tinylambda", lambdas=(1e-4, 3e-4, 1e-3))
    return root


@pytest.fixture(scope="module")
def default_codec():
    return ImageCodec.from_pretrained("default")


def _coded_objective(codec: ImageCodec, rgb: np.ndarray, y: torch.Tensor, level: int) -> tuple[float, dict]:
    """The refinement objective of ``y`` with the rate of its rounded values (what the coder spends)."""
    with torch.no_grad():
        out = codec.model.forward_latent(y, level, with_bypass=False, noisy_likelihoods=False)
        loss, terms = refinement_loss(out, to_tensor(rgb), codec.package.rate_levels[level].lmbda)
    return loss.item(), terms


def test_refinement_lowers_the_coded_objective_and_restores_detail(default_codec, photo):
    """On the shipped model and a real photograph: a lower objective at the rate the coder
    really spends (the optimiser only sees noise proxies of it), and more of the original's
    wavelet detail restored by the anchor frame."""
    rgb, level = np.ascontiguousarray(photo[:192, :256]), 1
    y0 = default_codec.analyze(rgb, level)
    y = refine_latent(default_codec.model, to_tensor(rgb), y0, level,
                      default_codec.package.rate_levels[level].lmbda, RefineSettings(steps=20))
    (before, terms0), (after, terms) = (_coded_objective(default_codec, rgb, y0, level),
                                        _coded_objective(default_codec, rgb, y, level))
    assert after < before
    assert terms["detail"] < terms0["detail"]


def test_a_refined_file_is_an_ordinary_file(default_codec, photo):
    """Same decoder: the file decodes to what the refined latent synthesises (written
    without the colour statistics, whose fix would change the pixels), and a refined
    encode is reproducible byte for byte."""
    rgb = np.ascontiguousarray(photo[:128, :192])
    plain = default_codec.encode(rgb, 2, color_stats=False)
    refined = default_codec.encode(rgb, 2, refine=RefineSettings(steps=4), color_stats=False)
    assert refined.data != plain.data and "refine_s" in refined.timings
    again = default_codec.encode(rgb, 2, refine=RefineSettings(steps=4), color_stats=False)
    assert again.data == refined.data
    decoded = default_codec.decode(refined.data)
    assert decoded.shape == rgb.shape
    y = refine_latent(default_codec.model, to_tensor(rgb), default_codec.analyze(rgb, 2), 2,
                      default_codec.package.rate_levels[2].lmbda, RefineSettings(steps=4))
    with torch.no_grad():
        frame = default_codec.model.decompress(**{k: v for k, v in default_codec.model.encode_latent(y).items()
                                                   if k in ("strings", "shape")}, rate_level=2)["anchor_frame"]
    expected = (frame[0, :, :128, :192].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1


def test_refinement_leaves_the_model_as_it_was(tiny_with_lambdas, photo):
    codec = ImageCodec.from_pretrained(str(tiny_with_lambdas / "tinylambda"))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in codec.model.parameters())).hexdigest()
    flags = [p.requires_grad for p in codec.model.parameters()]
    training = codec.model.training
    codec.encode(np.ascontiguousarray(photo[:64, :64]), 1, refine=RefineSettings(steps=3))
    assert hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in codec.model.parameters())).hexdigest() \
        == digest
    assert [p.requires_grad for p in codec.model.parameters()] == flags and codec.model.training == training


def test_refinement_needs_the_levels_lambda_and_a_bounded_size(tiny_model, tiny_with_lambdas, photo, monkeypatch):
    rgb = np.ascontiguousarray(photo[:64, :64])
    with pytest.raises(ValueError, match="records no λ"):
        ImageCodec.from_pretrained("tiny").encode(rgb, 1, refine=RefineSettings(steps=2))
    monkeypatch.setattr(image_module, "REFINE_MAX_PIXELS", 64 * 63)
    with pytest.raises(ValueError, match="latent refinement handles images up to"):
        ImageCodec.from_pretrained(str(tiny_with_lambdas / "tinylambda")).encode(rgb, 1, refine=RefineSettings(steps=2))


def test_cli_refine_steps(tiny_with_lambdas, tiny_model, photo, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(photo[:64, :96]).save(src)
    model = str(tiny_with_lambdas / "tinylambda")
    r = CliRunner().invoke(cli, ["encode", str(src), "-o", str(tmp_path / "a.ulb"), "--model", model,
                                 "--refine-steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert "refine_s" in r.stdout and (tmp_path / "a.ulb").stat().st_size > 0
    assert CliRunner().invoke(cli, ["decode", str(tmp_path / "a.ulb"), "-o", str(tmp_path / "a.out.png"),
                                    "--model", model]).exit_code == 0
    # a model without λ: one error line, non-zero exit, no file
    r = CliRunner().invoke(cli, ["encode", str(src), "-o", str(tmp_path / "b.ulb"), "--model", "tiny",
                                 "--refine-steps", "2"])
    assert r.exit_code != 0 and "records no λ" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b.ulb").exists()
