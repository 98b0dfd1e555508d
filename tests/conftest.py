"""Shared fixtures: a tiny random anchor-codec package (fast, real classes), images, a
training-data directory of small textures, and the runner the trainer tests share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import pytest
import torch

ROOT_DIR = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SAMPLE = ROOT_DIR / "src" / "ulbcodec" / "data" / "coffee.png"
TINY_CONFIG = dict(N=16, M=32, num_slices=2, context_window=3, vae_channels=0, bypass_channels=4,
                   num_rate_levels=3, token_channels=16, num_token_blocks=1)


def make_tiny_package(root: Path, name: str = "tiny", seed: int = 0, lambdas=(0.0, 0.0, 0.0)) -> Path:
    from ulbcodec.models.anchor_codec import AnchorCodec
    from ulbcodec.packages import RateLevel, save_package

    torch.manual_seed(seed)
    model = AnchorCodec(**TINY_CONFIG)
    model.update(force=True)
    save_package(root / name, name, {"anchor_codec": model.eval()}, [RateLevel(i, l) for i, l in enumerate(lambdas)],
                 description="tiny random model for tests")
    return root / name


# Tiny random models of the real diffusers classes (CogVideoX VAE and transformer).
TINY_LATENT = 4
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=TINY_LATENT,
                temporal_compression_ratio=4, sample_height=64, sample_width=64)
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=16, in_channels=TINY_LATENT,
                        out_channels=TINY_LATENT, time_embed_dim=16, text_embed_dim=8, num_layers=1, sample_width=8,
                        sample_height=8, sample_frames=5, patch_size=2, patch_size_t=2, temporal_compression_ratio=4,
                        max_text_seq_length=3, use_rotary_positional_embeddings=True)


def make_tiny_generative_package(root: Path, name: str = "tinygen", seed: int = 0, vae_channels: int = 0,
                                 next_frame: dict | None = None) -> Path:
    """An anchor codec + CogVideoX VAE/transformer/scheduler + prompt embeddings, random."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    from ulbcodec.models.anchor_codec import AnchorCodec
    from ulbcodec.packages import RateLevel, save_package
    from ulbcodec.models.next_frame import SCHEDULER_CONFIG

    torch.manual_seed(seed)
    config = {**TINY_CONFIG, "bypass_channels": TINY_LATENT, "vae_channels": vae_channels}
    codec = AnchorCodec(**config)
    codec.update(force=True)
    modules = {"anchor_codec": codec.eval(), "vae": AutoencoderKLCogVideoX(**TINY_VAE).eval(),
               "transformer": CogVideoXTransformer3DModel(**TINY_TRANSFORMER).eval(),
               "scheduler": CogVideoXDDIMScheduler(**SCHEDULER_CONFIG),
               "prompt_embeds": torch.randn(1, 3, 8)}
    save_package(root / name, name, modules, [RateLevel(i) for i in range(3)],
                 description="tiny random generative model for tests", next_frame=next_frame)
    return root / name


TINY_VIDEO = {"cond_frames": 2, "pred_frames": 3, "steps": 2, "residual_scale": 0.5}


def make_tiny_video_package(root: Path, name: str = "tinyvideo", seed: int = 0, pframe: Union[bool, str] = False,
                            pframe_levels: Optional[int] = None, half_parameters: bool = False,
                            fusion: bool = False) -> Path:
    """The tiny generative image model plus a tiny UNet2DModel frame predictor (and with
    ``pframe`` a tiny random P-frame codec, with ``pframe_levels`` rate levels: default
    as many as the keyframe codec; ``pframe="latent"`` an untrained temporal prior over
    the keyframe codec's symbols; with ``fusion`` also a random temporal fusion of fused
    P frames). ``half_parameters``: parameters stored in float16, as shipped packages are
    (what trainers' exports derive from)."""
    from diffusers import CogVideoXDDIMScheduler, UNet2DModel

    from ulbcodec.packages import ModelPackage, save_package
    from ulbcodec.models.next_frame import SCHEDULER_CONFIG

    image = ModelPackage.load_manifest(make_tiny_generative_package(root, name + "-image", seed))
    modules = {c: image.build(c) for c in image.components}
    k, p = TINY_VIDEO["cond_frames"], TINY_VIDEO["pred_frames"]
    torch.manual_seed(seed)
    modules["predictor"] = UNet2DModel(sample_size=8, in_channels=TINY_LATENT * (k + p), out_channels=TINY_LATENT * p,
                                       down_block_types=("DownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(8, 8),
                                       layers_per_block=1, add_attention=False, norm_num_groups=4).eval()
    modules["predictor_scheduler"] = CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    if pframe == "latent":
        from ulbcodec.models.latent_conditional_codec import TemporalLatentPrior

        modules["pframe"] = TemporalLatentPrior(M=TINY_CONFIG["M"], num_slices=TINY_CONFIG["num_slices"], width=8)
    elif pframe:
        from ulbcodec.models.pframe_codec import PFrameCodec

        modules["pframe"] = PFrameCodec(N=8, M=16, context_widths=[8, 8, 8], num_rate_levels=pframe_levels or len(image.rate_levels))
        with torch.no_grad():  # a small latent: P frames cheaper than keyframes, as a trained model's are
            modules["pframe"].g_a.down4.weight.mul_(0.01)
        modules["pframe"].update(force=True)
    if fusion:
        from ulbcodec.models.temporal_fusion import TemporalFusion

        modules["temporal_fusion"] = TemporalFusion(width=4)
        torch.nn.init.normal_(modules["temporal_fusion"].out[-1].weight, std=0.1)  # not the warp alone
    if half_parameters:
        from ulbcodec.packages import DIFFUSERS_CLASSES
        from ulbcodec.train.anchor import round_parameters_to_half

        for module in modules.values():
            if isinstance(module, torch.nn.Module) and type(module).__name__ not in DIFFUSERS_CLASSES:
                round_parameters_to_half(module)
                if hasattr(module, "update"):  # CDF tables from the rounded entropy models
                    module.update(force=True)
    save_package(root / name, name, modules, image.rate_levels, extra={"video": TINY_VIDEO},
                 description="tiny random video model for tests", half_parameters=half_parameters)
    return root / name


# Decoded pixels of the shipped models, pinned (scripts/pin_default_model.py). The bitstreams
# are pinned exactly: entropy coding is bit-exact by design. Synthesis and the diffusion
# models are not: their last bits follow the CPU's kernels (a machine with AMX rounds
# differently from one without), so pixels match the pinned digest on the machine that
# recorded it and elsewhere must stay within a rounding-sized distance of the reference
# PNG recorded with it. Any real change to decoding moves them much further.
PIN_PSNR_DB = {"anchor": 50.0, "generative": 40.0, "video": 40.0}


def assert_pixels_pinned(pixels: np.ndarray, digest: str, reference: str, kind: str) -> None:
    """``pixels`` (uint8, frames stacked along the first axis) against a pin: the digest
    itself, or within PIN_PSNR_DB[kind] of tests/data/pins/``reference``."""
    import hashlib

    from PIL import Image

    from ulbcodec.metrics import psnr

    if hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == digest:
        return
    expected = np.asarray(Image.open(DATA / "pins" / reference).convert("RGB"))
    flat = pixels.reshape(-1, *pixels.shape[-2:])
    assert flat.shape == expected.shape, f"{reference}: shape {flat.shape} != {expected.shape}"
    assert psnr(expected, flat) >= PIN_PSNR_DB[kind], (
        f"{reference}: decoded pixels moved {psnr(expected, flat):.1f} dB from the pin (a real change to "
        f"decoding: re-pin with scripts/pin_default_model.py and say so in the commit message)")


@pytest.fixture()
def one_thread():
    """One torch thread for the test (the test machine's other core is shared), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A folder on ULBC_MODEL_PATH holding the packages 'tiny' and 'tinygen'."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_package(root)
    make_tiny_generative_package(root)
    return root


@pytest.fixture()
def tiny_model(model_dir, monkeypatch) -> Path:
    monkeypatch.setenv("ULBC_MODEL_PATH", str(model_dir))
    return model_dir / "tiny"


@pytest.fixture(scope="session")
def tiny_codec(model_dir):
    from ulbcodec.image import ImageCodec

    return ImageCodec.from_pretrained(str(model_dir / "tiny"))


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph (scikit-image's coffee, 600x400, held out from training)."""
    from PIL import Image

    return np.asarray(Image.open(SAMPLE).convert("RGB"))


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """A data dir with three small random-texture photographs in photos/train (train/data.py's layout)."""
    from PIL import Image

    data = tmp_path_factory.mktemp("data")
    train = data / "photos" / "train"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(96, 80), (80, 96), (128, 72)]):
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-20, 21, (h, w, 3))
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(train / f"test__texture{i}.png")
    return data


def _trainer_env(tmp_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1",
               HF_HOME=str(tmp_path / "hf"))  # no user accelerate config in the way
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def run_trainer(cmd, tmp_path: Path, timeout: float = 3600) -> str:
    """Run a training command (plain or under `accelerate launch`) from the repository root
    on one thread per process; assert it succeeded and return its stdout. The work is
    bounded by the command's step counts; ``timeout`` is only a hang guard, generous for a
    loaded machine (a 240 s bound failed two-process runs under load)."""
    proc = subprocess.run(cmd, cwd=ROOT_DIR, env=_trainer_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def tiny_video_trainer_args(tmp_path: Path, package: Path, frames: np.ndarray, *extra: str) -> List[str]:
    """Arguments of a video trainer (train.pframe_latent, train.temporal_fusion) whose one
    training clip, ``frames`` (T x 64 x 96 x 3), is written under ``tmp_path``: data, run
    folder ``tmp_path / "run"``, the package, one thread, 64 px crops, a log and a
    checkpoint every step."""
    from ulbcodec.train.video_data import write_lossless

    clips = tmp_path / "data" / "videos" / "train"
    clips.mkdir(parents=True)
    write_lossless(clips / "pan.mkv", iter(frames), (96, 64), 25)
    return ["--data", str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--video-model", str(package),
            "--threads", "1", "--crop", "64", "--log-every", "1", "--save-every", "0", *extra]
