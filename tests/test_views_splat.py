"""Tests for slicefield.views.splat: closed-form line integrals of 3D Gaussians (parallel and cone cameras).

Round trips against an independent Riemann sum along the rays, the separable fast path against the general one, and
the adjoints (<A x, y> = <x, A^T y>).
"""

from __future__ import annotations

import numpy as np
import pytest

from slicefield.errors import SlicefieldError
from slicefield.geometry import apply_affine
from slicefield.views.cameras import OrbitConfig, orbit
from slicefield.views.projector import orbit_grid
from slicefield.views.splat import TRUNCATE_SIGMA, GaussianViewOperator, OrbitLatticeOperator, line_integral_matrix

CENTRE = np.array([1.0, 2.0, 3.0])


def _cameras(projection: str, n_views: int = 6) -> list:
    cfg = OrbitConfig(n_views=n_views, step_deg=30.0, size=16, projection=projection, source_to_iso_mm=60.0,
                      source_to_detector_mm=90.0)  # fmt: skip
    return orbit(cfg, center_mm=CENTRE, fov_mm=20.0)


def _riemann(camera, mean: np.ndarray, cov: np.ndarray, step: float = 0.01) -> np.ndarray:
    """The line integral of exp(-1/2 q^T cov^-1 q) through every pixel, summed every ``step`` mm: ``(H, W)``."""
    o, d = camera.rays()
    t = np.arange(-80.0, 160.0, step) + 0.5 * step
    if camera.projection == "cone":
        t = t[t > 0]
    inv = np.linalg.inv(cov)
    out = np.zeros(o.shape[:2])
    for v in range(o.shape[0]):
        q = o[v, :, None, :] + t[None, :, None] * d[v, :, None, :] - mean
        out[v] = np.exp(-0.5 * np.einsum("wti,ij,wtj->wt", q, inv, q)).sum(axis=1) * step
    return out


@pytest.mark.parametrize("projection", ["parallel", "cone"])
def test_closed_form_matches_a_riemann_sum_along_the_rays(projection: str) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + 2.0 * np.eye(3)  # anisotropic, tilted, mm^2
    mean = CENTRE + np.array([0.5, 0.2, 0.3])
    for cam in _cameras(projection)[:3]:
        expected = _riemann(cam, mean, cov)
        exact = line_integral_matrix(cam, mean[None], cov[None], truncate=8.0).toarray().reshape(expected.shape)
        assert np.abs(exact - expected).max() < 1e-6 * expected.max()
        # the default window drops only the tail beyond TRUNCATE_SIGMA standard deviations
        cut = line_integral_matrix(cam, mean[None], cov[None]).toarray().reshape(expected.shape)
        assert np.abs(cut - expected).max() < np.exp(-0.5 * TRUNCATE_SIGMA**2) * expected.max()
        assert np.count_nonzero(cut) < np.count_nonzero(exact)


def test_orbit_lattice_fast_path_equals_the_general_operator() -> None:
    cams = _cameras("parallel")
    grid = orbit_grid(cams)
    rng = np.random.default_rng(1)
    amps = np.zeros(grid.shape)
    amps[3:13, 4:12, 2:14] = rng.random((10, 8, 12))
    fast = OrbitLatticeOperator(cams, grid, sigma_vox=0.6)
    means = apply_affine(grid.affine, np.argwhere(np.ones(grid.shape, bool)).astype(np.float64))
    general = GaussianViewOperator(cams, means, np.full(len(means), 0.6 * grid.pixel_mm))
    y = fast.forward(amps)
    assert y.shape == (len(cams), 16, 16)
    assert np.abs(y - general.forward(amps.ravel())).max() < 1e-12 * np.abs(y).max()
    # the held-out cameras of the same orbit (not view 0) on the training grid, as the views fit renders them
    assert np.allclose(OrbitLatticeOperator(cams[1:], grid, sigma_vox=0.6).forward(amps), y[1:], rtol=1e-12)


@pytest.mark.parametrize("which", ["lattice", "general"])
def test_adjoints(which: str) -> None:
    rng = np.random.default_rng(2)
    cams = _cameras("parallel" if which == "lattice" else "cone", n_views=4)
    if which == "lattice":
        grid = orbit_grid(cams)
        op, x = OrbitLatticeOperator(cams, grid, sigma_vox=0.5), rng.random(grid.shape)
    else:
        means = CENTRE + rng.uniform(-6, 6, size=(50, 3))
        op, x = GaussianViewOperator(cams, means, rng.uniform(0.5, 2.0, 50)), rng.random(50)
    y = rng.random((4, 16, 16))
    lhs, rhs = float(np.vdot(op.forward(x), y)), float(np.vdot(x, op.adjoint(y)))
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_bad_gaussians_and_geometry_are_one_clear_error() -> None:
    cams = _cameras("parallel")
    with pytest.raises(SlicefieldError, match="not positive definite"):
        line_integral_matrix(cams[0], CENTRE[None], np.zeros((1, 3, 3)))
    with pytest.raises(SlicefieldError, match="behind the cone camera's source"):
        cone = _cameras("cone")[0]
        line_integral_matrix(cone, cone.pose[:3, 3][None] - 10.0 * cone.pose[:3, 2], np.ones(1))
    with pytest.raises(SlicefieldError, match="not one parallel orbit"):
        OrbitLatticeOperator(_cameras("cone"), orbit_grid(cams), sigma_vox=0.5)
