"""The latent-conditional P-frame codec: the keyframe codec's latent coded given the
reference's (tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulbcodec.losses.rate_distortion import bits_per_pixel
from ulbcodec.models.anchor_codec import AnchorCodec
from ulbcodec.models.latent_conditional_codec import LatentConditionalCodec
from ulbcodec.packages import ModelPackage
from ulbcodec.video import VideoCodec

from conftest import TINY_CONFIG, make_tiny_video_package
from test_pframe import encode, force_residual, frames_tensor
from test_video_codec import clip


@pytest.fixture(scope="module")
def anchor():
    torch.manual_seed(11)
    return AnchorCodec(**TINY_CONFIG).eval()


@pytest.fixture(scope="module")
def model(anchor):
    torch.manual_seed(12)
    model = LatentConditionalCodec.from_anchor_codec(anchor, hyper_channels=8)
    for net in (model.params_anchor, model.params_nonanchor):  # a trained-like, not an initial, entropy model
        torch.nn.init.normal_(net[-1].weight, std=0.02)
    model.update(force=True)
    return model.eval()


def test_compress_decompress_round_trip(model):
    x, ref = frames_tensor(0), frames_tensor(1)
    coded = model.compress(x, ref, 1)
    out = model.decompress(coded["strings"], coded["shape"], ref, 1)
    assert out["symbols_crc32"] == coded["symbols_crc32"]
    assert torch.equal(out["x_hat"], coded["x_hat"])


def test_a_p_frame_decodes_as_the_keyframe_codecs_synthesis_of_its_latent(model, anchor):
    """The transforms and gains are the keyframe codec's: forward's ŷ through the keyframe
    codec's own synthesis gives the coded reconstruction."""
    x, ref = frames_tensor(2), frames_tensor(3)
    assert torch.equal(model.g_a(x), anchor.g_a(x)) and torch.equal(model.gain, anchor.gain)
    with torch.no_grad():
        y_hat = model(x, ref, 2)["y_hat"]
        via_anchor = anchor.synthesize(y_hat, 2, with_bypass=False)[0]
    assert torch.allclose(via_anchor, model.compress(x, ref, 2)["x_hat"], atol=1e-4)


def test_the_reference_lowers_the_rate(model):
    """The untrained entropy model predicts y from the reference's latent (μ = p): a frame
    coded given itself costs fewer bytes than given an unrelated frame."""
    fresh = LatentConditionalCodec.from_anchor_codec(AnchorCodec(**TINY_CONFIG), hyper_channels=8)
    with torch.no_grad():  # a random g_a's y is far below the quantisation step: scale it up
        fresh.gain.mul_(50)
    fresh.update(force=True)
    x = frames_tensor(4)
    same = fresh.eval().compress(x, x, 2)
    other = fresh.compress(x, frames_tensor(5), 2)
    assert len(same["strings"][0]) < len(other["strings"][0])


def test_entropy_path_is_thread_count_invariant(model):
    x, ref = frames_tensor(6), frames_tensor(7)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model.compress(x, ref, 0)
        torch.set_num_threads(2)
        two = model.compress(x, ref, 0)
    finally:
        torch.set_num_threads(previous)
    assert one["strings"] == two["strings"] and one["symbols_crc32"] == two["symbols_crc32"]


def test_training_moves_only_the_entropy_model(anchor):
    model = LatentConditionalCodec.from_anchor_codec(anchor, hyper_channels=8).train()
    trainable = dict(model.trainable_parameters())
    assert trainable and not any(n.startswith(("g_a.", "g_s.")) or n in ("gain", "inverse_gain") for n in trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.Adam([p for n, p in trainable.items() if not n.endswith(".quantiles")], lr=1e-2)
    x, ref = frames_tensor(8, (2, 3, 64, 64)), frames_tensor(9, (2, 3, 64, 64))
    out = model(x, ref, 1.5)
    bits_per_pixel(out["likelihoods"], 2 * 64 * 64).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items() if not n.endswith(".quantiles"))


def test_bad_inputs_are_refused(model):
    with pytest.raises(ValueError, match="multiples of 64"):
        model.compress(torch.zeros(1, 3, 60, 64), torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match="rate_level"):
        model.compress(frames_tensor(0), frames_tensor(1), 5)
    coded = model.compress(frames_tensor(0), frames_tensor(1), 0)
    with pytest.raises(ValueError, match="does not match"):
        model.decompress(coded["strings"], (2, 2), frames_tensor(1), 0)
    with pytest.raises(ValueError, match="no VAE latent"):
        LatentConditionalCodec.from_anchor_codec(AnchorCodec(**{**TINY_CONFIG, "vae_channels": 4}))


def test_a_video_package_with_it_decodes_exactly(tmp_path_factory, monkeypatch):
    """P frames by the latent-conditional codec in a file: the decoder rebuilds exactly the
    encoder's reconstruction, on any thread count, and the package round-trips its config."""
    root = make_tiny_video_package(tmp_path_factory.mktemp("lvideo"), pframe="latent")
    assert ModelPackage.load_manifest(root).components["pframe"]["class"] == "LatentConditionalCodec"
    codec = VideoCodec.from_pretrained(str(root))
    force_residual(monkeypatch)
    data, gops, seen, log = encode(codec, clip(5), threshold=0.0)
    assert gops.frame_types() == "KPPPP" and all(r.parts == "residual" for r in log[1:])
    decoded = list(codec.decode(data))
    assert all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = list(VideoCodec.from_pretrained(str(root)).decode(data))
    finally:
        torch.set_num_threads(previous)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, again))
