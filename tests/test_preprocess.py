"""Histogram equalisation against the formula by hand; in-plane rescaling keeps the world geometry."""

from __future__ import annotations

import numpy as np
import pytest

from slicefield.geometry import apply_affine, rigid_matrix
from slicefield.preprocess import histogram_equalize, quantise, rescale_slices
from slicefield.volume import Stack

# ---------------------------------------------------------------- histogram equalisation


def test_equalize_matches_hand_computation():
    # L = 4: quantise [0, 6] onto 0..3 with floor(3 x / 6 + 1/2): 0->0, 1->1 (0.5 rounds up), 2->1, 3->2, 6->3.
    img = np.array([[0.0, 1.0, 2.0], [3.0, 6.0, 6.0]])
    np.testing.assert_array_equal(quantise(img, levels=4), [[0, 1, 1], [2, 3, 3]])
    # Counts per level 1, 2, 1, 2 of n = 6; C = 1/6, 3/6, 4/6, 6/6;
    # T = floor(3 C + 1/2) = floor(1.0) = 1, floor(2.0) = 2, floor(2.5) = 2, floor(3.5) = 3.
    out = histogram_equalize(img, levels=4)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 2, 2], [2, 3, 3]])


def test_equalize_mask_defines_cdf_but_applies_everywhere():
    img = np.array([[0.0, 1.0, 2.0], [3.0, 6.0, 6.0]])
    mask = np.array([[True, False, False], [True, True, False]])
    # Masked levels 0, 2, 3 -> C = 1/3, 1/3, 2/3, 1 -> T = floor(3 C + 1/2) = 1, 1, 2, 3 (level 1 is unmasked).
    np.testing.assert_array_equal(histogram_equalize(img, levels=4, mask=mask), [[1, 1, 1], [2, 3, 3]])
    with pytest.raises(ValueError, match="empty"):
        histogram_equalize(img, levels=4, mask=np.zeros_like(mask))


def test_equalize_is_monotone_and_flat_on_random_3d():
    rng = np.random.default_rng(0)
    img = rng.gamma(2.0, 50.0, size=(32, 32, 32))  # skewed intensities
    out = histogram_equalize(img, levels=256)
    assert set(np.unique(out)) <= set(range(256))
    order = np.argsort(img.ravel(), kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # non-decreasing in the input
    # Roughly flat: each quarter of the output levels holds about a quarter of the voxels (the tolerance allows
    # for the discreteness of the 256 input levels, each holding up to ~3% of these voxels).
    quarters = np.histogram(out, bins=4, range=(-0.5, 255.5))[0] / out.size
    np.testing.assert_allclose(quarters, 0.25, atol=0.03)
    # The input is far from flat.
    raw = np.histogram(img, bins=4)[0] / img.size
    assert raw.max() > 0.6


# ---------------------------------------------------------------- rescale_slices


def smooth(xyz: np.ndarray) -> np.ndarray:
    """A smooth test field of world mm; its wavelengths (> 25 mm) span many pixels."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return np.sin(x / 6.0 + 0.3) * np.cos(y / 8.0) + 0.01 * z + 0.002 * x * y


@pytest.fixture
def oblique_stack() -> Stack:
    """4 parallel oblique slices, anisotropic pixels (1.0 x 1.5 mm), with the smooth field sampled at their pixels."""
    n, ni, nj = 4, 48, 40
    pose = rigid_matrix((20.0, -15.0, 35.0), (-12.0, 7.0, 3.0))
    poses = np.stack(
        [pose @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3.0 * s], [0, 0, 0, 1]]) for s in range(n)]
    )
    stack = Stack(np.zeros((n, ni, nj)), poses, spacing=(1.0, 1.5), thickness=3.0)
    data = np.stack([smooth(stack.pixel_world(s)) for s in range(n)]).astype(np.float32)
    return stack.with_data(data)


def fov_corners(stack: Stack) -> np.ndarray:
    """World mm of the 4 outer corners of every slice's field of view (pixel edges), ``(4 n, 3)``."""
    ni, nj = stack.data.shape[1:]
    dx, dy = stack.spacing
    xs = (-dx / 2, (ni - 0.5) * dx)
    ys = (-dy / 2, (nj - 0.5) * dy)
    pts = np.array([[x, y, 0.0] for x in xs for y in ys])
    return np.concatenate([apply_affine(m, pts) for m in stack.slice_to_world])


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_rescale_samples_the_field_at_new_pixel_centres(oblique_stack, factor):
    out = rescale_slices(oblique_stack, factor=factor)
    ni, nj = oblique_stack.data.shape[1:]
    assert out.data.shape == (4, round(ni * factor), round(nj * factor))
    assert out.spacing == pytest.approx((1.0 / factor, 1.5 / factor))
    np.testing.assert_allclose(fov_corners(out), fov_corners(oblique_stack), atol=1e-9)
    np.testing.assert_allclose(out.slice_to_world[:, :3, :3], oblique_stack.slice_to_world[:, :3, :3])
    assert out.thickness == oblique_stack.thickness
    # Away from the FOV edge (extrapolated there), values are the field at the new pixels' world positions.
    b = max(2, int(np.ceil(2 * factor)))
    for s in range(out.n_slices):
        truth = smooth(out.pixel_world(s))
        np.testing.assert_allclose(out.data[s, b:-b, b:-b], truth[b:-b, b:-b], atol=2e-3)
        assert np.max(np.abs(out.data[s] - truth)) < 0.1


def test_rescale_wrong_corner_convention_would_fail(oblique_stack):
    """The pixel-(0,0) shift matters: ignoring it misplaces the field by a quarter old pixel at factor 2."""
    out = rescale_slices(oblique_stack, factor=2.0)
    unshifted = out.slice_to_world.copy()
    unshifted[:, :3, 3] = oblique_stack.slice_to_world[:, :3, 3]
    wrong = out.with_data(out.data)
    wrong.slice_to_world = unshifted
    err_right = np.abs(out.data[0, 4:-4, 4:-4] - smooth(out.pixel_world(0))[4:-4, 4:-4]).max()
    err_wrong = np.abs(out.data[0, 4:-4, 4:-4] - smooth(wrong.pixel_world(0))[4:-4, 4:-4]).max()
    assert err_wrong > 10 * err_right


def test_rescale_to_spacing_keeps_fov_and_mask(oblique_stack):
    mask = np.zeros(oblique_stack.data.shape, dtype=bool)
    mask[:, 10:30, 5:25] = True
    stack = oblique_stack.with_data(oblique_stack.data)
    stack.mask = mask
    out = rescale_slices(stack, spacing=(0.5, 0.5))
    assert out.data.shape == (4, 96, 120)
    assert out.spacing == pytest.approx((0.5, 0.5))
    np.testing.assert_allclose(fov_corners(out), fov_corners(stack), atol=1e-9)
    assert out.mask is not None and out.mask.shape == out.data.shape
    # Each old mask pixel becomes a 2 x 3 block of new pixels.
    np.testing.assert_array_equal(out.mask, np.repeat(np.repeat(mask, 2, axis=1), 3, axis=2))
    with pytest.raises(ValueError, match="exactly one"):
        rescale_slices(stack, factor=2.0, spacing=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        rescale_slices(stack)
