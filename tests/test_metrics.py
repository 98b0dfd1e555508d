"""Tests of ulbcodec.metrics: known values by hand, published BD-rate data, sanity cases."""

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from ulbcodec import metrics
from ulbcodec.eval import rd


def natural_image(h: int, w: int, seed: int = 0, slope: float = 2.0) -> np.ndarray:
    """Synthetic photo-like RGB image: Gaussian fields with power spectrum ~ 1/f^slope."""
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    f[0, 0] = 1.0
    amp = f ** (-slope / 2)
    amp[0, 0] = 0.0

    def field():
        x = np.fft.irfft2(amp * (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)), s=(h, w))
        return (x - x.mean()) / x.std()

    lum, c1, c2 = field(), field(), field()
    rgb = np.stack([lum + 0.4 * c1, lum - 0.2 * c1 + 0.2 * c2, lum - 0.4 * c2], axis=-1)
    return np.clip(128 + 40 * rgb, 0, 255).round().astype(np.uint8)


def blurred(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(np.rint(gaussian_filter(img.astype(float), sigma=(sigma, sigma, 0))), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ PSNR


def test_psnr_identical_is_inf():
    img = natural_image(32, 48)
    assert metrics.psnr(img, img) == math.inf
    assert metrics.psnr_y(img, img) == math.inf


def test_psnr_constant_offset_by_hand():
    ref = np.full((20, 30, 3), 100, np.uint8)
    dist = ref + np.uint8(5)  # every sample off by 5: MSE 25, luma also off by 5
    expected = 10 * math.log10(255**2 / 25)  # 34.151 dB
    assert metrics.psnr(ref, dist) == pytest.approx(expected, abs=1e-12)
    assert metrics.psnr_y(ref, dist) == pytest.approx(expected, abs=1e-9)


def test_psnr_pools_channels_and_psnr_y_uses_bt601_weights():
    ref = np.full((8, 8, 3), 50, np.uint8)
    dist = ref.copy()
    dist[..., 0] += 6  # red only: RGB MSE = 36 / 3, luma error = 0.299 * 6
    assert metrics.psnr(ref, dist) == pytest.approx(10 * math.log10(255**2 / 12), abs=1e-12)
    assert metrics.psnr_y(ref, dist) == pytest.approx(10 * math.log10(255**2 / (0.299 * 6) ** 2), abs=1e-9)


def test_metrics_reject_bad_inputs():
    img = natural_image(16, 16)
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(img, img[:8])
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(img, img.astype(np.float32))


# ------------------------------------------------------------------ MS-SSIM


def test_ms_ssim_identical_is_one_and_decreases_with_blur():
    img = natural_image(176, 192)
    assert metrics.ms_ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    mild, strong = metrics.ms_ssim(img, blurred(img, 1.0)), metrics.ms_ssim(img, blurred(img, 3.0))
    assert 0 < strong < mild < 1


def test_ms_ssim_refuses_images_too_small_for_five_scales():
    img = natural_image(160, 400)
    with pytest.raises(ValueError, match="161"):
        metrics.ms_ssim(img, img)


# ------------------------------------------------------------------ VMAF


def test_rgb_to_yuv420p_bt709_limited_range_levels_and_layout():
    white = np.full((3, 5, 3), 255, np.uint8)
    black = np.zeros((3, 5, 3), np.uint8)
    y_size, c_size = 15, 2 * 3  # odd sides: chroma planes are ceil(3/2) x ceil(5/2)
    yuv = metrics.rgb_to_yuv420p_bt709(white)
    assert len(yuv) == y_size + 2 * c_size
    assert set(yuv[:y_size]) == {235} and set(yuv[y_size:]) == {128}
    yuv = metrics.rgb_to_yuv420p_bt709(black)
    assert set(yuv[:y_size]) == {16} and set(yuv[y_size:]) == {128}
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    yuv = metrics.rgb_to_yuv420p_bt709(red)  # 4 Y samples, then one Cb and one Cr
    assert list(yuv) == [round(16 + 219 * 0.2126)] * 4 + [round(128 - 112 * 0.2126 / 0.9278), 240]


def test_vmaf_identical_still_image_scores_the_motion_free_ceiling():
    # vmaf_v0.6.1 gives ~100 for identical *moving* video, but a single frame has zero
    # motion features, which caps the identical-frame score at ~97.43 (Netflix/vmaf#1229).
    img = natural_image(64, 96)
    same = metrics.vmaf(img, img)
    assert 97.0 < same <= 100.0
    assert metrics.vmaf(img, blurred(img, 2.0)) < same - 10


def test_vmaf_video_identical_moving_sequence_is_about_100():
    base = natural_image(64, 128, seed=3)
    frames = [np.roll(base, 4 * t, axis=1) for t in range(6)]
    score = metrics.vmaf_video(frames, frames)
    # frame 0 has no motion (~97.4), the five moving frames score 100
    assert score == pytest.approx(100.0, abs=1.0)
    with pytest.raises(ValueError, match="lengths"):
        metrics.vmaf_video(frames, frames[:-1])


def test_vmaf_clear_error_without_libvmaf(monkeypatch):
    monkeypatch.setattr(metrics, "_libvmaf_problem", lambda: "ffmpeg at /x was built without libvmaf")
    img = natural_image(16, 16)
    with pytest.raises(RuntimeError, match="without libvmaf"):
        metrics.vmaf(img, img)
    assert metrics.available_metrics()["vmaf"].startswith("unavailable: ")


# ------------------------------------------------------------------ log-spectrum error


def test_log_spectrum_error_zero_for_identical():
    img = natural_image(64, 80)
    assert metrics.log_spectrum_error(img, img) == 0.0


def test_log_spectrum_error_blur_worse_than_noise_at_equal_psnr():
    ref = natural_image(128, 128, seed=1)
    blur = blurred(ref, 1.0)
    target = metrics.psnr(ref, blur)
    noise = np.random.default_rng(0).normal(size=ref.shape)
    lo, hi = 0.0, 64.0  # bisect the noise level to the blur's PSNR
    for _ in range(30):
        noisy = np.clip(np.rint(ref + (lo + hi) / 2 * noise), 0, 255).astype(np.uint8)
        lo, hi = ((lo + hi) / 2, hi) if metrics.psnr(ref, noisy) > target else (lo, (lo + hi) / 2)
    assert metrics.psnr(ref, noisy) == pytest.approx(target, abs=0.05)
    assert metrics.log_spectrum_error(ref, blur) > 5 * metrics.log_spectrum_error(ref, noisy)
    assert metrics.log_spectrum_error(ref, blurred(ref, 2.0)) > metrics.log_spectrum_error(ref, blur)


# ------------------------------------------------------------------ Bjøntegaard

# Published example data of the FAU-LMS `bjontegaard` package (README / example_usage.py,
# x265 presets; rate in kbit/s, PSNR in dB). The README prints no result; the expected
# values are what bjontegaard 1.3.0 returns with method="pchip" (whose authors report it
# matches the JVET CTC Excel sheet to 10 decimals), computed once outside this repo.
FAU_ANCHOR = ([9487.76, 4593.60, 2486.44, 1358.24], [40.037, 38.615, 36.845, 34.851])
FAU_TEST = ([9787.80, 4469.00, 2451.52, 1356.24], [40.121, 38.651, 36.970, 34.987])
FAU_HIGH_ANCHOR = ([82472.76, 26875.24, 9487.76, 4593.6], [43.825, 41.404, 40.037, 38.615])
FAU_HIGH_TEST = ([99896.96, 33952.04, 9787.8, 4469.0], [44.731, 41.875, 40.121, 38.651])


def test_bd_rate_published_example():
    assert rd.bd_rate(*FAU_ANCHOR, *FAU_TEST) == pytest.approx(-4.417485350589045, abs=1e-9)
    assert rd.bd_metric(*FAU_ANCHOR, *FAU_TEST) == pytest.approx(0.11969278542479489, abs=1e-9)
    assert rd.bd_rate(*FAU_HIGH_ANCHOR, *FAU_HIGH_TEST) == pytest.approx(-4.47218200276197, abs=1e-9)
    assert rd.bd_metric(*FAU_HIGH_ANCHOR, *FAU_HIGH_TEST) == pytest.approx(0.08887484704747745, abs=1e-9)


def test_bd_rate_half_the_rate_is_minus_50_percent():
    rates, psnrs = FAU_ANCHOR
    assert rd.bd_rate(rates, psnrs, [r * 0.5 for r in rates], psnrs) == pytest.approx(-50.0, abs=1e-9)
    assert rd.bd_rate(rates, psnrs, rates, psnrs) == pytest.approx(0.0, abs=1e-12)
    assert rd.bd_rate(rates[::-1], psnrs[::-1], rates, psnrs) == pytest.approx(0.0, abs=1e-12)  # any order
    # point counts may differ: on a curve linear in (metric, log rate) PCHIP is exact
    line_metric = [30.0, 32.0, 34.0, 36.0]
    line_rate = [10 ** (m / 10) for m in line_metric]
    doubled = rd.bd_rate(line_rate, line_metric, [2 * line_rate[0], 2 * line_rate[3]], [30.0, 36.0])
    assert doubled == pytest.approx(100.0, abs=1e-9)


def test_bd_metric_constant_shift():
    rates, psnrs = FAU_ANCHOR
    assert rd.bd_metric(rates, psnrs, rates, [p + 0.5 for p in psnrs]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    "test_curve, message",
    [
        (([1000.0], [35.0]), "at least 2"),
        (([100.0, 200.0], [20.0, 21.0]), "do not overlap"),
        (([1000.0, 2000.0, 4000.0], [35.0, 37.0, 36.0]), "increase strictly"),
        (([0.0, 2000.0], [35.0, 37.0]), "positive"),
        (([1000.0, 2000.0], [35.0, math.inf]), "finite"),
    ],
)
def test_bd_degenerate_inputs_raise(test_curve, message):
    with pytest.raises(ValueError, match=message):
        rd.bd_rate(*FAU_ANCHOR, *test_curve)
    with pytest.raises(ValueError):
        rd.bd_metric(*FAU_ANCHOR, *test_curve)


# ------------------------------------------------------------------ availability


def test_available_metrics_reports_every_metric_with_a_reason():
    status = metrics.available_metrics()
    assert {"psnr", "psnr_y", "ms_ssim", "vmaf", "log_spectrum_error", "lpips", "dists"} <= status.keys()
    for name, state in status.items():
        assert state == "available" or state.startswith(("available: ", "unavailable: ")), (name, state)


def test_lpips_without_its_weights_says_so():
    if metrics.available_metrics()["lpips"] == "available":
        pytest.skip("LPIPS is installed with its weights here")
    from ulbcodec.video import frame_distance

    img = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(metrics.MetricUnavailable, match="LPIPS unavailable: "):
        metrics.lpips(img, img)
    with pytest.raises(metrics.MetricUnavailable, match="LPIPS unavailable: "):
        frame_distance(img, img, "lpips")
