"""Acquisition physics: slice profiles, the forward operator and its adjoint, the plain twin, the simulator.

Every tolerance below is stated next to the assertion with its reason. Phantoms are tiny (at most ~40^3 voxels).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from slicefield.acquisition import operator, psf
from slicefield.acquisition.operator import StackOperator, acquire, slice_groups
from slicefield.acquisition.psf import INPLANE_FWHM_PER_SPACING, TRUNCATE_SIGMAS, profile_halfwidth, profile_weights
from slicefield.acquisition.simulate import (
    SimulationConfig,
    SimulationRecord,
    apply_simulation,
    parse_orientation,
    sample_simulation,
    simulate,
    stack_geometry,
)
from slicefield.errors import SlicefieldError
from slicefield.geometry import FWHM_PER_SIGMA, apply_affine, rigid_matrix, voxel_spacing, world_to_voxel
from slicefield.volume import Stack, Volume

# ---------------------------------------------------------------- slice profiles


def test_fwhm_per_sigma_constant():
    # Half maximum of exp(-x^2 / 2 s^2) is at x = s sqrt(2 ln 2); FWHM = 2 s sqrt(2 ln 2) = 2.35482 s.
    assert FWHM_PER_SIGMA == pytest.approx(2.3548200450309493, rel=1e-14)


@pytest.mark.parametrize("kind", ["gaussian", "box"])
def test_profile_rows_sum_to_one(kind):
    rng = np.random.default_rng(0)
    samples = np.arange(-12.0, 12.0, 0.4)
    centers = rng.uniform(-5.0, 5.0, 17)
    w = profile_weights(centers, samples, 0.4, kind=kind, width_mm=3.3)
    assert w.shape == (17, samples.size)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_gaussian_weights_match_erf_by_hand():
    # Independent formula: the bin [d - h/2, d + h/2] of N(0, s^2) has mass (erf((d + h/2)/(s sqrt2)) - erf(...)) / 2.
    fwhm, h, c = 2.5, 0.5, 0.2
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    samples = np.arange(-4.0, 4.01, h)
    raw = []
    cut = 3.0 * s  # the documented truncation: the density is integrated over [-3 sigma, 3 sigma] only
    for x in samples:
        d = x - c
        lo, hi = min(max(d - h / 2, -cut), cut), min(max(d + h / 2, -cut), cut)
        raw.append(0.5 * (math.erf(hi / (s * math.sqrt(2))) - math.erf(lo / (s * math.sqrt(2)))))
    expected = np.array(raw) / sum(raw)
    got = profile_weights(np.array([c]), samples, h, kind="gaussian", width_mm=fwhm)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("fwhm", "h", "offset"), [(4.0, 0.5, 0.0), (4.0, 1.0, 0.0), (2.0, 0.25, 0.1), (3.0, 1.0, 0.37)]
)
def test_gaussian_profile_variance_is_sigma2_plus_bin2_over_12(monkeypatch, fwhm, h, offset):
    # Integrating a density over bins of width h and putting each bin's mass at its centre adds the variance of
    # the rounding error, which is uniform on [-h/2, h/2]: h^2 / 12 (Sheppard's correction). For a Gaussian it is
    # exact up to terms ~ exp(-2 pi^2 s^2 / h^2), < 1e-20 here. So with the truncation pushed far out, the
    # weighted variance of the sample offsets is s^2 + h^2 / 12 to rounding.
    s = fwhm / FWHM_PER_SIGMA
    samples = np.arange(-40.0, 40.001, h)
    d = samples - offset
    monkeypatch.setattr(psf, "TRUNCATE_SIGMAS", 12.0)
    w = profile_weights(np.array([offset]), samples, h, kind="gaussian", width_mm=fwhm)[0]
    mean = float(w @ d)
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert float(w @ (d - mean) ** 2) == pytest.approx(s**2 + h**2 / 12.0, rel=1e-10)
    # The default cut at 3 sigma removes the tails: the variance drops, but never below that of a normal
    # truncated at exactly +-3 sigma, s^2 (1 - 2 a phi(a) / (2 Phi(a) - 1)) with a = 3 (= 0.97334 s^2).
    monkeypatch.undo()
    w = profile_weights(np.array([offset]), samples, h, kind="gaussian", width_mm=fwhm)[0]
    mean = float(w @ d)
    var = float(w @ (d - mean) ** 2)
    a = TRUNCATE_SIGMAS
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    truncated = s**2 * (1 - 2 * a * phi / math.erf(a / math.sqrt(2)))
    assert truncated <= var < s**2 + h**2 / 12.0
    assert abs(mean) < 0.01 * h  # tiny asymmetry only when the centre is off the sample lattice


def test_gaussian_truncation_at_truncate_sigmas():
    fwhm, h = 3.0, 0.1
    s = fwhm / FWHM_PER_SIGMA
    samples = np.arange(-10.0, 10.0001, h)
    w = profile_weights(np.array([0.0]), samples, h, kind="gaussian", width_mm=fwhm)[0]
    support = np.abs(samples[w > 0])
    # Bins whose centre is within 3 sigma + h/2 are kept, the rest are exactly 0.
    assert support.max() <= TRUNCATE_SIGMAS * s + h / 2 + 1e-12
    assert support.max() > TRUNCATE_SIGMAS * s - h / 2
    assert np.all(w[np.abs(samples) <= TRUNCATE_SIGMAS * s] > 0)
    assert profile_halfwidth("gaussian", fwhm) == pytest.approx(TRUNCATE_SIGMAS * s, rel=1e-14)
    assert profile_halfwidth("box", fwhm) == pytest.approx(fwhm / 2)


def test_box_weights_hand_computed():
    samples = np.array([-1.5, -0.5, 0.5, 1.5])
    # Box [-1.25, 1.25] on unit bins [-2,-1], [-1,0], [0,1], [1,2]: overlaps 0.25, 1, 1, 0.25 of 2.5.
    # Box centred at 0.3, [-0.95, 1.55]: overlaps 0, 0.95, 1, 0.55 of 2.5.
    w = profile_weights(np.array([0.0, 0.3]), samples, 1.0, kind="box", width_mm=2.5)
    np.testing.assert_allclose(w, [[0.1, 0.4, 0.4, 0.1], [0.0, 0.38, 0.4, 0.22]], rtol=0, atol=1e-15)


def test_profile_errors():
    with pytest.raises(ValueError, match="unknown profile kind"):
        profile_weights(np.zeros(1), np.zeros(3), 1.0, kind="sinc", width_mm=1.0)
    with pytest.raises(ValueError, match="no samples"):
        profile_weights(np.array([100.0]), np.arange(3.0), 1.0, kind="box", width_mm=1.0)


# ---------------------------------------------------------------- operator cases


def _grid(shape, affine) -> Volume:
    return Volume(np.zeros(shape, np.float32), affine)


def _ras_grid(shape=(14, 16, 12), origin=(-7.0, -9.0, -5.0)) -> Volume:
    a = np.eye(4)
    a[:3, 3] = origin
    return _grid(shape, a)


def _geometry(vol: Volume, orientation: str, *, inplane=1.0, thickness=3.0, gap=0.5, psf_kind="gaussian") -> Stack:
    return stack_geometry(
        vol, parse_orientation(orientation), inplane=inplane, thickness=thickness, gap=gap, psf=psf_kind, name="s"
    )


def _with_motion(stack: Stack, center, *, seed=0, deg=6.0, mm=1.5) -> Stack:
    """Each slice moved by its own rigid world transform (so each slice is its own group)."""
    rng = np.random.default_rng(seed)
    poses = np.array(
        [
            rigid_matrix(rng.uniform(-deg, deg, 3), rng.uniform(-mm, mm, 3), center_mm=center) @ m
            for m in stack.slice_to_world
        ]
    )
    return Stack(stack.data, poses, stack.spacing, stack.thickness, psf=stack.psf, name=stack.name)


def _lps_permuted_anisotropic() -> Volume:
    # Array axes -> world: axis 0 along -S (1.5 mm), axis 1 along -R (1.2 mm), axis 2 along +A (0.9 mm).
    a = np.array(
        [
            [0.0, -1.2, 0.0, 8.0],
            [0.0, 0.0, 0.9, -7.0],
            [-1.5, 0.0, 0.0, 9.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return _grid((10, 13, 17), a)


def make_case(name: str) -> tuple[Volume, Stack]:
    """A grid and a stack geometry for each situation the operator must handle."""
    if name == "axis-aligned":
        vol = _ras_grid()
        return vol, _geometry(vol, "axial")
    if name == "oblique":
        vol = _ras_grid()
        return vol, _geometry(vol, "coronal@12,-7,20")
    if name == "motion":
        vol = _ras_grid()
        return vol, _with_motion(_geometry(vol, "sagittal@4,0,-9"), vol.world_corners().mean(axis=0))
    if name == "box":
        vol = _ras_grid()
        return vol, _geometry(vol, "axial@-10,15,5", psf_kind="box")
    if name == "lps-permuted-anisotropic":
        vol = _lps_permuted_anisotropic()
        return vol, _geometry(vol, "sagittal@5,10,-15", inplane=1.1, thickness=2.5, gap=0.0)
    if name == "coarse-inplane-thin-slices":
        vol = _ras_grid()
        return vol, _geometry(vol, "axial@8,4,0", inplane=2.0, thickness=0.6, gap=0.4)
    if name == "box-motion-thin":
        vol = _ras_grid()
        stack = _geometry(vol, "coronal", inplane=1.7, thickness=0.7, gap=1.0, psf_kind="box")
        return vol, _with_motion(stack, vol.world_corners().mean(axis=0), seed=3)
    raise KeyError(name)


CASES = [
    "axis-aligned",
    "oblique",
    "motion",
    "box",
    "lps-permuted-anisotropic",
    "coarse-inplane-thin-slices",
    "box-motion-thin",
]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def test_cases_exercise_what_they_claim():
    vol, st = make_case("motion")
    assert len(slice_groups(st)) == st.n_slices  # every slice its own group
    vol, st = make_case("oblique")
    assert len(slice_groups(st)) == 1
    vol, st = make_case("coarse-inplane-thin-slices")
    op = StackOperator(st, vol.shape, vol.affine)
    g = op.groups[0]
    assert np.diff(g.fine_x)[0] == pytest.approx(1.0)  # 2 mm pixels sampled every 1 mm (oversampled x2)
    assert np.diff(g.fine_z)[0] == pytest.approx(0.3)  # through-plane step = thickness / 2 < grid spacing
    vol, _ = make_case("lps-permuted-anisotropic")
    np.testing.assert_allclose(voxel_spacing(vol.affine), [1.5, 1.2, 0.9])
    rot = vol.affine[:3, :3]
    assert not np.allclose(rot, np.diag(np.diag(rot)))  # axes permuted (not a diagonal affine)


# ---------------------------------------------------------------- adjoint and the plain twin


@pytest.mark.parametrize("case", CASES)
def test_adjoint_identity(case):
    # <A x, y> == <x, A^T y>: A^T is built as the product of the transposed factors, so only float32 rounding
    # separates the two sides; 1e-5 relative is ~100 float32 ulps on positive random vectors (no cancellation).
    vol, st = make_case(case)
    op = StackOperator(st, vol.shape, vol.affine)
    rng = np.random.default_rng(1)
    x = rng.random(vol.shape).astype(np.float32)
    y = rng.random(st.data.shape).astype(np.float32)
    ax = op.forward(x)
    aty = op.adjoint(y)
    assert ax.shape == st.data.shape and aty.shape == vol.shape
    lhs = float(np.vdot(ax.astype(np.float64), y))
    rhs = float(np.vdot(x.astype(np.float64), aty))
    assert lhs > 0
    assert lhs == pytest.approx(rhs, rel=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("step_mm", [None, 0.5])
def test_sparse_forward_matches_plain_acquire(case, step_mm):
    # The fast path (cached sparse trilinear matrix) and the plain twin (map_coordinates) use the same quadrature
    # plan; they differ only in float32 weights and the sampler's snapping of near-integer voxel coordinates.
    vol, st = make_case(case)
    rng = np.random.default_rng(2)
    x = (rng.random(vol.shape) + 0.5).astype(np.float32)
    fast = StackOperator(st, vol.shape, vol.affine, step_mm=step_mm).forward(x)
    plain = acquire(x, vol.affine, st, step_mm=step_mm)
    assert np.abs(plain).max() > 0.5
    assert _rel(fast, plain) < 1e-5


def test_moved_slices_fold_the_through_plane_quadrature_into_the_sampler(monkeypatch):
    # A slice moved on its own shares no fine plane with another slice, so Mz is folded into its sampler: one row
    # per in-plane point, the neighbouring planes' trilinear weights merged on shared voxels. Same operator, fewer
    # nonzeros. A motion-free stack shares planes between slices and is left as it was.
    vol, st = make_case("motion")
    folded = StackOperator(st, vol.shape, vol.affine)
    assert all(g.fine_shape[0] == len(g.slices) == 1 and g.mz.tolist() == [[1.0]] for g in folded.groups)
    with monkeypatch.context() as m:
        m.setattr(operator, "fold_through_plane", lambda g, sampler: (g, sampler))
        plain = StackOperator(st, vol.shape, vol.affine)
    assert all(g.fine_shape[0] > 1 for g in plain.groups)
    assert folded.nnz < 0.7 * plain.nnz  # measured 0.59 here (0.48 for a moved 4 mm stack on a 1 mm brain grid)
    rng = np.random.default_rng(4)
    x = rng.random(vol.shape).astype(np.float32)
    y = rng.random(st.data.shape).astype(np.float32)
    # float32 sums in another order: a few ulps
    assert _rel(folded.forward(x), plain.forward(x)) < 1e-5
    assert _rel(folded.adjoint(y), plain.adjoint(y)) < 1e-5
    vol, st = make_case("oblique")
    (g,) = StackOperator(st, vol.shape, vol.affine).groups
    assert g.fine_shape[0] > st.n_slices  # planes shared: not folded


# ---------------------------------------------------------------- physics of the forward model


def _support_mm(st: Stack, step: float) -> float:
    """Radius (mm) around a pixel centre beyond which its PSF (plus one sampling step) never reaches."""
    w_in = (INPLANE_FWHM_PER_SPACING if st.psf == "gaussian" else 1.0) * np.array(st.spacing)
    hx, hy = (profile_halfwidth(st.psf, w) + d for w, d in zip(w_in, st.spacing, strict=True))
    hz = profile_halfwidth(st.psf, st.thickness) + step
    return float(np.sqrt(hx**2 + hy**2 + hz**2))


def _interior_pixels(vol: Volume, st: Stack, margin_mm: float) -> np.ndarray:
    """Bool ``st.data.shape``: pixels whose centre is at least ``margin_mm`` (plus a voxel) inside the grid."""
    sp = voxel_spacing(vol.affine)
    lo = margin_mm / sp + 1.0
    hi = np.array(vol.shape) - 1 - lo
    out = np.zeros(st.data.shape, bool)
    for s in range(st.n_slices):
        v = world_to_voxel(vol.affine, st.pixel_world(s))
        out[s] = np.all((v >= lo) & (v <= hi), axis=-1)
    return out


def _enlarge(vol: Volume, pad: int) -> Volume:
    """The same voxel lattice with ``pad`` more voxels on every side (same world positions for old voxels)."""
    a = vol.affine.copy()
    a[:3, 3] = apply_affine(vol.affine, [-pad] * 3)
    return _grid(tuple(n + 2 * pad for n in vol.shape), a)


@pytest.mark.parametrize("case", CASES)
def test_constant_volume_gives_the_constant_inside(case):
    # Rows of every factor sum to 1 and trilinear interpolation of a constant is that constant, so a pixel whose
    # whole PSF lies inside the grid measures the constant exactly (float32 rounding: 1e-5 relative).
    vol0, st = make_case(case)
    vol = _enlarge(vol0, 8)  # room for a PSF around the stack's pixels
    c = 3.7
    x = np.full(vol.shape, c, np.float32)
    inside = _interior_pixels(vol, st, _support_mm(st, float(voxel_spacing(vol.affine).min())))
    assert inside.sum() >= 20
    for y in (StackOperator(st, vol.shape, vol.affine).forward(x), acquire(x, vol.affine, st)):
        np.testing.assert_allclose(y[inside], c, rtol=1e-5)
        assert np.all(y <= c * (1 + 1e-5)) and np.all(y >= 0)


@pytest.mark.parametrize("psf_kind", ["gaussian", "box"])
def test_slices_outside_the_volume_measure_zero(psf_kind):
    vol = _ras_grid()
    x = np.ones(vol.shape, np.float32)
    st = _geometry(vol, "axial@5,-3,0", psf_kind=psf_kind)
    top = vol.world_corners()[:, 2].max()
    poses = st.slice_to_world.copy()
    poses[:, 2, 3] += top - poses[:, 2, 3].min() + 12.0  # lowest slice 12 mm above the highest voxel centre
    far = Stack(st.data, poses, st.spacing, st.thickness, psf=psf_kind)
    assert np.all(StackOperator(far, vol.shape, vol.affine).forward(x) == 0.0)
    assert np.all(acquire(x, vol.affine, far) == 0.0)
    # and the same stack moved back onto the volume does see it
    assert acquire(x, vol.affine, st).max() > 0.5


@pytest.mark.parametrize("case", CASES)
def test_linear_ramp_is_sampled_at_the_pixel_centre(case):
    # f(p) = a . p + b (p world mm). Trilinear interpolation reproduces a linear function exactly, and a symmetric
    # PSF integrates it to its value at the centre. In-plane lattices are centred on every pixel, so only the
    # through-plane cut at 3 sigma (whole bins kept, see test_gaussian_profile_variance...) can be off-centre when a
    # slice is off the fine z lattice: bias below 0.01 bin (<= 0.01 mm here), i.e. < 0.01 |a| in value.
    vol0, st = make_case(case)
    vol = _enlarge(vol0, 8)
    a, b = np.array([0.3, -0.2, 0.5]), 2.0
    ijk = np.moveaxis(np.indices(vol.shape, dtype=np.float64), 0, -1)
    x = (apply_affine(vol.affine, ijk) @ a + b).astype(np.float32)
    inside = _interior_pixels(vol, st, _support_mm(st, float(voxel_spacing(vol.affine).min())))
    assert inside.sum() >= 20
    expected = np.stack([st.pixel_world(s) @ a + b for s in range(st.n_slices)])
    tol = 0.01 * np.linalg.norm(a) + 2e-5 * np.abs(expected).max()
    for y in (StackOperator(st, vol.shape, vol.affine).forward(x), acquire(x, vol.affine, st)):
        err = np.abs(y - expected)[inside]
        assert err.max() < tol, err.max()


def _half_max_crossings(z: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Outermost half-maximum crossings of a single-peaked profile, by linear interpolation."""
    half = values.max() / 2
    above = np.flatnonzero(values >= half)
    i0, i1 = above[0], above[-1]
    left = z[i0 - 1] + (half - values[i0 - 1]) * (z[i0] - z[i0 - 1]) / (values[i0] - values[i0 - 1])
    right = z[i1] + (half - values[i1]) * (z[i1 + 1] - z[i1]) / (values[i1 + 1] - values[i1])
    return float(left), float(right)


@pytest.mark.parametrize(("psf_kind", "thickness"), [("gaussian", 4.0), ("gaussian", 2.0), ("box", 4.0), ("box", 3.0)])
def test_point_source_through_plane_fwhm_is_the_thickness(psf_kind, thickness):
    # A single bright voxel at world (0, 0, 0) on a grid that is fine along z (0.25 mm) so that trilinear
    # interpolation (a 0.25 mm hat) and the quadrature bins (0.25 mm) barely widen the profile. Slices 0.05 mm
    # apart (gap = 0.05 - thickness, a heavy overlap) sweep through the point; the pixel over the point traces
    # the through-plane PSF. Expected FWHM: gaussian -> thickness widened by the 0.25 mm bin, FWHM_PER_SIGMA *
    # sqrt(s^2 + h^2/12) (+0.005 mm at 4 mm); box -> exactly the thickness (a box convolved with a narrower
    # symmetric kernel crosses half maximum at +-thickness/2). Tolerance 0.02 mm (the 0.05 mm sampling of the
    # profile is interpolated linearly).
    dz = 0.25
    nx, nz = 9, 81
    affine = np.diag([1.0, 1.0, dz, 1.0])
    affine[:3, 3] = [-(nx // 2), -(nx // 2), -(nz // 2) * dz]
    data = np.zeros((nx, nx, nz), np.float32)
    data[nx // 2, nx // 2, nz // 2] = 1.0
    z = np.arange(-6.0, 6.0001, 0.05)
    poses = np.tile(np.eye(4), (z.size, 1, 1))
    poses[:, :3, 3] = np.stack([np.full_like(z, -(nx // 2)), np.full_like(z, -(nx // 2)), z], axis=1)
    st = Stack(np.zeros((z.size, nx, nx), np.float32), poses, (1.0, 1.0), thickness, psf=psf_kind)
    assert st.slice_spacing == pytest.approx(0.05) and st.gap == pytest.approx(0.05 - thickness)
    profile = acquire(data, affine, st)[:, nx // 2, nx // 2]
    if psf_kind == "gaussian":
        s = thickness / FWHM_PER_SIGMA
        expected = FWHM_PER_SIGMA * math.sqrt(s**2 + dz**2 / 12)
    else:
        expected = thickness
    left, right = _half_max_crossings(z, profile)
    assert right - left == pytest.approx(expected, abs=0.02)
    assert (left + right) / 2 == pytest.approx(0.0, abs=0.01)  # centred where the slice passes through the point
    # the sparse twin measures the same profile
    fast = StackOperator(st, data.shape, affine).forward(data)[:, nx // 2, nx // 2]
    np.testing.assert_allclose(fast, profile, rtol=0, atol=1e-6 * profile.max())


# ---------------------------------------------------------------- stack geometry


@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal", "coronal@12,-7,20", "axial@30,0,-45"])
@pytest.mark.parametrize(("inplane", "thickness", "gap"), [(1.0, 4.0, 0.0), (1.3, 2.5, 0.7), (0.8, 3.0, -1.0)])
def test_stack_geometry_covers_the_field_of_view(orientation, inplane, thickness, gap):
    vol = _lps_permuted_anisotropic()
    frame = parse_orientation(orientation)
    np.testing.assert_allclose(frame.T @ frame, np.eye(3), atol=1e-12)
    st = stack_geometry(vol, frame, inplane=inplane, thickness=thickness, gap=gap, psf="gaussian", name="g")
    spacing = thickness + gap
    # every slice has the frame's orientation; slices are thickness + gap apart along the normal
    np.testing.assert_allclose(st.slice_to_world[:, :3, :3], np.broadcast_to(frame, (st.n_slices, 3, 3)))
    np.testing.assert_allclose(np.diff(st.slice_positions_mm()), spacing, atol=1e-9)
    assert st.slice_spacing == pytest.approx(spacing) and st.gap == pytest.approx(gap)
    assert st.spacing == (inplane, inplane) and st.thickness == thickness
    # in the stack frame, the pixel cells (half a pixel, half a slice spacing beyond the centres) contain every
    # voxel centre of the volume, and no pixel centre lies beyond the volume's extent (the grid is centred)
    origin = st.slice_to_world[0, :3, 3]
    local_vol = (vol.world_corners() - origin) @ frame
    local_st = (st.world_corners() - origin) @ frame
    half = np.array([inplane, inplane, spacing]) / 2
    lo_s, hi_s = local_st.min(axis=0), local_st.max(axis=0)
    lo_v, hi_v = local_vol.min(axis=0), local_vol.max(axis=0)
    assert np.all(lo_s - half <= lo_v + 1e-6) and np.all(hi_s + half >= hi_v - 1e-6)
    assert np.all(hi_s - lo_s <= hi_v - lo_v + 1e-6)
    np.testing.assert_allclose((lo_s + hi_s) / 2, (lo_v + hi_v) / 2, atol=1e-9)


def test_stack_geometry_rejects_nonpositive_spacing():
    with pytest.raises(SlicefieldError, match="must be > 0"):
        _geometry(_ras_grid(), "axial", thickness=2.0, gap=-2.0)


def test_nominal_affine_round_trip():
    vol = _lps_permuted_anisotropic()
    st = _geometry(vol, "coronal@12,-7,20", inplane=1.1, thickness=2.0, gap=0.5)
    st = st.with_data(np.random.default_rng(0).random(st.data.shape))
    aff = st.nominal_affine()
    # voxel (i, j, s) of the nominal grid is pixel (i, j) of slice s
    for s in (0, st.n_slices - 1):
        ij = np.moveaxis(np.indices(st.data.shape[1:], dtype=float), 0, -1)
        ijs = np.concatenate([ij, np.full(ij.shape[:-1] + (1,), float(s))], axis=-1)
        np.testing.assert_allclose(apply_affine(aff, ijs), st.pixel_world(s), atol=1e-9)
    # stack -> volume -> stack restores poses, spacing and data exactly
    back = Stack.from_volume(st.to_volume(), slice_axis=2, thickness=st.thickness)
    np.testing.assert_allclose(back.slice_to_world, st.slice_to_world, atol=1e-9)
    np.testing.assert_array_equal(back.data, st.data)
    assert back.spacing == pytest.approx(st.spacing) and back.thickness == st.thickness
    # a moved stack has no nominal grid
    moved = _with_motion(st, vol.world_corners().mean(axis=0))
    with pytest.raises(SlicefieldError, match="not a regular grid"):
        moved.nominal_affine()


# ---------------------------------------------------------------- simulation record and replay


def _small_volume(phantom: Volume, n: int = 24) -> Volume:
    sl = tuple(slice(8, 8 + n) for _ in range(3))
    a = phantom.affine.copy()
    a[:3, 3] = apply_affine(phantom.affine, [8, 8, 8])
    return Volume(phantom.data[sl], a)


MOTION_CONFIG = SimulationConfig(
    orientations=("axial", "coronal@12,-7,20"), thickness=3.0, gap=0.5, noise=0.02, motion_deg=4.0, motion_mm=1.5
)


def test_simulation_motion_is_recorded_and_replayed_bit_identically(phantom):
    vol = _small_volume(phantom)
    stacks, record = simulate(vol, MOTION_CONFIG)
    # the record survives JSON and replays to the very same arrays
    replayed = apply_simulation(vol, SimulationRecord.from_json(json.loads(json.dumps(record.to_json()))))
    again = apply_simulation(vol, record)
    for a, b, c in zip(stacks, replayed, again, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.data, c.data)
        np.testing.assert_array_equal(a.slice_to_world, b.slice_to_world)
    # the record's motion is rigid, within the configured ranges about the volume centre, and differs per slice
    center = vol.world_corners().mean(axis=0)
    for rec in record.stacks:
        m = np.asarray(rec.motion)
        rot = m[:, :3, :3]
        np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
        assert np.all(np.linalg.det(rot) > 0)
        shift_of_center = m[:, :3, :3] @ center + m[:, :3, 3] - center
        assert np.abs(shift_of_center).max() <= MOTION_CONFIG.motion_mm + 1e-9
        assert np.abs(np.diff(shift_of_center, axis=0)).max() > 0.1
    # returned stacks carry nominal poses; the values were acquired with motion @ nominal (replay by hand)
    noiseless = replace(MOTION_CONFIG, noise=0.0)
    stacks0, record0 = simulate(vol, noiseless)
    step = float(voxel_spacing(vol.affine).min()) / 2
    for st, rec in zip(stacks0, record0.stacks, strict=True):
        np.testing.assert_array_equal(st.slice_to_world, np.asarray(rec.slice_to_world))
        moved = Stack(st.data, np.asarray(rec.motion) @ st.slice_to_world, st.spacing, st.thickness, psf=st.psf)
        np.testing.assert_array_equal(acquire(vol.data, vol.affine, moved, step_mm=step), st.data)
        still = acquire(vol.data, vol.affine, st, step_mm=step)
        assert np.abs(still - st.data).max() > 0.05 * float(vol.data.max())  # motion did change the values


def test_simulation_seed_changes_motion_and_noise(phantom):
    vol = _small_volume(phantom)
    rec_a = sample_simulation(vol, MOTION_CONFIG)
    rec_b = sample_simulation(vol, replace(MOTION_CONFIG, seed=1))
    assert rec_a.stacks[0].shape == rec_b.stacks[0].shape
    assert not np.allclose(rec_a.stacks[0].motion, rec_b.stacks[0].motion)
    assert rec_a.stacks[0].noise_seed != rec_b.stacks[0].noise_seed
    a, b = apply_simulation(vol, rec_a), apply_simulation(vol, rec_b)
    assert not np.array_equal(a[0].data, b[0].data)
    # same seed, same record
    assert sample_simulation(vol, MOTION_CONFIG).to_json() == rec_a.to_json()
