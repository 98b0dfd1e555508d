"""The detail loss of stage II training (ulbcodec.losses.detail_loss) on a real photograph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulbcodec.losses.detail_loss import detail_loss, detail_restoration, wavelet_details


@pytest.fixture(scope="module")
def crop(photo):
    return torch.from_numpy(np.ascontiguousarray(photo[:128, :128])).permute(2, 0, 1)[None].float() / 255


def blur(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)


def test_the_original_restores_all_of_its_detail(crop):
    assert detail_restoration(crop, crop).item() == pytest.approx(1.0, abs=1e-4)
    assert detail_loss(crop, crop).item() == pytest.approx(0.0, abs=1e-4)


def test_blur_and_noise_lose_detail_and_more_blur_loses_more(crop):
    blurred = blur(crop)
    noisy = (crop + 0.08 * torch.randn(crop.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    once, twice = detail_restoration(blurred, crop).item(), detail_restoration(blur(blurred), crop).item()
    assert twice < once < 0.9
    assert detail_restoration(noisy, crop).item() < 0.9


def test_detail_beyond_the_original_earns_nothing(crop):
    """Restoration is capped at the original's own coefficients: over-sharpening the
    original cannot score above the original itself."""
    sharpened = crop + 1.5 * (crop - blur(crop))
    assert detail_restoration(sharpened, crop).item() <= 1.0 + 1e-6


def test_one_value_per_image_and_a_gradient_toward_the_original(crop):
    batch = torch.cat([crop, crop.flip(-1)])
    decoded = blur(batch).requires_grad_(True)
    per_image = detail_restoration(decoded, batch)
    assert per_image.shape == (2,)
    loss = detail_loss(decoded, batch)
    loss.backward()
    assert torch.isfinite(decoded.grad).all() and decoded.grad.abs().sum() > 0
    with torch.no_grad():  # a small step against the gradient restores detail
        assert detail_loss(decoded - 20 * decoded.grad, batch) < loss


def test_wavelet_bands_halve_per_scale(crop):
    bands = wavelet_details(crop[:, :1] * 255)
    assert [tuple(b.shape) for b in bands] == [(1, 3, 64, 64), (1, 3, 32, 32), (1, 3, 16, 16), (1, 3, 8, 8)]
