"""Rigid transforms and affines.

Frames used throughout slicefield:

- **world**: millimetres, RAS+ (x towards the subject's Right, y Anterior, z Superior), as in NIfTI.
- **voxel**: integer-centred array indices ``(i, j, k)`` of a Volume; ``affine`` maps voxel -> world.
- **slice frame**: millimetres in a slice's own plane, ``(x, y, z)`` with ``x = i * dx``, ``y = j * dy``
  and ``z`` the offset along the slice normal; ``Stack.slice_to_world`` maps slice frame -> world.
"""

from __future__ import annotations

import numpy as np

#: FWHM of a Gaussian divided by its standard deviation, 2 * sqrt(2 * ln 2).
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points ``(..., 3)``; returns ``(..., 3)`` float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Voxel indices ``(..., 3)`` -> world mm RAS ``(..., 3)``."""
    return apply_affine(affine, ijk)


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """World mm RAS ``(..., 3)`` -> (fractional) voxel indices ``(..., 3)``."""
    return apply_affine(np.linalg.inv(affine), xyz)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis, ``(3,)``."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def direction_cosines(affine: np.ndarray) -> np.ndarray:
    """Unit columns of the affine's 3x3 part, ``(3, 3)``: world direction of each array axis."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / np.linalg.norm(a, axis=0, keepdims=True)


def orthogonality_error_deg(affine: np.ndarray) -> float:
    """Largest deviation from 90 degrees between the affine's axes (0 for an orthogonal grid)."""
    d = direction_cosines(affine)
    cos = np.abs(np.clip(d.T @ d - np.eye(3), -1.0, 1.0))
    return float(np.degrees(np.arcsin(cos.max())))


def rotation_matrix(angles_deg: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation from Euler angles in degrees about world x, then y, then z (R = Rz @ Ry @ Rx)."""
    ax, ay, az = np.radians(np.asarray(angles_deg, dtype=np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_angles(rotation: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rotation_matrix`: Euler angles in degrees ``(3,)``."""
    r = np.asarray(rotation, dtype=np.float64)
    ay = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    ax = np.arctan2(r[2, 1], r[2, 2])
    az = np.arctan2(r[1, 0], r[0, 0])
    return np.degrees([ax, ay, az])


def rigid_matrix(
    angles_deg: np.ndarray | tuple[float, float, float],
    translation_mm: np.ndarray | tuple[float, float, float],
    *,
    center_mm: np.ndarray | tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """4x4 world -> world rigid transform: rotate about ``center_mm`` (world mm), then translate."""
    rot = rotation_matrix(angles_deg)
    c = np.asarray(center_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle in degrees of a 3x3 rotation (geodesic distance from the identity)."""
    c = (np.trace(np.asarray(rotation)[:3, :3]) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def grid_affine(origin_mm: np.ndarray, spacing_mm: float | np.ndarray) -> np.ndarray:
    """RAS-aligned voxel -> world affine with voxel (0, 0, 0) centred at ``origin_mm``."""
    a = np.diag(np.append(np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)), 1.0))
    a[:3, 3] = origin_mm
    return a


def bounding_grid(
    corners_mm: np.ndarray, spacing_mm: float, *, margin_mm: float = 0.0
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS-aligned affine of the smallest grid of ``spacing_mm`` voxels covering world points ``(N, 3)``."""
    lo = corners_mm.min(axis=0) - margin_mm
    hi = corners_mm.max(axis=0) + margin_mm
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm - 1e-6).astype(int) + 1)
    return shape, grid_affine(lo, spacing_mm)
