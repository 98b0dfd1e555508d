"""Shared fixtures: a tiny random anchor-codec package (fast, real classes) and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "ulbcodec" / "data" / "coffee.png"
TINY_CONFIG = dict(N=16, M=32, num_slices=2, context_window=3, vae_channels=0, bypass_channels=4,
                   num_rate_levels=3, token_channels=16, num_token_blocks=1)


def make_tiny_package(root: Path, name: str = "tiny", seed: int = 0) -> Path:
    from ulbcodec.models.anchor_codec import AnchorCodec
    from ulbcodec.models.package import RateLevel, save_package

    torch.manual_seed(seed)
    model = AnchorCodec(**TINY_CONFIG)
    model.update(force=True)
    save_package(root / name, name, {"anchor_codec": model.eval()}, [RateLevel(i) for i in range(3)],
                 description="tiny random model for tests")
    return root / name


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A folder on ULBC_MODEL_PATH holding the package 'tiny'."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_package(root)
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
