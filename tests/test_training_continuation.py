"""Continuing training from a shipped package: the anchor trainer's ``--init-from`` (new
run, the package's weights and gains) and the generative trainer's ``--init-from`` on a
different ``--anchor-model`` (the decoder moves onto that anchor codec, bypass head kept)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT_DIR, run_trainer
from safetensors.torch import load_file

TINY_RUN = ["--batch", "1", "--log-every", "1", "--save-every", "0"]
BYPASS_PREFIXES = ("project_in.", "information_transformer_layes.", "spatial_ch_projs.")


def run(args, tmp_path: Path) -> str:
    return run_trainer([sys.executable, "-m", *map(str, args)], tmp_path)


@pytest.fixture(scope="module")
def one_step_anchor(photos, tmp_path_factory) -> Path:
    """An anchor-codec package of the default config after one training step from scratch
    (so its weights differ from the shipped ones)."""
    root = tmp_path_factory.mktemp("anchor")
    run(["ulbcodec.train.anchor", "--data", photos, "--run", root / "run", "--steps", "1", "--crop", "64",
         *TINY_RUN, "--export", root / "package"], root)
    return root / "package"


def weights(package: Path) -> dict:
    return load_file(str(package / "anchor_codec.safetensors"))


def manifest(package: Path) -> dict:
    return json.loads((package / "ulbc_model.json").read_text())


def trained(state: dict) -> dict:
    """The weights the network optimiser moves (not the quantiles, fitted by their own
    optimiser, nor the CDF tables built from them)."""
    return {k: v for k, v in state.items() if not k.startswith("entropy_bottleneck.")
            and not k.startswith("gaussian_conditional.")}


def test_anchor_trainer_continues_from_a_package(photos, one_step_anchor, tmp_path):
    first, second = one_step_anchor, tmp_path / "second"
    # lr 0: a continuation that changes nothing must export the same weights, gains included
    # (no second widening of the gain spread)
    out = run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run2", "--init-from", first,
               "--steps", "1", "--crop", "64", "--lr", "0", *TINY_RUN, "--export", second],
              tmp_path)
    assert "resumed" not in out
    before, after = trained(weights(first)), trained(weights(second))
    assert before.keys() == after.keys() and any(k.startswith("gain") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    record = manifest(second)["extra"]["training"]
    assert record["init_from"]["digest"] == manifest(first)["digest"]
    assert record["init_from"]["training"] == manifest(first)["extra"]["training"] and record["steps"] == 1


def test_generative_continuation_moves_the_decoder_onto_another_anchor_codec(photos, one_step_anchor, tmp_path):
    anchor, out = one_step_anchor, tmp_path / "generative"
    # --crop 192: MS-SSIM in the stage II loss needs more than 160 pixels a side
    run(["ulbcodec.train.generative", "--data", photos, "--run", tmp_path / "run2", "--anchor-model", anchor,
         "--init-from", "generative", "--output", "anchor_residual", "--stage2-steps", "1", "--lr", "0",
         "--crop", "192", *TINY_RUN, "--export", out], tmp_path)
    new, base = weights(out), weights(anchor)
    shipped = weights(ROOT_DIR / "models" / "generative")
    bypass = {k for k in new if k.startswith(BYPASS_PREFIXES)}
    assert bypass and all(torch.equal(new[k], shipped[k]) for k in bypass)  # lr 0: the package's head
    rest = set(new) - bypass
    assert all(torch.equal(new[k], base[k]) for k in rest)  # everything else: --anchor-model's
    first_conv = "g_a.analysis_transform.0.conv1.weight"
    assert not torch.equal(new[first_conv], shipped[first_conv])  # so the two codecs did differ
    training = manifest(out)["extra"]["training"]
    assert training["continuation"]["anchor_model_digest"] == manifest(anchor)["digest"]


def test_generative_stage2_trains_with_the_ssimulacra2_and_grid_losses_and_a_multiscale_critic(photos, tmp_path):
    """``--ssimulacra2-weight --grid-weight --disc-scales 2``: both terms are logged each
    step, the checkpoint holds two PatchGANs, the package records the recipe."""
    out = tmp_path / "generative"
    log = run(["ulbcodec.train.generative", "--data", photos, "--run", tmp_path / "run", "--anchor-model", "generative",
               "--init-from", "generative", "--output", "anchor_residual", "--stage2-steps", "2", "--crop", "192",
               "--ssimulacra2-weight", "5", "--grid-weight", "10", "--disc-scales", "2", *TINY_RUN, "--export", out],
              tmp_path)
    steps = [line for line in log.splitlines() if line.startswith("stage2 step")]
    assert len(steps) == 2 and all("'ssimu2'" in line and "'grid'" in line and "'g_adv'" in line for line in steps)
    critic = load_file(str(tmp_path / "run" / "stage2" / "weights.safetensors"))
    assert {k.split(".")[2] for k in critic if k.startswith("disc.scales.")} == {"0", "1"}
    recipe = manifest(out)["extra"]["training"]["continuation"]
    assert (recipe["ssimulacra2_weight"], recipe["grid_weight"], recipe["disc_scales"]) == (5.0, 10.0, 2)


def test_anchor_rd_loss_adds_the_perceptual_terms_at_their_weight(photos):
    """``--perceptual-weight w``: the loss is R + λ·(D + w·(detail + VIF losses)), the
    refinement objective, and its gradient reaches the codec's synthesis."""
    from contextlib import nullcontext

    from PIL import Image

    from ulbcodec.losses.rate_distortion import perceptual_terms
    from ulbcodec import packages
    from ulbcodec.train.anchor import rd_loss

    codec = packages.ModelPackage.load_manifest(packages.resolve("default")).build("anchor_codec").train()
    path = sorted((Path(photos) / "photos" / "train").iterdir())[0]
    image = Image.open(path).convert("RGB").resize((192, 192))
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
    lmbda = 0.00025
    torch.manual_seed(0)
    plain, bpp, *_ = rd_loss(codec, x, 2, lmbda, True, nullcontext())
    torch.manual_seed(0)  # the same uniform noise in the rate proxy
    weighted, bpp_w, *_ = rd_loss(codec, x, 2, lmbda, True, nullcontext(), perceptual_weight=500.0)
    with torch.no_grad():
        torch.manual_seed(0)
        x_hat = codec(x, rate_level=2, with_bypass=False)["anchor_frame"].float()
        detail, vif = perceptual_terms(x_hat, x)
    assert torch.allclose(bpp, bpp_w)
    assert 0 < detail < 1 and 0 < vif < 1
    assert (weighted - plain).item() == pytest.approx(lmbda * 500.0 * (detail + vif).item(), rel=1e-4)
    codec.zero_grad()
    (weighted - plain).backward()
    synthesis = [p.grad for n, p in codec.named_parameters() if n.startswith("g_s.")]
    assert any(g is not None and g.abs().sum() > 0 for g in synthesis)


def test_anchor_trainer_records_its_perceptual_weight(photos, one_step_anchor, tmp_path):
    out = tmp_path / "perceptual"
    run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run", "--init-from", one_step_anchor,
         "--steps", "1", "--crop", "64", "--perceptual-weight", "500", *TINY_RUN, "--export", out], tmp_path)
    assert manifest(out)["extra"]["training"]["perceptual_weight"] == 500.0
    assert any(not torch.equal(a, b) for a, b in zip(trained(weights(out)).values(),
                                                     trained(weights(one_step_anchor)).values()))


def test_remapped_rate_levels_take_the_gains_at_their_lambda():
    """A continuation with other λs starts each level at the gains the model has for its λ:
    the same λs change nothing, λs one level lower shift the gains by one level, a λ
    below the lowest extrapolates geometrically, and extra levels above the top extend
    the range the same way."""
    from ulbcodec import packages
    from ulbcodec.train.anchor import remap_rate_levels

    package = packages.ModelPackage.load_manifest(packages.resolve("default"))
    lambdas = [lv.lmbda for lv in package.rate_levels]
    codec = package.build("anchor_codec")
    old = {name: getattr(codec, name).detach().abs().clone() for name in ("gain", "inverse_gain")}
    same = remap_rate_levels(old["gain"], old["inverse_gain"], lambdas, lambdas)
    assert all(torch.allclose(new, old[n], rtol=1e-5) for new, n in zip(same, old))
    lower = remap_rate_levels(old["gain"], old["inverse_gain"], lambdas, [lambdas[0] ** 2 / lambdas[1], *lambdas[:-1]])
    for new, name in zip(lower, old):
        assert torch.allclose(new[1:], old[name][:-1], rtol=1e-5)
        assert torch.allclose(new[0], old[name][0] ** 2 / old[name][1], rtol=1e-4)
    more = remap_rate_levels(old["gain"], old["inverse_gain"], lambdas, [*lambdas, lambdas[-1] ** 2 / lambdas[-2]])
    for new, name in zip(more, old):
        assert new.shape[0] == len(lambdas) + 1
        assert torch.allclose(new[:-1], old[name], rtol=1e-5)
        assert torch.allclose(new[-1], old[name][-1] ** 2 / old[name][-2], rtol=1e-4)


def test_anchor_trainer_adds_rate_levels_above_the_packages(photos, one_step_anchor, tmp_path):
    """--init-from with more λs than the package has levels (a video package's keyframe
    codec given higher rates, exported --into it): the exported package has a level per λ,
    the old ones kept."""
    out = tmp_path / "more"
    old = [lv["lmbda"] for lv in manifest(one_step_anchor)["rate_levels"]]
    new = [*old, old[-1] * 2.5]
    run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run", "--init-from", one_step_anchor,
         "--steps", "1", "--crop", "64", "--lr", "0", "--lambdas", *new, *TINY_RUN, "--export", out,
         "--into", one_step_anchor], tmp_path)
    assert [lv["lmbda"] for lv in manifest(out)["rate_levels"]] == new
    assert manifest(out)["components"]["anchor_codec"]["config"]["num_rate_levels"] == len(new)
    gains = weights(out)["gain"]
    assert gains.shape[0] == len(new)
    assert torch.equal(gains[:len(old)], weights(one_step_anchor)["gain"])


def test_anchor_trainer_records_remapped_lambdas(photos, one_step_anchor, tmp_path):
    out = tmp_path / "lower"
    old = [lv["lmbda"] for lv in manifest(one_step_anchor)["rate_levels"]]
    new = [v / 2 for v in old]
    run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run", "--init-from", one_step_anchor,
         "--steps", "1", "--crop", "64", "--lr", "0", "--lambdas", *new, *TINY_RUN, "--export", out], tmp_path)
    assert [lv["lmbda"] for lv in manifest(out)["rate_levels"]] == new
    assert manifest(out)["extra"]["training"]["init_from"]["remapped_lambdas"] == old
    assert not torch.equal(weights(out)["gain"], weights(one_step_anchor)["gain"])


def test_anchor_trainer_exports_into_another_package(photos, one_step_anchor, tmp_path):
    """--into: the package comes back with only its anchor codec replaced (a video
    package's keyframe codec fine-tuned on darkened crops, here a tiny stand-in)."""
    out = tmp_path / "into"
    run(["ulbcodec.train.anchor", "--data", photos, "--run", tmp_path / "run", "--init-from", one_step_anchor,
         "--steps", "1", "--crop", "64", "--lr", "0", "--dark-fraction", "1", *TINY_RUN, "--export", out,
         "--into", one_step_anchor], tmp_path)
    base, new = manifest(one_step_anchor), manifest(out)
    assert new["components"].keys() == base["components"].keys() and new["description"] == base["description"]
    assert new["extra"]["training"] == base["extra"]["training"]
    assert new["extra"]["keyframe_training"]["dark_fraction"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(trained(weights(one_step_anchor)).values(),
                                                  trained(weights(out)).values()))


def test_a_wider_anchor_codec_exports_from_its_run_alone(photos, tmp_path):
    """--width/--latent give a run its codec's size; resuming or exporting it takes the
    size from the run's checkpoint, so the command needs no more than --run."""
    run_dir, out = tmp_path / "run", tmp_path / "wide"
    run(["ulbcodec.train.anchor", "--data", photos, "--run", run_dir, "--steps", "1", "--crop", "64",
         "--width", "32", "--latent", "64", *TINY_RUN], tmp_path)
    run(["ulbcodec.train.anchor", "--data", photos, "--run", run_dir, "--export-only", "--export", out], tmp_path)
    config = manifest(out)["components"]["anchor_codec"]["config"]
    assert (config["N"], config["M"]) == (32, 64)


def _write_clip(path: Path, frames: np.ndarray) -> None:
    from ulbcodec.train.video_data import write_lossless

    write_lossless(path, iter(frames), (frames.shape[2], frames.shape[1]), 8.0)


def test_video_frames_for_the_keyframe_codec(photos, tmp_path):
    """--video-fraction: crops from every 4th frame of the training clips at least one crop
    wide; 0 draws exactly the photograph crops of a run without video frames."""
    from ulbcodec.train.anchor import PhotoCrops, load_video_frames

    folder = tmp_path / "videos" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    clip = rng.integers(0, 256, (10, 64, 80, 3), dtype=np.uint8)
    _write_clip(folder / "a.mkv", clip)
    _write_clip(folder / "small.mkv", rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8))
    clips = load_video_frames(folder, 64)
    assert len(clips) == 1 and np.array_equal(clips[0], clip[::4])
    with pytest.raises(SystemExit, match="no training clip of at least 128x128"):
        load_video_frames(folder, 128)

    files = sorted((photos / "photos" / "train").iterdir())
    black = [np.zeros((3, 64, 64, 3), np.uint8)]
    video = PhotoCrops(files, 64, seed=5, video_clips=black, video_fraction=1.0).batch(6)
    # a black frame after the colour jitter: one grey level per crop, at most the 0.05 offset
    assert all(crop.unique().numel() == 1 and crop.max() <= 0.05 for crop in video)
    photo_only = PhotoCrops(files, 64, seed=5).batch(6)
    assert all(crop.std() > 0.05 for crop in photo_only)
    assert torch.equal(PhotoCrops(files, 64, seed=5, video_clips=black, video_fraction=0.0).batch(6), photo_only)


def test_anchor_trainer_takes_video_frames(photos, one_step_anchor, tmp_path):
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    (data / "photos" / "train").symlink_to(photos / "photos" / "train")
    frames = np.random.default_rng(4).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    _write_clip(data / "videos" / "train" / "clip.mkv", frames)
    out = tmp_path / "into"
    run(["ulbcodec.train.anchor", "--data", data, "--run", tmp_path / "run", "--init-from", one_step_anchor,
         "--steps", "2", "--crop", "64", "--video-fraction", "0.5", *TINY_RUN, "--export", out,
         "--into", one_step_anchor], tmp_path)
    record = manifest(out)["extra"]["keyframe_training"]
    assert record["video_fraction"] == 0.5 and record["mixed_precision"] in ("bf16", "no")
    with pytest.raises(AssertionError, match="--video-fraction must be in"):
        run(["ulbcodec.train.anchor", "--data", data, "--run", tmp_path / "bad", "--video-fraction", "2"], tmp_path)
