"""Slice-to-volume registration: the rigid pose of one slice (or a package of slices) that best predicts it.

**Fast twin of the forward model.** For registration every slice is predicted many times, so the exact operator
(:func:`~slicefield.acquisition.operator.acquire`) is replaced by a cheaper equivalent of the same PSF. A Gaussian
PSF with in-plane sigma ``s_in`` and through-plane sigma ``s_z`` (slice frame) equals an isotropic Gaussian of
sigma ``s_in`` followed by a 1D Gaussian of sigma ``sqrt(s_z^2 - s_in^2)`` along the slice normal. So the volume is
blurred once (isotropic, whatever the slice orientation) and each pixel integrates a few trilinear samples along
its normal (:func:`through_plane_profile`). A box PSF is approximated the same way (isotropic Gaussian of the
box's in-plane standard deviation, then a box along the normal). ``tests/test_motion.py`` compares this twin with
``acquire``.

**Optimisation.** Levenberg-Marquardt on six rigid parameters (rotation vector about the group's centre, then a
translation; world mm RAS), with the analytic Jacobian (the exact gradient of the trilinear interpolant of the
blurred volume).
Each slice has an intensity scale ``c`` (least squares, ``y ~ c * prediction``), so a slice that is uniformly
brighter or darker does not pull the pose. The cost is the mean squared residual over the selected pixels
(foreground, every ``stride``-th pixel). Coarse-to-fine comes from the caller (``blur_mm`` and ``stride``).

Every pose is ``slice_to_world`` (slice frame mm -> world mm RAS); every update is a world -> world rigid map
applied on the left.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..acquisition.psf import INPLANE_FWHM_PER_SPACING, TRUNCATE_SIGMAS, profile_weights
from ..geometry import FWHM_PER_SIGMA, apply_affine, voxel_spacing
from ..volume import Stack, Volume
from .transforms import rigid_about

#: Standard deviation of a box of unit width (1 / sqrt(12)).
BOX_SIGMA_PER_WIDTH = 1.0 / np.sqrt(12.0)
#: Levenberg-Marquardt iterations from each extra start before the best start is refined.
MULTISTART_ITERATIONS = 4
#: Zero voxels padded around a BlurredVolume (2: a point far outside reads two zero corners, value and gradient 0).
_PAD = 2
#: Bounds of the per-slice intensity scale fitted with the pose.
INTENSITY_SCALE_RANGE = (0.5, 2.0)
#: Through-plane sigma (mm) below which the profile is one sample at the slice plane.
MIN_THROUGH_PLANE_SIGMA_MM = 0.05


@dataclass(frozen=True)
class SliceRegistrationConfig:
    """Options of one round of slice-to-volume registration."""

    blur_mm: float = 0.0
    """Extra isotropic Gaussian smoothing (sigma, mm) of the volume and, in-plane, of the slices: coarse levels."""
    stride: int = 2
    """Use every stride-th pixel along each in-plane axis."""
    max_iterations: int = 25
    """Most Levenberg-Marquardt iterations per slice (or package)."""
    tolerance_deg: float = 0.005
    """Stop when an accepted step rotates less than this (degrees) ..."""
    tolerance_mm: float = 0.005
    """... and translates less than this (mm)."""
    max_step_deg: float = 3.0
    """Largest rotation of one step (degrees): a trust region for the first, coarse steps."""
    max_step_mm: float = 3.0
    """Largest translation of one step (mm)."""
    max_update_deg: float = 15.0
    """A slice whose fitted rotation exceeds this (degrees) in one round is left where it was (registration
    failed: too little anatomy, or an artefact)."""
    max_update_mm: float = 20.0
    """The same bound on the translation (mm)."""
    min_pixels: int = 100
    """Slices with fewer selected pixels are not registered (too little anatomy to fix a pose)."""
    intensity_scaling: bool = True
    """Fit a per-slice intensity scale with the pose."""
    starts_mm: tuple[float, ...] = ()
    """Extra starting points: offsets (mm) along the slice normal, each tried for a few iterations before the best
    one is refined (wider capture range through the plane, where thick slices see least)."""


@dataclass(frozen=True)
class ThroughPlaneProfile:
    """A stack's PSF split for the fast twin: isotropic blur, then weighted samples along the slice normal.

    isotropic_sigma_mm: sigma of the isotropic Gaussian applied to the volume (the in-plane PSF).
    offsets_mm: ``(K,)`` sample positions along the slice normal (slice-frame z, mm); weights: ``(K,)``, sum 1.
    """

    isotropic_sigma_mm: float
    offsets_mm: np.ndarray
    weights: np.ndarray


def through_plane_profile(stack: Stack, *, step_mm: float) -> ThroughPlaneProfile:
    """The fast-twin split of ``stack``'s PSF; ``step_mm``: largest spacing of the through-plane samples."""
    spacing = float(np.mean(stack.spacing))
    if stack.psf == "gaussian":
        s_in = INPLANE_FWHM_PER_SPACING * spacing / FWHM_PER_SIGMA
        s_z = float(np.sqrt(max((stack.thickness / FWHM_PER_SIGMA) ** 2 - s_in**2, 0.0)))
        if s_z < MIN_THROUGH_PLANE_SIGMA_MM:
            return ThroughPlaneProfile(s_in, np.zeros(1), np.ones(1))
        half = TRUNCATE_SIGMAS * s_z
        n = max(1, int(np.ceil(half / min(step_mm, s_z))))
        offsets = np.linspace(-half, half, 2 * n + 1)
        h = offsets[1] - offsets[0]
        w = profile_weights(np.zeros(1), offsets, h, kind="gaussian", width_mm=s_z * FWHM_PER_SIGMA)[0]
        return ThroughPlaneProfile(s_in, offsets, w)
    s_in = BOX_SIGMA_PER_WIDTH * spacing
    n = max(1, int(np.ceil(stack.thickness / step_mm)))
    offsets = (np.arange(n) - (n - 1) / 2.0) * (stack.thickness / n)
    return ThroughPlaneProfile(s_in, offsets, np.full(n, 1.0 / n))


class BlurredVolume:
    """A volume convolved with an isotropic Gaussian, sampled trilinearly (values and their exact gradient).

    volume: values on a grid (voxel -> world mm RAS). sigma_mm: the Gaussian's sigma in mm (0: no blur).
    Outside the grid the values are 0, as in the forward model (``map_coordinates(order=1, mode="grid-constant")``;
    the volume is padded with zeros so every lookup is a plain gather).
    """

    def __init__(self, volume: Volume, *, sigma_mm: float):
        spacing = voxel_spacing(volume.affine)
        data = np.asarray(volume.data, dtype=np.float32)
        if sigma_mm > 0:
            data = ndimage.gaussian_filter(data, sigma_mm / spacing, mode="constant", cval=0.0)
        padded = np.pad(data, _PAD)
        self._flat = padded.ravel()
        self._upper = np.array(padded.shape, dtype=np.float64) - 1.0 - 1e-6
        s = padded.shape
        self._strides = np.array([s[1] * s[2], s[2], 1], dtype=np.int64)
        sx, sy = self._strides[0], self._strides[1]
        self._corners = (0, 1, sy, sy + 1, sx, sx + 1, sx + sy, sx + sy + 1)  # (dx, dy, dz) in C order
        self.world_to_vox = np.linalg.inv(volume.affine)
        self.vox_to_world_grad = np.linalg.inv(volume.affine[:3, :3])  # row gradient (voxel) @ this = world

    def sample(self, points_mm: np.ndarray, *, gradient: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Values ``(N,)`` at world points ``(N, 3)`` mm RAS and, if asked, world gradients ``(N, 3)`` (per mm) of
        the trilinear interpolant."""
        c = np.clip(apply_affine(self.world_to_vox, points_mm) + _PAD, 0.0, self._upper)
        i0 = c.astype(np.int64)  # floor: c >= 0
        f = (c - i0).astype(np.float32)
        base = i0 @ self._strides
        v = [self._flat[base + o] for o in self._corners]
        fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
        dz = (v[1] - v[0], v[3] - v[2], v[5] - v[4], v[7] - v[6])
        v00, v01, v10, v11 = v[0] + fz * dz[0], v[2] + fz * dz[1], v[4] + fz * dz[2], v[6] + fz * dz[3]
        v0 = v00 + fy * (v01 - v00)
        v1 = v10 + fy * (v11 - v10)
        values = v0 + fx * (v1 - v0)
        if not gradient:
            return values, None
        gx = v1 - v0
        gy = (1 - fx) * (v01 - v00) + fx * (v11 - v10)
        gz = (1 - fx) * ((1 - fy) * dz[0] + fy * dz[1]) + fx * ((1 - fy) * dz[2] + fy * dz[3])
        return values, np.stack([gx, gy, gz], axis=1) @ self.vox_to_world_grad


def pixel_coordinates(stack: Stack, mask: np.ndarray, *, stride: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per slice: ``(ij (P, 2) int pixel indices, xy (P, 2) slice-frame mm)`` of the selected pixels.

    mask: bool ``(n, ni, nj)``; pixels on the ``stride`` lattice inside the mask are selected.
    """
    out = []
    sub = np.zeros(mask.shape[1:], dtype=bool)
    sub[::stride, ::stride] = True
    for s in range(stack.n_slices):
        ij = np.argwhere(mask[s] & sub)
        out.append((ij, ij * np.asarray(stack.spacing)))
    return out


def predict(
    sampler: BlurredVolume,
    pose: np.ndarray,
    xy_mm: np.ndarray,
    profile: ThroughPlaneProfile,
    *,
    center_mm: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted values ``(P,)`` of slice pixels at slice-frame ``xy_mm`` ``(P, 2)`` under ``pose`` (slice -> world).

    With ``center_mm`` (world mm RAS), also the Jacobian ``(P, 6)`` with respect to a small world -> world rigid
    update about that centre applied on the left of the pose: rotation vector (radians), then translation (mm).
    """
    base = xy_mm @ pose[:3, :2].T + pose[:3, 3]
    normal = pose[:3, 2]
    pts = base[None] + profile.offsets_mm[:, None, None] * normal[None, None]  # (K, P, 3)
    values, grad = sampler.sample(pts.reshape(-1, 3), gradient=center_mm is not None)
    k, p = pts.shape[:2]
    pred = profile.weights @ values.reshape(k, p)
    if center_mm is None:
        return pred, None
    grad = grad.reshape(k, p, 3)
    jt = np.einsum("k,kpc->pc", profile.weights, grad)
    lever = pts - np.asarray(center_mm)[None, None]
    jw = np.einsum("k,kpc->pc", profile.weights, np.cross(lever, grad))  # d/d omega of g . (omega x v) = v x g
    return pred, np.concatenate([jw, jt], axis=1)


@dataclass
class GroupFit:
    """Result of registering one group of slices (a slice, a package or a stack) that move together.

    delta: ``(4, 4)`` world -> world (mm RAS) update; new poses = ``delta @ poses``. scales: ``(n_g,)`` per-slice
    intensity scale (``y ~ scale * prediction``). cost: final mean squared residual. registered: False when the
    group had too few pixels, or its fit moved further than the configured bounds, and it was left where it was.
    """

    delta: np.ndarray
    scales: np.ndarray
    cost: float
    iterations: int
    registered: bool


def _levenberg_marquardt(
    evaluate: Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray, np.ndarray]],
    params: np.ndarray,
    config: SliceRegistrationConfig,
    *,
    iterations: int,
) -> tuple[np.ndarray, float, np.ndarray, int]:
    """Minimise ``evaluate(params) -> (cost, residuals, jacobian, scales)`` from ``params``; Marquardt damping,
    steps clamped to ``max_step_deg`` / ``max_step_mm``. Returns ``(params, cost, scales, iterations)``."""
    cost, r, jac, scales = evaluate(params)
    mu = 1e-3
    max_w, max_t = np.radians(config.max_step_deg), config.max_step_mm
    it = 0
    for it in range(1, iterations + 1):  # noqa: B007
        h = jac.T @ jac
        g = jac.T @ r
        accepted = False
        while mu < 1e8:
            step = np.linalg.solve(h + mu * np.diag(np.diag(h) + 1e-12), -g)
            step /= max(1.0, np.linalg.norm(step[:3]) / max_w, np.linalg.norm(step[3:]) / max_t)
            c_new, r_new, j_new, s_new = evaluate(params + step)
            if c_new < cost:
                params, cost, r, jac, scales = params + step, c_new, r_new, j_new, s_new
                mu = max(mu / 3.0, 1e-7)
                accepted = True
                break
            mu *= 4.0
        if not accepted:
            break
        small_turn = np.degrees(np.linalg.norm(step[:3])) < config.tolerance_deg
        if small_turn and np.linalg.norm(step[3:]) < config.tolerance_mm:
            break
    return params, cost, scales, it


def register_group(
    sampler: BlurredVolume,
    profile: ThroughPlaneProfile,
    poses: np.ndarray,
    xy_mm: list[np.ndarray],
    values: list[np.ndarray],
    *,
    config: SliceRegistrationConfig = SliceRegistrationConfig(),
) -> GroupFit:
    """Register slices that move together to a (blurred) volume by Levenberg-Marquardt.

    poses: ``(n_g, 4, 4)`` current slice -> world mm RAS poses. xy_mm: per slice ``(P_s, 2)`` slice-frame mm of the
    selected pixels; values: per slice ``(P_s,)`` their measured values (already blurred like the level).
    """
    n_g = len(poses)
    total = sum(len(v) for v in values)
    if total < config.min_pixels:
        return GroupFit(np.eye(4), np.ones(n_g), float("nan"), 0, False)
    world = np.concatenate([xy @ p[:3, :2].T + p[:3, 3] for xy, p in zip(xy_mm, poses, strict=True)])
    center = world.mean(axis=0)

    def evaluate(params: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        delta = rigid_about(params[:3], params[3:], center)
        moved_center = apply_affine(delta, center)
        rs, js, scales = [], [], np.ones(n_g)
        for s in range(n_g):
            if len(values[s]) == 0:
                continue
            pred, jac = predict(sampler, delta @ poses[s], xy_mm[s], profile, center_mm=moved_center)
            c = 1.0
            if config.intensity_scaling:
                pp = float(pred @ pred)
                c = float(np.clip(float(pred @ values[s]) / pp, *INTENSITY_SCALE_RANGE)) if pp > 0 else 1.0
            scales[s] = c
            rs.append(c * pred - values[s])
            js.append(c * jac)
        r = np.concatenate(rs)
        return float(r @ r) / total, r, np.concatenate(js), scales

    normal = poses[:, :3, 2].mean(axis=0)
    normal /= np.linalg.norm(normal)
    starts = [np.zeros(6)] + [np.r_[0.0, 0.0, 0.0, o * normal] for o in config.starts_mm if o != 0]
    if len(starts) > 1:  # a few LM steps from each start along the normal, then go on from the best
        trials = [_levenberg_marquardt(evaluate, p0, config, iterations=MULTISTART_ITERATIONS) for p0 in starts]
        best = min(trials, key=lambda t: t[1])
        params, cost, scales, it = _levenberg_marquardt(evaluate, best[0], config, iterations=config.max_iterations)
        it += MULTISTART_ITERATIONS * len(starts)
    else:
        params, cost, scales, it = _levenberg_marquardt(evaluate, starts[0], config, iterations=config.max_iterations)
    if np.degrees(np.linalg.norm(params[:3])) > config.max_update_deg or np.linalg.norm(params[3:]) > (
        config.max_update_mm
    ):
        return GroupFit(np.eye(4), scales, cost, it, False)
    return GroupFit(rigid_about(params[:3], params[3:], center), scales, cost, it, True)
