"""Metrics against independent formulas and against scikit-image (test-only dependency).

Reference values come from scikit-image's ``skimage.metrics`` computed at test time (installed version),
with the settings stated in each test; the hand formulas are written out here, not imported.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from slicefield.metrics import (
    evaluate,
    foreground_mask,
    nrmse,
    otsu_threshold,
    psnr,
    ssim,
    ssim_map,
    ssim_window_size,
)

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float, **kw):
    return structural_similarity(
        a, b, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw
    )


@pytest.fixture
def pair3d() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((24, 26, 22)), 1.0) * 500.0 + 100.0
    b = a + 20.0 * rng.standard_normal(a.shape)
    return a, b


@pytest.fixture
def sphere_mask() -> np.ndarray:
    zz = np.indices((24, 26, 22)).astype(float)
    c = np.array([12.0, 13.0, 11.0])[:, None, None, None]
    return np.sqrt(((zz - c) ** 2).sum(0)) < 8.0


# ---------------------------------------------------------------- PSNR


def test_psnr_matches_hand_formula_and_skimage(pair3d):
    a, b = pair3d
    mse = np.sum((a - b) ** 2) / a.size
    expected = 10.0 * np.log10(700.0**2 / mse)
    got = psnr(a, b, data_range=700.0)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(peak_signal_noise_ratio(a, b, data_range=700.0), rel=1e-12)


def test_psnr_masked_uses_only_mask_voxels(pair3d, sphere_mask):
    a, b = pair3d
    b = b.copy()
    b[~sphere_mask] += 1000.0  # huge error outside the mask must not count
    diff = (a - b)[sphere_mask]
    expected = 10.0 * np.log10(700.0**2 / (diff @ diff / diff.size))
    assert psnr(a, b, data_range=700.0, mask=sphere_mask) == pytest.approx(expected, rel=1e-12)
    assert psnr(a, b, data_range=700.0) < expected - 10.0


def test_psnr_requires_data_range_keyword(pair3d):
    a, b = pair3d
    with pytest.raises(TypeError):
        psnr(a, b)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        psnr(a, b, 700.0)  # type: ignore[misc]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_psnr_rejects_bad_data_range(pair3d, bad):
    a, b = pair3d
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=bad)


def test_psnr_rejects_empty_mask_and_shape_mismatch(pair3d):
    a, b = pair3d
    with pytest.raises(ValueError, match="empty"):
        psnr(a, b, data_range=1.0, mask=np.zeros(a.shape, dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        psnr(a, b[:-1], data_range=1.0)


def test_psnr_identical_is_inf(pair3d):
    a, _ = pair3d
    assert psnr(a, a.copy(), data_range=1.0) == float("inf")


# ---------------------------------------------------------------- NRMSE


@pytest.mark.parametrize("normalization", ["euclidean", "min-max", "mean"])
def test_nrmse_matches_hand_formula_and_skimage(pair3d, normalization):
    a, b = pair3d
    rmse = np.sqrt(np.sum((a - b) ** 2) / a.size)
    denom = {
        "euclidean": np.sqrt(np.sum(a**2) / a.size),
        "min-max": a.max() - a.min(),
        "mean": a.sum() / a.size,
    }[normalization]
    got = nrmse(a, b, normalization=normalization)
    assert got == pytest.approx(rmse / denom, rel=1e-12)
    assert got == pytest.approx(normalized_root_mse(a, b, normalization=normalization), rel=1e-12)


def test_nrmse_euclidean_is_norm_ratio_on_mask(pair3d, sphere_mask):
    a, b = pair3d
    expected = np.linalg.norm((a - b)[sphere_mask]) / np.linalg.norm(a[sphere_mask])
    assert nrmse(a, b, mask=sphere_mask) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="normalization"):
        nrmse(a, b, normalization="max")  # type: ignore[arg-type]


# ---------------------------------------------------------------- SSIM


def test_ssim_matches_skimage_3d(pair3d):
    a, b = pair3d
    expected = skimage_ssim(a, b, 700.0)
    assert ssim(a, b, data_range=700.0) == pytest.approx(expected, abs=1e-4)
    assert 0.0 < expected < 0.99  # the pair is neither identical nor unrelated


def test_ssim_matches_skimage_2d_and_map():
    rng = np.random.default_rng(1)
    a = rng.random((40, 33))
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0.0, 1.0)
    expected, expected_map = skimage_ssim(a, b, 1.0, full=True)
    assert ssim(a, b, data_range=1.0) == pytest.approx(expected, abs=1e-4)
    got_map = ssim_map(a, b, data_range=1.0)
    assert got_map.shape == a.shape and got_map.dtype == np.float32
    np.testing.assert_allclose(got_map, expected_map, atol=1e-4)


def test_ssim_float32_with_large_offset_matches_float64_skimage():
    """Intensities far from 0 relative to their range stress float32 cancellation in the variances."""
    rng = np.random.default_rng(2)
    a = (ndimage.gaussian_filter(rng.random((30, 30, 30)), 1.0) * 1000.0 + 30000.0).astype(np.float32)
    b = (a + 30.0 * rng.standard_normal(a.shape)).astype(np.float32)
    expected = skimage_ssim(a.astype(np.float64), b.astype(np.float64), 1000.0)
    assert ssim(a, b, data_range=1000.0) == pytest.approx(expected, abs=1e-4)


def test_ssim_identical_is_one(pair3d):
    a, _ = pair3d
    assert ssim(a, a.copy(), data_range=700.0) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(ssim_map(a, a, data_range=700.0), 1.0, atol=1e-5)


def test_ssim_masked_is_mean_of_full_map_over_mask(pair3d, sphere_mask):
    a, b = pair3d
    _, full_map = skimage_ssim(a, b, 700.0, full=True)  # uncropped skimage map
    expected = full_map[sphere_mask].mean()
    assert ssim(a, b, data_range=700.0, mask=sphere_mask) == pytest.approx(expected, abs=1e-4)


def test_ssim_requires_data_range_and_window_fits(pair3d):
    a, b = pair3d
    with pytest.raises(TypeError):
        ssim(a, b)  # type: ignore[call-arg]
    assert ssim_window_size(1.5) == 11
    with pytest.raises(ValueError, match="window"):
        ssim(a[:8], b[:8], data_range=700.0)


# ---------------------------------------------------------------- foreground mask


def test_otsu_threshold_matches_skimage():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(10.0, 2.0, 5000), rng.normal(40.0, 5.0, 3000)])
    assert otsu_threshold(x) == pytest.approx(threshold_otsu(x), rel=1e-12)
    with pytest.raises(ValueError):
        otsu_threshold(np.ones(10))


def test_foreground_mask_recovers_noisy_sphere():
    rng = np.random.default_rng(4)
    shape = (40, 44, 36)
    zz = np.indices(shape).astype(float)
    c = np.array([20.0, 22.0, 18.0])[:, None, None, None]
    sphere = np.sqrt(((zz - c) ** 2).sum(0)) < 13.0
    img = np.abs(rng.normal(0.0, 8.0, shape))  # Rician-like background noise
    img[sphere] = rng.normal(100.0, 10.0, sphere.sum())
    img[18:23, 20:25, 16:21] = 5.0  # a dark cavity inside, to be filled
    img[2:4, 2:4, 2:4] = 100.0  # a bright speck outside, not the largest component
    mask = foreground_mask(img)
    assert mask.dtype == bool and mask.shape == shape
    dice = 2.0 * np.sum(mask & sphere) / (mask.sum() + sphere.sum())
    assert dice > 0.95
    assert mask[20, 22, 18]  # the cavity is filled
    assert not mask[2:4, 2:4, 2:4].any()
    assert ndimage.label(mask)[1] == 1
    np.testing.assert_array_equal(foreground_mask(img), mask)  # deterministic


def test_foreground_mask_on_real_head():
    img = np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32)
    mask = foreground_mask(img)
    assert mask.shape == img.shape
    assert ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))[1] == 1
    assert 0.3 < mask.mean() < 0.95
    assert img[mask].mean() > 1.5 * img[~mask].mean()


def test_foreground_mask_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        foreground_mask(np.arange(8.0).reshape(2, 2, 2), method="li")  # type: ignore[arg-type]


# ---------------------------------------------------------------- evaluate


def test_evaluate_defaults_and_masked_entries(pair3d, sphere_mask):
    a, b = pair3d
    rng_a = a.max() - a.min()
    no_mask = evaluate(a, b)
    assert set(no_mask) == {"psnr", "psnr_masked", "ssim", "ssim_masked", "nrmse", "nrmse_masked", "data_range"}
    assert no_mask["data_range"] == pytest.approx(rng_a)
    assert no_mask["psnr_masked"] is None and no_mask["ssim_masked"] is None and no_mask["nrmse_masked"] is None
    assert no_mask["psnr"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=rng_a), rel=1e-12)
    assert no_mask["ssim"] == pytest.approx(skimage_ssim(a, b, rng_a), abs=1e-4)
    assert no_mask["nrmse"] == pytest.approx(normalized_root_mse(a, b), rel=1e-12)

    masked = evaluate(a, b, mask=sphere_mask, data_range=500.0)
    assert masked["data_range"] == 500.0
    assert masked["psnr_masked"] == pytest.approx(psnr(a, b, data_range=500.0, mask=sphere_mask))
    assert masked["ssim_masked"] == pytest.approx(ssim(a, b, data_range=500.0, mask=sphere_mask), abs=1e-7)
    assert masked["nrmse_masked"] == pytest.approx(nrmse(a, b, mask=sphere_mask))


def test_noise_estimate_recovers_gaussian_sigma_on_smooth_slices():
    from slicefield.metrics import estimate_noise_sigma

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    smooth = 100 * np.sin(3 * xx) * np.cos(2 * yy) + 50 * xx * yy  # quadric-ish: Immerkaer's kernel ignores it
    for sigma in (0.5, 2.0, 5.0):
        slices = np.stack([smooth + rng.normal(0, sigma, smooth.shape) for _ in range(5)]).astype(np.float32)
        assert estimate_noise_sigma(slices) == pytest.approx(sigma, rel=0.1)
    assert estimate_noise_sigma(np.stack([smooth] * 3).astype(np.float32)) < 0.1  # no noise: near zero
