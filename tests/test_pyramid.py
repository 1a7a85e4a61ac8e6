"""The multiresolution trilinear field (5/3 lifting): exact inverse, the layout the decoder relies on, band gains,
and the coarse level read back as trilinear interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slicefield import pyramid

SHAPES = [(17, 12, 9), (2, 16, 7), (1, 9, 6), (3, 2, 5), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_undoes_forward_and_layout_matches(shape):
    x = np.random.default_rng(0).normal(size=shape)
    coarse, details = pyramid.forward(x, levels=4)
    np.testing.assert_allclose(pyramid.inverse(coarse, details), x, atol=1e-12)
    coarse_shape, layout = pyramid.layout(shape, levels=4)
    assert coarse.shape == coarse_shape
    assert [[(n, b.shape) for n, b in level.items()] for level in details] == layout
    assert coarse.size + sum(b.size for level in details for b in level.values()) == x.size  # critically sampled


@pytest.mark.parametrize("shape", [(19, 14, 11), (2, 16, 7)])
def test_band_gains_are_the_squared_norms_of_single_coefficients(shape):
    coarse, details = pyramid.forward(np.zeros(shape), levels=3)
    gains, coarse_gain = pyramid.band_gains(shape, [list(level) for level in details])
    for level, level_gains in zip(details, gains, strict=True):
        for name, band in level.items():
            mid = tuple(n // 2 for n in band.shape)
            band[mid] = 1.0
            assert np.sum(pyramid.inverse(coarse, details) ** 2) == pytest.approx(level_gains[name], rel=1e-9)
            band[mid] = 0.0
    mid = tuple(n // 2 for n in coarse.shape)
    coarse[mid] = 1.0
    assert np.sum(pyramid.inverse(coarse, details) ** 2) == pytest.approx(coarse_gain, rel=1e-9)


def test_coarse_level_alone_is_the_trilinear_interpolation_of_the_coarse_grid():
    """Odd lengths 2m+1: the coarse samples sit on the even voxels, corner to corner (align_corners)."""
    shape = (17, 9, 13)
    x = np.random.default_rng(1).normal(size=shape)
    coarse, details = pyramid.forward(x, levels=2)
    zero = [{n: np.zeros_like(b) for n, b in level.items()} for level in details]
    read = pyramid.inverse(coarse, zero)
    ref = F.interpolate(torch.from_numpy(coarse)[None, None], size=shape, mode="trilinear", align_corners=True)
    np.testing.assert_allclose(read, ref[0, 0].numpy(), atol=1e-12)


def test_details_vanish_where_the_field_is_linear():
    ijk = np.indices((15, 11, 9), dtype=np.float64)
    x = 0.3 * ijk[0] - 1.2 * ijk[1] + 0.7 * ijk[2] + 4.0
    _, details = pyramid.forward(x, levels=2)
    interior = details[0]["HHH"][1:-1, 1:-1, 1:-1]
    assert np.abs(interior).max() < 1e-12
    assert max(np.abs(b[1:-1, 1:-1, 1:-1]).max() for b in details[0].values()) < 1e-12
