"""Line-integral (DRR) operators on a reconstruction grid, with their exact adjoints.

Two implementations of the same model (a ray's value = sum over samples every ``step`` mm of the grid's
trilinear interpolant, times ``step``):

- :class:`OrbitProjector`, the fast path, for a parallel-beam orbit about one axis: the grid is aligned with the
  orbit (in-plane axes = view 0's image right and viewing direction, one plane per detector row), so the 3D
  operator is a 2D one applied to every plane: a precomputed ``scipy.sparse`` matrix ``(views x W, n x n)``
  (bilinear weights) times the ``(n x n, planes)`` array of plane values.
- :class:`TorchRayProjector`, the plain twin, for any cameras (cone-beam included): samples the grid with
  ``torch.nn.functional.grid_sample`` along each ray; the adjoint is the autograd transpose of that linear map.

Both map grid values ``(nx, ny, nz)`` (intensity) to views ``(n_views, H, W)`` (intensity x mm).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import SlicefieldError
from .cameras import Camera

#: Samples per grid spacing along each ray of the projectors.
SAMPLES_PER_VOXEL = 2
#: Tolerance (mm, or cosine) for cameras to count as one parallel orbit.
ORBIT_TOL = 1e-4


@dataclass(frozen=True)
class OrbitGrid:
    """A reconstruction grid aligned with a parallel orbit.

    Voxel ``(i, j, k)`` -> world mm RAS: ``center + (i - c) p e1 + (j - c) p e2 + (k - cy) p down`` with
    ``c = (n - 1) / 2``, ``cy = (H - 1) / 2``; ``e1``, ``e2`` span the plane perpendicular to the axis (view 0's
    image right and viewing direction), ``down = -axis`` (view 0's image down). Plane ``k`` holds detector row ``k``.
    """

    center_mm: tuple[float, float, float]
    e1: tuple[float, float, float]
    e2: tuple[float, float, float]
    down: tuple[float, float, float]
    n: int
    planes: int
    pixel_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.n, self.planes)

    @property
    def affine(self) -> np.ndarray:
        """``(4, 4)`` voxel index -> world mm RAS."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.e1) * self.pixel_mm
        a[:3, 1] = np.asarray(self.e2) * self.pixel_mm
        a[:3, 2] = np.asarray(self.down) * self.pixel_mm
        c = (self.n - 1) / 2.0
        a[:3, 3] = np.asarray(self.center_mm) - a[:3, :3] @ np.array([c, c, (self.planes - 1) / 2.0])
        return a


def orbit_grid(cameras: Sequence[Camera]) -> OrbitGrid | None:
    """The orbit-aligned grid of parallel cameras that share isocentre, pixel size, detector and image-down
    direction (an orbit about one axis); None when the cameras are not such an orbit."""
    if not cameras or any(c.projection != "parallel" for c in cameras):
        return None
    c0 = cameras[0]
    p0 = c0.pose
    for c in cameras[1:]:
        p = c.pose
        if (
            (c.width, c.height) != (c0.width, c0.height)
            or abs(c.pixel_mm - c0.pixel_mm) > ORBIT_TOL * c0.pixel_mm
            or np.abs(p[:3, 3] - p0[:3, 3]).max() > ORBIT_TOL * c0.pixel_mm * c0.width
            or np.abs(p[:3, 1] - p0[:3, 1]).max() > ORBIT_TOL
        ):
            return None
    return OrbitGrid(
        center_mm=tuple(p0[:3, 3]),
        e1=tuple(p0[:3, 0]),
        e2=tuple(p0[:3, 2]),
        down=tuple(p0[:3, 1]),
        n=c0.width,
        planes=c0.height,
        pixel_mm=c0.pixel_mm,
    )


def _bilinear_rows(cam: Camera, grid: OrbitGrid, step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COO (row = detector column u, col = in-plane voxel i * n + j, weight mm) of one view's 2D projection."""
    p = cam.pose
    e1, e2 = np.asarray(grid.e1), np.asarray(grid.e2)
    xdir = np.array([p[:3, 0] @ e1, p[:3, 0] @ e2])  # image right, in (e1, e2) mm
    zdir = np.array([p[:3, 2] @ e1, p[:3, 2] @ e2])  # viewing direction
    n = grid.n
    c = (n - 1) / 2.0
    half = np.sqrt(2.0) * (c + 1.0) * grid.pixel_mm
    t = np.arange(-half, half, step) + 0.5 * step
    s = (np.arange(cam.width) - (cam.width - 1) / 2.0) * cam.pixel_mm
    pts = s[:, None, None] * xdir + t[None, :, None] * zdir  # (W, T, 2) mm
    g = pts / grid.pixel_mm + c  # fractional (i, j)
    i0 = np.floor(g).astype(np.int64)
    f = g - i0
    rows, cols, vals = [], [], []
    urow = np.broadcast_to(np.arange(cam.width)[:, None], g.shape[:2])
    for di in (0, 1):
        for dj in (0, 1):
            ii, jj = i0[..., 0] + di, i0[..., 1] + dj
            w = (f[..., 0] if di else 1 - f[..., 0]) * (f[..., 1] if dj else 1 - f[..., 1]) * step
            ok = (ii >= 0) & (ii < n) & (jj >= 0) & (jj < n) & (w > 0)
            rows.append(urow[ok])
            cols.append(ii[ok] * n + jj[ok])
            vals.append(w[ok])
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


class OrbitProjector:
    """The sparse fast path (see the module docstring). ``grid`` must come from :func:`orbit_grid` of cameras of
    the same orbit (same isocentre, pixel and detector as ``cameras``)."""

    def __init__(self, cameras: Sequence[Camera], grid: OrbitGrid, *, samples_per_voxel: int = SAMPLES_PER_VOXEL):
        full = orbit_grid([*cameras, _grid_camera(grid)])
        if full is None:
            raise SlicefieldError(
                "these cameras are not one parallel orbit with the grid's isocentre and detector",
                fix="use TorchRayProjector for general geometry",
            )
        self.grid = grid
        self.n_views = len(cameras)
        self.width = cameras[0].width
        self.height = cameras[0].height
        step = grid.pixel_mm / samples_per_voxel
        rows, cols, vals = [], [], []
        for k, cam in enumerate(cameras):
            r, c, v = _bilinear_rows(cam, grid, step)
            rows.append(r + k * cam.width)
            cols.append(c)
            vals.append(v)
        shape = (self.n_views * self.width, grid.n * grid.n)
        self.matrix = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape, dtype=np.float64
        )
        self.matrix_t = self.matrix.T.tocsr()

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Grid values ``(n, n, planes)`` -> views ``(n_views, H, W)``."""
        y = self.matrix @ x.reshape(self.grid.n * self.grid.n, self.grid.planes)  # (V * W, H)
        return y.reshape(self.n_views, self.width, self.height).transpose(0, 2, 1)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """Views ``(n_views, H, W)`` -> grid ``(n, n, planes)``: the exact transpose of :meth:`forward`."""
        r = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(self.n_views * self.width, self.height)
        return (self.matrix_t @ r).reshape(self.grid.shape)


def _grid_camera(grid: OrbitGrid) -> Camera:
    """View 0 of the grid's orbit (for the consistency check)."""
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = grid.e1, grid.down, grid.e2
    pose[:3, 3] = grid.center_mm
    return Camera(grid.n, grid.planes, grid.pixel_mm, tuple(pose.ravel()), "parallel")


class TorchRayProjector:
    """The plain matrix-free twin for any cameras (see the module docstring).

    shape, affine: the grid (voxel index -> world mm RAS). step_mm: sample spacing along rays (default half the
    smallest voxel). Values outside the grid are 0.
    """

    def __init__(
        self,
        cameras: Sequence[Camera],
        shape: tuple[int, int, int],
        affine: np.ndarray,
        *,
        step_mm: float | None = None,
    ):
        from ..geometry import voxel_spacing

        self.cameras = list(cameras)
        self.grid_shape = tuple(int(n) for n in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.step = float(step_mm) if step_mm else float(voxel_spacing(self.affine).min()) / SAMPLES_PER_VOXEL
        self._samples = [self._ray_samples(c) for c in self.cameras]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid_shape  # type: ignore[return-value]

    def _ray_samples(self, cam: Camera):
        """Normalised grid_sample coordinates ``(1, R, T, 1, 3)`` and segment lengths ``(R, T)`` of one view."""
        import torch

        from .render import clip_rays

        o, d = cam.rays()
        o, d = o.reshape(-1, 3), d.reshape(-1, 3)
        inv = np.linalg.inv(self.affine)
        ob = o @ inv[:3, :3].T + inv[:3, 3]
        db = d @ inv[:3, :3].T
        hi = np.array(self.grid_shape, dtype=np.float64) - 1.0
        t0, t1 = clip_rays(ob, db, np.zeros(3), hi)
        if cam.projection == "cone":
            t0 = np.maximum(t0, 0.0)
        hit = t1 > t0
        t0 = np.where(hit, t0, 0.0)
        t1 = np.where(hit, t1, 0.0)
        n = max(int(np.ceil((t1 - t0).max() / self.step)), 1)
        start = t0[:, None] + np.arange(n)[None] * self.step
        w = np.clip(t1[:, None] - start, 0.0, self.step)
        t = start + 0.5 * w
        pts = ob[:, None, :] + t[..., None] * db[:, None, :]
        g = (2.0 * pts / np.maximum(hi, 1.0) - 1.0)[..., ::-1]
        grid = torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32)).view(1, len(o), n, 1, 3)
        return grid, torch.from_numpy(w.astype(np.float32))

    def _forward_t(self, x):
        import torch
        import torch.nn.functional as F

        out = []
        for cam, (grid, w) in zip(self.cameras, self._samples, strict=True):
            v = F.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append((v.view(w.shape) * w).sum(dim=1).view(cam.height, cam.width))
        return torch.stack(out)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Grid values ``shape`` -> views ``(n_views, H, W)``."""
        import torch

        with torch.no_grad():
            return self._forward_t(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """Views ``(n_views, H, W)`` -> grid values: the exact transpose of :meth:`forward` (autograd)."""
        import torch

        x = torch.zeros(self.grid_shape, dtype=torch.float32, requires_grad=True)
        (g,) = torch.autograd.grad((self._forward_t(x) * torch.as_tensor(y, dtype=torch.float32)).sum(), x)
        return g.numpy().astype(np.float64)
