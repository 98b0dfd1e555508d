"""Tests for ulbcodec.models.anchor_codec (NeFIC anchor codec re-implementation).

The conformance data in tests/data come from the published NeFIC class:
- anchor_codec_tiny_weights.safetensors / anchor_codec_tiny_vectors.npz: a reduced config
  (N=32, M=64, 2 slices, window 5) with populated CDF tables, an input and every
  intermediate/output, including the exact rANS inputs and the bitstreams;
- anchor_codec_manifest.json: keys/shapes/dtypes of the released N=192, M=320 state_dict.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ulbcodec.models.anchor_codec import RELEASED_CONFIG, AnchorCodec, crop_to_size, pad_to_multiple

DATA = Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vectors():
    with np.load(DATA / "anchor_codec_tiny_vectors.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def tiny_state():
    return load_file(str(DATA / "anchor_codec_tiny_weights.safetensors"))


@pytest.fixture(scope="module")
def tiny(tiny_state):
    return AnchorCodec.load_pretrained_state_dict(tiny_state)


def _inputs(vectors):
    x = torch.from_numpy(vectors["x_u8"]).float() / 255.0
    return x, torch.from_numpy(vectors["vae_condition"])


def _crc(symbols) -> int:
    return zlib.crc32(np.asarray(symbols, dtype="<i4").tobytes())


# ------------------------------------------------------------------ conformance (tiny)


def test_config_inferred_from_file_matches_vector_config(tiny_state, vectors, tiny):
    n, m, slices, window = (int(v) for v in vectors["config"])
    config = AnchorCodec.infer_config(tiny_state)
    assert (config["N"], config["M"], config["num_slices"], config["context_window"]) == (n, m, slices, window)
    assert config["vae_channels"] == 16 and config["bypass_channels"] == 16 and config["num_rate_levels"] == 0
    assert tiny.config == config
    assert json.loads(json.dumps(tiny.config)) == config


def test_strict_load_keeps_file_values_and_cdf_tables(tiny_state, tiny):
    own = tiny.state_dict()
    assert set(own) == set(tiny_state)
    for key, ref in tiny_state.items():
        mine = own[key]
        assert mine.shape == ref.shape, key
        if ref.is_floating_point():
            assert mine.dtype == torch.float32, key  # fp16 file → fp32 model, exactly
            assert torch.equal(mine, ref.float()), key
        else:
            assert torch.equal(mine, ref), key
    # The CDF tables come from the file, not from update().
    assert tuple(tiny.entropy_bottleneck._quantized_cdf.shape) == (32, 24)
    assert tuple(tiny.gaussian_conditional._quantized_cdf.shape) == (64, 3133)
    # A wrong architecture cannot load silently.
    with pytest.raises(RuntimeError):
        AnchorCodec(N=32, M=64, num_slices=2, vae_channels=0).load_state_dict(tiny_state)


def test_encoder_reproduces_symbols_and_bitstreams(tiny, vectors):
    x, vae = _inputs(vectors)
    with torch.no_grad():
        y = tiny.analyze(x, vae)
        z = tiny.h_a(y)
    np.testing.assert_allclose(y.numpy(), vectors["y"], atol=1e-4)
    np.testing.assert_allclose(z.numpy(), vectors["z"], atol=1e-4)
    z_symbols = tiny.entropy_bottleneck.quantize(z, "symbols", tiny.entropy_bottleneck._get_medians())
    np.testing.assert_array_equal(z_symbols.numpy(), vectors["z_symbols"])

    out = tiny.encode_latent(y, return_symbols=True)
    np.testing.assert_array_equal(out["y_symbols"], vectors["y_symbols"])
    np.testing.assert_array_equal(out["y_indexes"], vectors["y_indexes"])
    assert out["strings"][0][0] == vectors["y_string"].tobytes()
    assert out["strings"][1][0] == vectors["z_string"].tobytes()
    assert out["shape"] == tuple(int(v) for v in vectors["z_shape"])
    assert out["symbols_crc32"] == _crc(vectors["y_symbols"])

    packed = tiny.compress(x, vae)  # the one-call API gives the same bytes
    assert packed["strings"] == out["strings"] and packed["symbols_crc32"] == out["symbols_crc32"]
    bits = 8 * (len(packed["strings"][0][0]) + len(packed["strings"][1][0]))
    assert bits / (x.shape[2] * x.shape[3]) == pytest.approx(float(vectors["bpp_real"]))


def test_decoder_reproduces_published_outputs(tiny, vectors):
    strings = [[vectors["y_string"].tobytes()], [vectors["z_string"].tobytes()]]
    shape = tuple(int(v) for v in vectors["z_shape"])
    out = tiny.decompress(strings, shape)
    assert out["symbols_crc32"] == _crc(vectors["y_symbols"])
    assert out["anchor_frame"].shape == (1, 3, 128, 192)
    assert out["bypass_latent"].shape == (1, 1, 16, 16, 24)
    np.testing.assert_allclose(out["anchor_frame"].numpy(), vectors["anchor_frame"], atol=1e-4)
    np.testing.assert_allclose(out["bypass_latent"].numpy(), vectors["bypass_latent"], atol=1e-4)


def test_forward_matches_published_ste_outputs_and_decompress(tiny, vectors):
    x, vae = _inputs(vectors)
    with torch.no_grad():
        out = tiny(x, vae)
    np.testing.assert_allclose(out["anchor_frame"].numpy(), vectors["anchor_frame_ste"], atol=1e-4)
    np.testing.assert_allclose(out["bypass_latent"].numpy(), vectors["bypass_latent_ste"], atol=1e-4)
    np.testing.assert_allclose(out["likelihoods"]["y"].numpy(), vectors["y_likelihoods"], atol=1e-5)
    np.testing.assert_allclose(out["likelihoods"]["z"].numpy(), vectors["z_likelihoods"], atol=1e-5)
    bits = sum(-torch.log2(p).sum() for p in out["likelihoods"].values())
    assert bits.item() / (128 * 192) == pytest.approx(float(vectors["bpp_est"]), rel=1e-5)

    packed = tiny.compress(x, vae)
    decoded = tiny.decompress(packed["strings"], packed["shape"])
    assert torch.equal(out["anchor_frame"], decoded["anchor_frame"])  # STE forward == decompress
    assert torch.equal(out["bypass_latent"], decoded["bypass_latent"])


# ------------------------------------------------------------------ released config


def test_released_config_state_dict_matches_manifest():
    manifest = json.loads((DATA / "anchor_codec_manifest.json").read_text())
    model = AnchorCodec()
    assert model.config == RELEASED_CONFIG
    model.update(force=True)
    state = model.state_dict()
    mine = [(k, list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()]
    ref = [tuple(e) for e in manifest["state_dict"]]
    assert len(mine) == manifest["num_state_dict_entries"] == len(ref)
    assert [k for k, _, _ in mine] == [k for k, _, _ in ref]  # same names, same order
    # Shapes depending on the data that update() saw: compare names (and row count) only.
    data_dependent = {"entropy_bottleneck._quantized_cdf"}
    for (key, shape, dtype), (_, ref_shape, ref_dtype) in zip(mine, ref):
        assert dtype == ref_dtype, key
        if key in data_dependent:
            assert shape[0] == ref_shape[0], key
        else:
            assert shape == ref_shape, key
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sorted(manifest["buffer_names"]) == sorted(k for k, _ in model.named_buffers())


# ------------------------------------------------------------------ our configurations


def _smooth_image(h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, yy * xx])[None]
    return (0.8 * base + 0.15 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def rated():
    torch.manual_seed(0)
    model = AnchorCodec(N=32, M=48, num_slices=2, num_rate_levels=3, vae_channels=0)
    with torch.no_grad():  # untrained g_a gives a near-zero y; make the coder do some work
        model.g_a.analysis_transform[6].weight.mul_(8.0)
    model.update(force=True)
    return model.eval()


def test_rate_level_parameters_exist_only_when_requested(rated, tiny):
    assert rated.gain.shape == (3, 48) and rated.inverse_gain.shape == (3, 48)
    assert "gain" not in tiny.state_dict() and "inverse_gain" not in tiny.state_dict()
    assert rated.g_a.project_in_en.in_features == 32  # vae_channels=0: no concatenation
    assert AnchorCodec.infer_config(rated.state_dict()) == rated.config


def test_rate_levels_round_trip_and_order(rated):
    x = _smooth_image(128, 192)
    sizes = []
    for level in range(3):
        packed = rated.compress(x, rate_level=level)
        decoded = rated.decompress(packed["strings"], packed["shape"], rate_level=level)
        with torch.no_grad():
            reference = rated(x, rate_level=level)
        assert decoded["symbols_crc32"] == packed["symbols_crc32"]
        assert torch.equal(decoded["anchor_frame"], reference["anchor_frame"])
        assert torch.equal(decoded["bypass_latent"], reference["bypass_latent"])
        sizes.append(len(packed["strings"][0][0]) + len(packed["strings"][1][0]))
    # Documented direction: a higher level index has a larger gain → more bytes.
    assert sizes[0] < sizes[1] < sizes[2], sizes

    # Integer-valued floats are the integer level; fractions interpolate in between.
    assert rated.compress(x, rate_level=1.0)["strings"] == rated.compress(x, rate_level=1)["strings"]
    half = rated.compress(x, rate_level=1.5)
    size_half = len(half["strings"][0][0]) + len(half["strings"][1][0])
    assert sizes[1] < size_half < sizes[2]
    gain, inverse = rated._gains(0.5)
    expected = torch.sqrt(rated.gain[0] * rated.gain[1])
    torch.testing.assert_close(gain.flatten(), expected)
    torch.testing.assert_close(inverse.flatten(), torch.sqrt(rated.inverse_gain[0] * rated.inverse_gain[1]))


def test_entropy_path_is_independent_of_thread_count(rated):
    x = _smooth_image(64, 128)
    y = rated.analyze(x, rate_level=2)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        packed = rated.encode_latent(y)
        decoded = rated.decode_latent(packed["strings"], packed["shape"])
        assert torch.get_num_threads() == threads  # restored after the single-threaded path
        anchor, _ = rated.synthesize(decoded["y_hat"], rate_level=2)
        results.append((packed["strings"], packed["symbols_crc32"], decoded["y_hat"], anchor))
    (s1, c1, y1, a1), (s2, c2, y2, a2) = results
    assert s1 == s2 and c1 == c2
    assert torch.equal(y1, y2)  # bit-identical latent whatever the thread count
    # g_s itself runs multi-threaded on purpose; its last bits may differ.
    torch.testing.assert_close(a1, a2, rtol=0, atol=1e-5)


@pytest.mark.parametrize("band_pixels", [1, 40, 10**9])
def test_local_context_bands_do_not_change_a_bit(tiny, monkeypatch, band_pixels):
    """The windowed local context attends band by band (for speed); every band size must
    give exactly the unbanded values, or files would decode differently by image size."""
    from ulbcodec.entropy import context as context_models
    from ulbcodec.entropy.checkerboard import keep_part
    from ulbcodec.entropy.context import local_attention_mask

    torch.manual_seed(1)
    context = tiny.local_context[1]
    anchors = keep_part(torch.randn(1, context.dim, 12, 20) * 3, anchor=True)
    mask = local_attention_mask(12, 20, context.window, anchors.device)
    with torch.no_grad():
        monkeypatch.setattr(context_models, "BAND_PIXELS", 10**9)
        whole = context(anchors, mask)
        monkeypatch.setattr(context_models, "BAND_PIXELS", band_pixels)
        banded = context(anchors, mask)
        threaded = context(anchors, mask, workers=2)  # bands shared by two threads
    assert torch.equal(whole, banded) and torch.equal(whole, threaded)


def test_scale_indexes_are_compressais_build_indexes(rated):
    """The scale → CDF table index of the entropy path is CompressAI's, bit for bit: at,
    just above and just below every table scale, below the lower bound and beyond the top."""
    from ulbcodec.entropy.coding import scale_indexes

    gc = rated.gaussian_conditional
    table = gc.scale_table
    scales = torch.cat([torch.rand(5000) * 2 * float(table[-1]), table, torch.nextafter(table, table + 1),
                        torch.nextafter(table, table - 1), torch.tensor([0.0, -1.0, 1e9, float("inf")])])
    assert torch.equal(scale_indexes(gc, scales), gc.build_indexes(scales))
    assert scale_indexes(gc, scales).dtype == torch.int32


def test_forward_training_mode_uses_noise_free_ste(rated):
    x = _smooth_image(64, 64)
    rated.train()
    try:
        out = rated(x, rate_level=1.25)
        loss = out["anchor_frame"].square().mean() + sum(p.log().sum() for p in out["likelihoods"].values())
        loss.backward()
        assert rated.g_a.analysis_transform[0].conv1.weight.grad is not None
        assert rated.gain.grad is not None and rated.inverse_gain.grad is not None
    finally:
        rated.zero_grad(set_to_none=True)
        rated.eval()
    # eval mode with autograd on, as above: the same activation layout (layers.conv_activations)
    reference = rated(x, rate_level=1.25)
    assert torch.equal(out["anchor_frame"].detach(), reference["anchor_frame"].detach())


def test_config_and_state_dict_round_trip(rated, tmp_path):
    x = _smooth_image(64, 64)
    packed = rated.compress(x, rate_level=2)
    path = tmp_path / "codec.safetensors"
    save_file({k: v.contiguous() for k, v in rated.state_dict().items()}, str(path))
    clone = AnchorCodec(**json.loads(json.dumps(rated.config)))
    clone.update(force=True)  # non-empty CDF buffers of other shapes: load must resize them
    clone.load_state_dict(load_file(str(path)))
    clone.eval()
    assert clone.compress(x, rate_level=2)["strings"] == packed["strings"]
    a = clone.decompress(packed["strings"], packed["shape"], rate_level=2)["anchor_frame"]
    b = rated.decompress(packed["strings"], packed["shape"], rate_level=2)["anchor_frame"]
    assert torch.equal(a, b)


def test_pad_and_crop():
    x = torch.rand(1, 3, 100, 130)
    padded, size = pad_to_multiple(x, AnchorCodec.required_multiple)
    assert padded.shape == (1, 3, 128, 192) and size == (100, 130)
    assert torch.equal(padded[..., :100, :130], x) and padded[..., 100:, :].abs().sum() == 0
    assert torch.equal(crop_to_size(padded, size), x)


def test_input_validation(rated, tiny):
    good = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="multiples of 64"):
        rated.compress(torch.rand(1, 3, 64, 80))
    with pytest.raises(ValueError, match="multiples of 64"):
        rated(torch.rand(1, 3, 48, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rated.compress(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        rated.compress(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="B=1"):
        rated.compress(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match="rate_level"):
        rated.compress(good, rate_level=3)
    with pytest.raises(ValueError, match="rate_level"):
        rated.compress(good, rate_level=-0.5)
    with pytest.raises(ValueError, match="no rate levels"):
        tiny.decompress([[b""], [b""]], (1, 1), rate_level=1)
    with pytest.raises(ValueError, match="takes no vae_latent"):
        rated.compress(good, torch.zeros(1, 16, 8, 8))
    with pytest.raises(ValueError, match="needs the encoder-side VAE latent"):
        tiny.compress(good)
    with pytest.raises(ValueError, match=r"vae_latent must have shape \[1, 16, 8, 8\]"):
        tiny.compress(good, torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"\[\[y_string\], \[z_string\]\]"):
        rated.decompress([b"", b""], (1, 1))
    with pytest.raises(ValueError, match="shape"):
        rated.decompress([[b""], [b""]], (0, 2))
    with pytest.raises(ValueError, match="multiples of 4"):
        rated.encode_latent(torch.zeros(1, 48, 6, 8))
    with pytest.raises(ValueError, match="divisible"):
        AnchorCodec(M=100, num_slices=3)


def test_training_backward_through_the_shipped_architecture():
    """Gradients flow through g_a and g_s of the shipped configuration at a training crop:
    the inference layout (channels-last) is left while autograd records, since torch's
    float32 backward in that layout crashed the process on AVX2-only CPUs."""
    torch.manual_seed(0)
    model = AnchorCodec(N=48, M=96, num_slices=4, context_window=5, vae_channels=0, bypass_channels=16,
                        num_rate_levels=2).train()
    x = torch.rand(1, 3, 256, 256)
    frame, _ = model.synthesize(model.analyze(x, rate_level=1), rate_level=1, with_bypass=False)
    frame.square().mean().backward()
    grads = [p.grad for p in model.g_a.parameters()] + [p.grad for p in model.g_s.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert model.analyze(x, rate_level=1).shape == (1, 96, 16, 16)
