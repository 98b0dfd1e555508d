"""A pretrained image-to-video model as the frame predictor (models/i2v_predictor.py),
with a tiny random CogVideoX image-to-video transformer + VAE saved in diffusers' layout
as the "pretrained" base, and the tiny generative image model for the keyframes."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ulbcodec.cli import cli
from ulbcodec.packages import ModelError
from ulbcodec.video import VideoCodec, VideoSettings

from conftest import TINY_LATENT, TINY_TRANSFORMER, TINY_VAE, make_tiny_generative_package


def save_base(root: Path, in_channels: int = 2 * TINY_LATENT, embeds: bool = True) -> Path:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    from ulbcodec.models.next_frame import SCHEDULER_CONFIG

    torch.manual_seed(3)
    transformer = CogVideoXTransformer3DModel(**{**TINY_TRANSFORMER, "in_channels": in_channels})
    transformer.save_pretrained(root / "transformer")
    AutoencoderKLCogVideoX(**TINY_VAE).save_pretrained(root / "vae")
    CogVideoXDDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    if embeds:
        save_file({"prompt_embeds": torch.randn(1, 3, TINY_TRANSFORMER["text_embed_dim"])},
                  str(root / "prompt_embeds.safetensors"))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from ulbcodec.importers.i2v import import_i2v_predictor

    root = tmp_path_factory.mktemp("i2v")
    base = save_base(root / "base")
    image = make_tiny_generative_package(root, "tinygen")
    package = import_i2v_predictor(base, str(image), root / "tiny-i2v", pred_frames=4, steps=2, dtype="float32")
    return root, base, image, package


def clip(frames: int, h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    out = [np.stack([128 + 90 * np.sin((x + 2 * t) / 7), 128 + 90 * np.cos((y + t) / 5),
                     np.full_like(x, 100.0)], -1) for t in range(frames)]
    return np.clip(out, 0, 255).astype(np.uint8)


def test_the_package_references_the_base_and_predicts_rounds_of_p_frames(models):
    _, base, _, package = models
    assert package.components["predictor"]["external"]["path"] == str((base / "transformer").resolve())
    assert package.extra["video"] == {"predictor": "cogvideox-i2v", "cond_frames": 1, "pred_frames": 4, "steps": 2,
                                      "guidance_scale": 1.0, "dtype": "float32"}
    codec = VideoCodec(package)
    seen = []
    data, gops = codec.encode(iter(clip(9)), Fraction(25), VideoSettings(threshold=10.0, rate_level=1),
                              reconstruction=seen.append)
    assert gops.frame_types() == "Kpppppppp"  # K = 1, then rounds of P = 4
    decoded = list(VideoCodec(package).decode(data))  # a fresh decoder, from the file alone
    assert len(decoded) == 9 and all(np.array_equal(a, b) for a, b in zip(seen, decoded))
    assert all(f.shape == (32, 48, 3) and f.dtype == np.uint8 for f in decoded)
    other = list(VideoCodec(package).decode(codec.encode(iter(clip(9)), Fraction(25),
                                                         VideoSettings(threshold=10.0, rate_level=1, seed=5))[0]))
    assert np.array_equal(other[0], decoded[0]) and not np.array_equal(other[1], decoded[1])  # noise from the seed


def test_a_tight_threshold_gives_keyframes_only(models):
    codec = VideoCodec(models[3])
    _, gops = codec.encode(iter(clip(3)), Fraction(25), VideoSettings(threshold=0.0, rate_level=0))
    assert gops.frame_types() == "KKK"


@pytest.mark.parametrize("change, message", [
    ("text-to-video", "takes 8 input channels"),
    ("pred-frames-6", "multiple of 4"),
    ("no-embeds", "no prompt embeddings"),
    ("guidance-without-negative", "negative prompt embeddings"),
])
def test_bad_bases_are_refused_with_one_line_and_leave_nothing(models, tmp_path, change, message):
    from ulbcodec.importers.i2v import import_i2v_predictor

    _, good, image, _ = models
    base = good
    kwargs = {}
    if change == "text-to-video":
        base = save_base(tmp_path / "t2v", in_channels=TINY_LATENT)
    elif change == "pred-frames-6":
        kwargs["pred_frames"] = 6
    elif change == "no-embeds":
        base = save_base(tmp_path / "bare", embeds=False)
    else:
        kwargs["guidance_scale"] = 3.0
    with pytest.raises(ModelError, match=message) as err:
        import_i2v_predictor(base, str(image), tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_import_command(models, tmp_path):
    root, base, image, _ = models
    args = ["models", "import-video-predictor", "--base", str(base), "--image-model", str(image), "--steps", "1",
            "-o", str(tmp_path / "v")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "K=1 -> P=4, 1 steps" in r.output and (tmp_path / "v" / "ulbc_model.json").is_file()
    codec = VideoCodec.from_pretrained(str(tmp_path / "v"))  # bfloat16, as published, on the CPU too
    assert codec.predictor.dtype == torch.bfloat16
    seen = []
    data, gops = codec.encode(iter(clip(5)), Fraction(25), VideoSettings(threshold=10.0), reconstruction=seen.append)
    assert gops.frame_types() == "Kpppp"
    assert all(np.array_equal(a, b) for a, b in zip(seen, VideoCodec.from_pretrained(str(tmp_path / "v")).decode(data)))
    r = CliRunner().invoke(cli, args)  # exists: refused, untouched
    assert r.exit_code == 1 and "already exists" in r.output
    r = CliRunner().invoke(cli, [*args[:3], str(root / "nowhere"), *args[4:-1], str(tmp_path / "w")])
    assert r.exit_code == 1 and "not an image-to-video model" in r.output and not (tmp_path / "w").exists()
