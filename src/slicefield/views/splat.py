"""Closed-form line integrals (DRRs) of 3D Gaussians, with their exact adjoints.

A Gaussian of amplitude ``a`` (intensity), centre ``mu`` (world mm RAS) and covariance ``S`` (mm^2),
``g(x) = a exp(-1/2 (x - mu)^T S^-1 (x - mu))``, integrates along the whole ray ``x = o + t d`` (``|d| = 1``) to::

    a sqrt(2 pi / alpha) exp(-1/2 (gamma - beta^2 / alpha)),
    alpha = d^T S^-1 d,  beta = d^T S^-1 (mu - o),  gamma = (mu - o)^T S^-1 (mu - o)

(intensity x mm, the unit of :mod:`.projector`'s DRRs), exactly, for parallel and cone rays alike. For an isotropic
Gaussian (``S = s^2 I``) this is ``a sqrt(2 pi) s exp(-r^2 / (2 s^2))`` with ``r`` the distance from ``mu`` to the
ray; on a parallel detector ``r^2 = du^2 + dv^2`` (mm on the detector plane), so the footprint is separable.

Each Gaussian reaches the pixels (ray through the pixel centre, as the projectors sample) whose detector offset from
its projected centre is at most :data:`TRUNCATE_SIGMA` standard deviations along u and along v (a square window; the
std is the largest of the covariance, in pixels at the centre's depth). The renderers are linear in the amplitudes:

- :func:`line_integral_matrix`: any camera (parallel or cone) and any covariances -> a ``scipy.sparse`` matrix
  ``(H W, N)``; :class:`GaussianViewOperator` stacks them over cameras (the plain path);
- :class:`OrbitLatticeOperator`: the fast twin for a lattice of identical isotropic Gaussians, one per voxel of the
  orbit grid of a parallel orbit (:func:`~slicefield.views.projector.orbit_grid`): a 2D matrix in the plane of the
  orbit (one row per view and detector column) times a 1D Gaussian filter across the planes (detector rows).

A test checks the two against each other and against a fine Riemann sum along the rays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ..errors import SlicefieldError
from .cameras import Camera
from .projector import OrbitGrid, _grid_camera, orbit_grid

#: A Gaussian reaches the pixels within this many standard deviations along each detector axis (the dropped tail
#: of an isotropic Gaussian's footprint is below exp(-TRUNCATE_SIGMA^2 / 2) = 1.1e-2 of its peak).
TRUNCATE_SIGMA = 3.0
#: Gaussians per chunk while a matrix is built (bounds the temporary arrays).
CHUNK = 16384


def line_integral_matrix(
    camera: Camera, means_mm: np.ndarray, covariances_mm: np.ndarray, *, truncate: float = TRUNCATE_SIGMA
) -> sp.csr_matrix:
    """The closed-form line integrals (module docstring) of unit-amplitude Gaussians through the pixels of
    ``camera``: ``(H W, N)`` float64 (intensity x mm per unit amplitude; row ``v W + u``).

    means_mm: ``(N, 3)`` centres, world mm RAS. covariances_mm: ``(N, 3, 3)`` (mm^2, world RAS axes), or ``(N,)``
    standard deviations (mm) of isotropic Gaussians.
    """
    mu = np.asarray(means_mm, dtype=np.float64).reshape(-1, 3)
    cov = np.asarray(covariances_mm, dtype=np.float64)
    if cov.ndim == 1:
        cov = cov[:, None, None] ** 2 * np.eye(3)
    if cov.shape != (len(mu), 3, 3):
        raise ValueError(f"covariances must be (N, 3, 3) or (N,) for N = {len(mu)} centres, got {cov.shape}")
    eig = np.linalg.eigvalsh(cov)  # (N, 3) ascending, mm^2
    if not (eig > 0).all():
        raise SlicefieldError("a Gaussian's covariance is not positive definite", fix="check the Gaussians' scales")
    inv = np.linalg.inv(cov)
    std_max = np.sqrt(eig[:, -1])  # (N,) mm
    origins, dirs = camera.rays()  # (H, W, 3) world mm RAS
    uv, depth = camera.project(mu)
    # object-space pixel pitch at each centre's depth (cone: grows with the distance from the source)
    pitch = camera.pixel_mm * (depth / camera.source_to_iso_mm if camera.projection == "cone" else np.ones(len(mu)))
    if camera.projection == "cone" and not (depth > 0).all():
        raise SlicefieldError("a Gaussian lies behind the cone camera's source", fix="move the source further out")
    reach = truncate * std_max / pitch  # (N,) pixels
    rows, cols, vals = [], [], []
    for s in range(0, len(mu), CHUNK):
        sl = slice(s, s + CHUNK)
        r = int(np.ceil(reach[sl].max())) if len(reach[sl]) else 0
        off = np.arange(-r, r + 1)
        u = np.rint(uv[sl, 0])[:, None, None] + off[None, None, :]  # (n, 1, w)
        v = np.rint(uv[sl, 1])[:, None, None] + off[None, :, None]  # (n, w, 1)
        u, v = np.broadcast_arrays(u, v)
        ok = (
            (np.abs(u - uv[sl, 0, None, None]) <= reach[sl, None, None])
            & (np.abs(v - uv[sl, 1, None, None]) <= reach[sl, None, None])
            & (u >= 0)
            & (u < camera.width)
            & (v >= 0)
            & (v < camera.height)
        )
        g = np.broadcast_to(np.arange(s, min(s + CHUNK, len(mu)))[:, None, None], ok.shape)[ok]
        ui, vi = u[ok].astype(np.int64), v[ok].astype(np.int64)
        o, d = origins[vi, ui], dirs[vi, ui]  # (m, 3)
        q = mu[g] - o
        sd = np.einsum("mij,mj->mi", inv[g], d)
        alpha = np.einsum("mi,mi->m", d, sd)
        beta = np.einsum("mi,mi->m", q, sd)
        gamma = np.einsum("mi,mij,mj->m", q, inv[g], q)
        rows.append(vi * camera.width + ui)
        cols.append(g)
        vals.append(np.sqrt(2.0 * np.pi / alpha) * np.exp(-0.5 * np.maximum(gamma - beta * beta / alpha, 0.0)))
    if not rows:
        return sp.csr_matrix((camera.height * camera.width, len(mu)))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(camera.height * camera.width, len(mu)),
    )


class GaussianViewOperator:
    """Amplitudes ``(N,)`` (intensity) -> DRRs ``(n_views, H, W)`` (intensity x mm) of Gaussians with fixed centres
    and covariances (:func:`line_integral_matrix` per camera, stacked), and the exact adjoint."""

    def __init__(
        self,
        cameras: Sequence[Camera],
        means_mm: np.ndarray,
        covariances_mm: np.ndarray,
        *,
        truncate: float = TRUNCATE_SIGMA,
    ):
        if not cameras or len({(c.height, c.width) for c in cameras}) != 1:
            raise ValueError("cameras must be non-empty and share one detector size")
        self.n_views, self.height, self.width = len(cameras), cameras[0].height, cameras[0].width
        self.matrix = sp.vstack(
            [line_integral_matrix(c, means_mm, covariances_mm, truncate=truncate) for c in cameras], format="csr"
        )
        self.matrix_t = self.matrix.T.tocsr()

    def forward(self, amplitudes: np.ndarray) -> np.ndarray:
        return (self.matrix @ amplitudes).reshape(self.n_views, self.height, self.width)

    def adjoint(self, views: np.ndarray) -> np.ndarray:
        return self.matrix_t @ np.asarray(views).reshape(-1)


class OrbitLatticeOperator:
    """The fast twin of :class:`GaussianViewOperator` for one isotropic Gaussian of std ``sigma_vox`` voxels at every
    voxel of ``grid`` (amplitude grid ``grid.shape``, 0 where there is none), seen by ``cameras``, a parallel orbit
    whose :func:`~slicefield.views.projector.orbit_grid` is ``grid``: maps amplitudes ``grid.shape`` (intensity)
    to views ``(n_views, H, W)`` (intensity x mm), exactly the closed form of the module docstring (separable)."""

    def __init__(
        self, cameras: Sequence[Camera], grid: OrbitGrid, *, sigma_vox: float, truncate: float = TRUNCATE_SIGMA
    ):
        if not cameras or orbit_grid([*cameras, _grid_camera(grid)]) is None:
            raise SlicefieldError(
                "these cameras are not one parallel orbit on this grid",
                fix="use GaussianViewOperator for general geometry",
            )
        self.grid, self.n_views = grid, len(cameras)
        self.width, self.height = cameras[0].width, cameras[0].height
        s = sigma_vox * grid.pixel_mm  # mm
        n, c = grid.n, (grid.n - 1) / 2.0
        ij = (np.indices((n, n)).reshape(2, -1).T - c) * grid.pixel_mm  # in-plane centres, (e1, e2) mm
        e1, e2 = np.asarray(grid.e1), np.asarray(grid.e2)
        reach = truncate * sigma_vox  # pixels (the detector pitch is the grid's)
        r = int(np.ceil(reach))
        rows, cols, vals = [], [], []
        for k, cam in enumerate(cameras):
            right = cam.pose[:3, 0]
            u_c = ij @ np.array([right @ e1, right @ e2]) / grid.pixel_mm + (cam.width - 1) / 2.0  # (n^2,) pixels
            for du in range(-r, r + 1):
                u = np.rint(u_c) + du
                ok = (np.abs(u - u_c) <= reach) & (u >= 0) & (u < cam.width)
                rows.append(k * cam.width + u[ok].astype(np.int64))
                cols.append(np.flatnonzero(ok))
                vals.append(np.exp(-0.5 * ((u[ok] - u_c[ok]) / sigma_vox) ** 2))
        self.matrix = sp.csr_matrix(
            (np.sqrt(2.0 * np.pi) * s * np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(self.n_views * self.width, n * n),
        )
        self.matrix_t = self.matrix.T.tocsr()
        # plane k holds detector row k: the footprint across rows is a symmetric filter over whole rows
        taps = np.arange(-int(np.floor(reach)), int(np.floor(reach)) + 1)
        self.row_taps = np.exp(-0.5 * (taps / sigma_vox) ** 2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def _rows(self, y: np.ndarray) -> np.ndarray:
        """Correlate the last axis (planes / detector rows) with the row taps, zero outside (self-adjoint)."""
        r = len(self.row_taps) // 2
        out = self.row_taps[r] * y
        for t in range(1, r + 1):
            out[..., t:] += self.row_taps[r + t] * y[..., :-t]
            out[..., :-t] += self.row_taps[r - t] * y[..., t:]
        return out

    def forward(self, amplitudes: np.ndarray) -> np.ndarray:
        """Amplitudes ``(n, n, planes)`` -> views ``(n_views, H, W)``."""
        y = self._rows(self.matrix @ amplitudes.reshape(self.grid.n * self.grid.n, self.grid.planes))
        return y.reshape(self.n_views, self.width, self.height).transpose(0, 2, 1)

    def adjoint(self, views: np.ndarray) -> np.ndarray:
        """Views ``(n_views, H, W)`` -> amplitudes ``(n, n, planes)``: the exact transpose of :meth:`forward`."""
        r = np.ascontiguousarray(views.transpose(0, 2, 1)).reshape(self.n_views * self.width, self.height)
        return (self.matrix_t @ self._rows(r)).reshape(self.grid.shape)
