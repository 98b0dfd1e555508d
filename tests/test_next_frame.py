"""The next-frame generative decoder (NeFIC) with tiny random models of the real classes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ulbcodec.image import DecodeError, ImageCodec
from ulbcodec import tiling
from ulbcodec.models import next_frame
from ulbcodec.packages import ModelError, ModelPackage

from conftest import make_tiny_generative_package


@pytest.fixture(scope="module")
def gen_codec(model_dir):
    return ImageCodec.from_pretrained(str(model_dir / "tinygen"))


@pytest.fixture(scope="module")
def small(photo):
    return np.ascontiguousarray(photo[:72, :100])


def test_package_layout_and_round_trip(model_dir, gen_codec):
    root = model_dir / "tinygen"
    manifest = json.loads((root / "ulbc_model.json").read_text())
    assert manifest["components"]["vae"] == {"class": "AutoencoderKLCogVideoX", "diffusers": "vae"}
    # diffusers' own layout, readable by from_pretrained without ulbc
    from diffusers import CogVideoXTransformer3DModel

    assert (root / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    direct = CogVideoXTransformer3DModel.from_pretrained(str(root / "transformer"), use_safetensors=True)
    pipe = gen_codec.next_frame
    for (k, a), (k2, b) in zip(direct.state_dict().items(), pipe.transformer.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert pipe.prompt_embeds.shape == (1, 3, 8)
    assert ModelPackage.load_manifest(root).is_generative
    assert not ModelPackage.load_manifest(model_dir / "tiny").is_generative


def test_modified_diffusers_component_is_refused(tmp_path):
    root = make_tiny_generative_package(tmp_path, "g")
    cfg = root / "transformer" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_layers": 1', '"num_layers": 2'))
    with pytest.raises(ModelError, match="digest"):
        ModelPackage.load_manifest(root)


def test_pickle_in_a_package_is_refused(tmp_path):
    root = make_tiny_generative_package(tmp_path, "g")
    (root / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(ModelError, match="only JSON and safetensors"):
        ModelPackage.load_manifest(root)


def test_one_step_decode_is_deterministic_and_differs_from_the_anchor(model_dir, gen_codec, small):
    data = gen_codec.encode(small, 1).data
    first = gen_codec.decode(data)
    assert first.shape == small.shape
    assert np.array_equal(first, gen_codec.decode(data))
    reloaded = ImageCodec.from_pretrained(str(model_dir / "tinygen"))
    assert np.array_equal(first, reloaded.decode(data))
    assert not np.array_equal(first, gen_codec.decode(data, anchor_only=True))


def test_anchor_only_never_loads_the_diffusion_model(model_dir, small, monkeypatch):
    codec = ImageCodec.from_pretrained(str(model_dir / "tinygen"))
    data = codec.encode(small, 0).data

    def refuse(name, device="cpu"):
        raise AssertionError(f"loaded {name}")

    monkeypatch.setattr(codec.package, "build", refuse)
    rgb = codec.decode(data, anchor_only=True)
    assert rgb.shape == small.shape and codec._next_frame is None


def test_anchor_only_equals_the_anchor_codec_alone(gen_codec, tiny_codec, small):
    # 'tinygen' holds the same anchor codec as 'tiny' (same config, same seed): the files
    # differ only in the model digest, and anchor-only decoding gives the same pixels.
    from ulbcodec.bitstream import Container

    gen_file, tiny_file = gen_codec.encode(small, 2).data, tiny_codec.encode(small, 2).data
    gen, tiny = Container.from_bytes(gen_file), Container.from_bytes(tiny_file)
    assert gen.header.model_digest != tiny.header.model_digest
    assert [c.payload for c in gen.chunks] == [c.payload for c in tiny.chunks]
    assert np.array_equal(gen_codec.decode(gen_file, anchor_only=True), tiny_codec.decode(tiny_file))


def test_multi_step_decoding_is_seeded(gen_codec, small):
    data = gen_codec.encode(small, 1).data
    a = gen_codec.decode(data, steps=3, seed=1)
    assert np.array_equal(a, gen_codec.decode(data, steps=3, seed=1))
    assert not np.array_equal(a, gen_codec.decode(data, steps=3, seed=2))


def test_image_only_model_refuses_generative_parts(tiny_codec):
    assert not tiny_codec.is_generative
    with pytest.raises(DecodeError, match="no generative decoder"):
        tiny_codec.next_frame


def test_vae_conditioned_encoder_round_trip(tmp_path, small):
    # NeFIC's encoder also sees the VAE latent of the original (encoder side only)
    codec = ImageCodec.from_pretrained(str(make_tiny_generative_package(tmp_path, "v", vae_channels=4)))
    result = codec.encode(small, 1)
    assert codec.decode(result.data).shape == small.shape
    assert codec.decode(result.data, anchor_only=True).shape == small.shape


def test_blended_tiles_reproduce_a_pointwise_function():
    x = torch.randn(1, 3, 40, 29)
    fn = lambda t: t * 2 + 1  # noqa: E731
    out = tiling.blended_tiles(fn, x, tile=16, overlap=6)
    assert torch.allclose(out, fn(x), atol=1e-6)
    up = lambda t: t.repeat_interleave(8, -1).repeat_interleave(8, -2)  # noqa: E731
    out = tiling.blended_tiles(up, x, tile=16, overlap=4, scale=8)
    assert torch.allclose(out, up(x), atol=1e-6)
    for even in (False, True):
        assert torch.allclose(tiling.blended_tiles(fn, x, tile=16, overlap=6, even=even), fn(x), atol=1e-6)


def test_blended_tiles_in_batches_match_one_at_a_time():
    x = torch.randn(2, 3, 40, 29)  # two images: each batch of tiles holds 2 samples per tile
    weights = torch.randn(3, 1, 1)
    fn = lambda t: (t * weights).cumsum(-1)  # noqa: E731  (not pointwise: tiles blend)
    one = tiling.blended_tiles(fn, x, tile=16, overlap=6)
    for batch in (2, 5, 100):
        assert torch.allclose(tiling.blended_tiles(fn, x, tile=16, overlap=6, batch=batch), one, atol=1e-6)


def test_blended_tiles_on_worker_threads_match_one_thread():
    """Calls on a pool of threads (one intra-op thread each) blend exactly as serial calls,
    under the caller's grad mode, and leave the caller's thread count alone."""
    x = torch.randn(2, 3, 40, 29)
    weights = torch.randn(3, 1, 1)
    seen = []

    def fn(t):
        seen.append((torch.get_num_threads(), torch.is_grad_enabled()))
        return (t * weights).cumsum(-1)

    previous = torch.get_num_threads()
    for batch in (1, 2, 5):
        one = tiling.blended_tiles(fn, x, tile=16, overlap=6, batch=batch)
        with torch.no_grad():
            seen.clear()
            pooled = tiling.blended_tiles(fn, x, tile=16, overlap=6, batch=batch, workers=2)
        assert torch.equal(pooled, one) and not pooled.requires_grad
        assert seen and all(s == (1, False) for s in seen)
    assert torch.get_num_threads() == previous


def test_transformer_tiles_are_the_training_size_within_bounds():
    assert tiling.transformer_tile({"sample_height": 32, "sample_width": 32}) == (32, 8)
    assert tiling.transformer_tile({"sample_height": 60, "sample_width": 90}) == (60, 15)
    assert tiling.transformer_tile({"sample_height": 300, "sample_width": 300}) == (64, 16)
    assert tiling.transformer_tile({"sample_height": 8, "sample_width": 8}) == (32, 8)


def test_batched_transformer_tiles_match_single_tiles(gen_codec, monkeypatch):
    pipe = gen_codec.next_frame
    torch.manual_seed(0)
    anchor = torch.rand(1, 3, 8 * 40, 8 * 72)
    bypass = torch.randn(1, 1, 4, 40, 72)
    with torch.no_grad():
        batched = pipe.decode_image(anchor, bypass)  # 2x3 tiles of 32 latents
        monkeypatch.setattr(tiling, "TILE_BATCH_LATENTS", 1)
        single = pipe.decode_image(anchor, bypass)
    assert (batched - single).abs().max() < 0.02  # bf16: batched GEMMs may round differently


def test_tiled_decode_agrees_with_whole_decode_away_from_seams(gen_codec, monkeypatch):
    pipe = gen_codec.next_frame
    torch.manual_seed(0)
    anchor = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 40), scale_factor=8, mode="bilinear")
    bypass = torch.randn(1, 1, 4, 24, 40)
    with torch.no_grad():
        whole = pipe.decode_image(anchor, bypass)
        monkeypatch.setattr(tiling, "VAE_TILE", 128)
        monkeypatch.setattr(tiling, "NARROW_VAE_CHANNELS", 0)  # 128 px whatever the width
        monkeypatch.setattr(tiling, "VAE_OVERLAP", 64)
        tiled = pipe.decode_image(anchor, bypass)
    # The VAE's convolutions are local and its GroupNorm statistics change little from
    # tile to tile, so blended VAE tiles match the whole image closely. (The transformer's
    # attention is global within a tile: with random weights its tiles cannot agree; the
    # seam check of the trained model is in benchmarks/generative.py.)
    assert (tiled - whole).abs().mean() < 0.01

    def column_steps(img):  # mean |difference| between neighbouring columns, per column
        return (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))

    # no seam: no column boundary of the tiled image is much sharper than in the whole one
    ratio = column_steps(tiled) / column_steps(whole)
    assert ratio.max() < 1.5


def test_tile_starts_cover_and_overlap():
    for length in (1, 16, 17, 64, 100, 129):
        starts = list(tiling.tile_starts(length, 16, 4))
        covered = set()
        for s in starts:
            covered.update(range(s, min(s + 16, length)))
        assert covered == set(range(length))
        assert all(b - a <= 12 for a, b in zip(starts, starts[1:]))


def test_even_tiles_are_as_few_and_as_small_as_the_overlap_allows():
    for length in (8, 64, 200, 512, 513, 768, 1000, 4000):
        side = tiling.even_tile(length, 512, 128)
        starts = list(tiling.tile_starts(length, side, 128))
        fixed = list(tiling.tile_starts(length, 512, 128))
        assert side <= min(512, length) and (side % 8 == 0 or side == length)
        assert len(starts) == len(fixed) and starts[-1] + side == length  # as many tiles, covering
        assert all(0 < b - a <= side - 128 for a, b in zip(starts, starts[1:]))  # each overlap >= 128
    assert tiling.even_tile(4000, 512, 128) == 480  # 11 tiles either way


def test_cli_generative_and_anchor_only_decode(tiny_model, small, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from ulbcodec.cli import cli

    Image.fromarray(small).save(tmp_path / "a.png")
    run = lambda *args: CliRunner().invoke(cli, [str(a) for a in args])  # noqa: E731
    assert run("encode", tmp_path / "a.png", "-o", tmp_path / "a.ulb", "--model", "tinygen").exit_code == 0
    # the file names its model by digest: decode finds the generative package by itself
    assert run("decode", tmp_path / "a.ulb", "-o", tmp_path / "gen.png").exit_code == 0
    assert run("decode", tmp_path / "a.ulb", "-o", tmp_path / "anchor.png", "--anchor-only").exit_code == 0
    gen, anchor = (np.asarray(Image.open(tmp_path / f)) for f in ("gen.png", "anchor.png"))
    assert gen.shape == anchor.shape == small.shape and not np.array_equal(gen, anchor)
    r = run("decode", tmp_path / "a.ulb", "-o", tmp_path / "x.png", "--anchor-only", "--steps", "4")
    assert r.exit_code == 2 and not (tmp_path / "x.png").exists()
    r = run("models", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    generative = {row["name"]: row["generative"] for row in rows}
    assert generative["tiny"] is False and generative["tinygen"] is True


def test_one_frame_convolutions_match_the_diffusers_vae():
    """The 2-D fast path of the VAE's causal convolutions gives the diffusers outputs (to
    float rounding) for one frame, and leaves multi-frame clips on the diffusers path."""
    import copy

    from diffusers import AutoencoderKLCogVideoX
    from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d

    from conftest import TINY_VAE
    from ulbcodec.models.single_frame import use_one_frame_convolutions

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**TINY_VAE).eval()
    fast = use_one_frame_convolutions(copy.deepcopy(vae))
    use_one_frame_convolutions(fast)  # idempotent
    convs = [m for m in fast.modules() if isinstance(m, CogVideoXCausalConv3d)]
    assert convs and all(type(m).__name__.startswith("OneFrame") for m in convs)
    assert all(type(m).__mro__[1] is CogVideoXCausalConv3d for m in convs)  # wrapped once
    x = torch.rand(1, 3, 1, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    clip = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        for inputs in (x, clip):
            z, z_fast = (m.encode(inputs).latent_dist.mode() for m in (vae, fast))
            torch.testing.assert_close(z_fast, z, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fast.decode(z).sample, vae.decode(z).sample, atol=1e-5, rtol=1e-5)
    assert fast.state_dict().keys() == vae.state_dict().keys()
    # one frame, no cache: the 2-D path ran (its cache is a view of the frame, not a copy)
    frame = torch.rand(1, convs[0].conv.in_channels, 1, 8, 8)
    _, cache = convs[0](frame)
    assert cache.shape[2] == convs[0].time_kernel_size - 1 and cache.stride(2) == 0


@pytest.mark.parametrize("config", [{}, dict(block_out_channels=(8, 16, 16, 8))], ids=["tiny", "shortcuts"])
def test_one_frame_graph_matches_the_diffusers_vae(config):
    """The 2-D channels-last inference graph of the whole VAE gives diffusers' one-frame
    encode (mode) and decode to float rounding, with plain resnets and with resnets whose
    channel counts change (1x1 shortcuts); in bf16 it errs no more than twice as much as
    diffusers' graph under bf16 autocast."""
    from diffusers import AutoencoderKLCogVideoX

    from conftest import TINY_VAE
    from ulbcodec.models.single_frame import decode_one_frame, encode_one_frame, one_frame_graph_supported

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(**{**TINY_VAE, **config}).eval()
    assert one_frame_graph_supported(vae)
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        torch.testing.assert_close(encode_one_frame(vae, x), z, atol=1e-5, rtol=1e-5)
        y = vae.decode(z.unsqueeze(2)).sample[:, :, 0]
        torch.testing.assert_close(decode_one_frame(vae, z), y, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # diffusers' own bf16 error, the yardstick
            y_autocast = vae.decode(z.unsqueeze(2)).sample[:, :, 0].float()
            z_autocast = vae.encode(x.unsqueeze(2)).latent_dist.mode()[:, :, 0].float()
        for got, want, autocast in ((decode_one_frame(vae, z, torch.bfloat16), y, y_autocast),
                                    (encode_one_frame(vae, x, torch.bfloat16), z, z_autocast)):
            assert got.dtype == torch.bfloat16
            assert torch.norm(got.float() - want) < 2 * torch.norm(autocast - want)


def test_one_frame_graph_serves_inference_only(gen_codec):
    """The pipeline decodes through the 2-D graph without gradients and through diffusers'
    graph (differentiable) with them; the two agree to bf16 rounding (both run in bf16). A VAE the graph
    does not reproduce (replicate padding) keeps diffusers' graph."""
    import copy

    from ulbcodec.models.single_frame import one_frame_graph_supported

    pipe = gen_codec.next_frame
    assert pipe.one_frame_graph
    latent = torch.randn(1, pipe.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = pipe.decode_latent(latent, clamp=False)
    trained = latent.clone().requires_grad_()
    slow = pipe.decode_latent(trained, clamp=False)
    slow.sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
    assert torch.norm(fast - slow.detach()) < 0.02 * torch.norm(slow.detach())
    vae = copy.deepcopy(pipe.vae)
    vae.decoder.conv_in.pad_mode = "replicate"
    assert not one_frame_graph_supported(vae)
    vae = copy.deepcopy(pipe.vae)
    vae.post_quant_conv = torch.nn.Conv3d(pipe.latent_channels, pipe.latent_channels, 1)
    assert not one_frame_graph_supported(vae)


def test_anchor_residual_output_is_in_the_manifest_and_the_digest(tmp_path, small, monkeypatch):
    """``"next_frame": {"output": "anchor_residual"}``: a version-3 manifest whose digest
    differs from the same weights without it; a prediction that changes nothing (x0 = the
    anchor's own latent) then decodes to exactly the anchor frame."""
    plain = ModelPackage.load_manifest(make_tiny_generative_package(tmp_path, "plain"))
    root = make_tiny_generative_package(tmp_path, "resid", next_frame={"output": "anchor_residual"})
    resid = ModelPackage.load_manifest(root)
    manifest = json.loads((root / "ulbc_model.json").read_text())
    assert manifest["format_version"] == 3 and manifest["next_frame"] == {"output": "anchor_residual"}
    assert resid.digest != plain.digest and resid.next_frame_setting("output") == "anchor_residual"
    assert plain.next_frame_setting("output") == "latent"
    codec = ImageCodec.from_pretrained(str(root))
    assert codec.next_frame.output == "anchor_residual"
    data = codec.encode(small, 1).data
    generated = codec.decode(data)
    assert np.array_equal(generated, codec.decode(data))
    monkeypatch.setattr(next_frame.NextFramePipeline, "predict_clean", lambda self, a, z, t=500: a)
    assert np.array_equal(codec.decode(data), codec.decode(data, anchor_only=True))
    assert not np.array_equal(generated, codec.decode(data))


@pytest.mark.parametrize("setting, message", [({"output": "pixels"}, "must be one of"),
                                              ({"steps": 4}, "unknown next_frame setting")])
def test_bad_next_frame_settings_are_refused(tmp_path, setting, message):
    root = make_tiny_generative_package(tmp_path, "g")
    manifest = json.loads((root / "ulbc_model.json").read_text())
    manifest["next_frame"] = setting
    (root / "ulbc_model.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=message):
        ModelPackage.load_manifest(root)
