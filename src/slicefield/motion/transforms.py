"""Small rigid-transform helpers for motion correction (all world mm RAS, acting on the left of poses)."""

from __future__ import annotations

import numpy as np

from ..geometry import apply_affine, rotation_angle_deg, rotation_angles


def rotation_from_vector(omega_rad: np.ndarray) -> np.ndarray:
    """3x3 rotation of the rotation vector ``omega_rad`` ``(3,)`` (axis * angle in radians; Rodrigues)."""
    w = np.asarray(omega_rad, dtype=np.float64)
    theta = float(np.linalg.norm(w))
    k = np.array([[0.0, -w[2], w[1]], [w[2], 0.0, -w[0]], [-w[1], w[0], 0.0]])
    if theta < 1e-12:
        return np.eye(3) + k
    k /= theta
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def rigid_about(omega_rad: np.ndarray, translation_mm: np.ndarray, center_mm: np.ndarray) -> np.ndarray:
    """``(4, 4)`` world -> world (mm RAS): ``p -> c + R(omega) (p - c) + t``, a rotation about ``center_mm``."""
    rot = rotation_from_vector(omega_rad)
    c = np.asarray(center_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=np.float64)
    return m


def slice_center(spacing: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Slice-frame mm ``(3,)`` of the centre of a slice of ``shape`` ``(ni, nj)`` pixels of ``spacing`` mm."""
    return np.array([(shape[0] - 1) * spacing[0] / 2.0, (shape[1] - 1) * spacing[1] / 2.0, 0.0])


def pose_errors(
    reference_poses: np.ndarray, poses: np.ndarray, center_slice_mm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice distance between two sets of poses ``(n, 4, 4)`` (slice frame mm -> world mm RAS).

    Returns ``(angle_deg (n,), displacement_mm (n,))``: the angle of ``R_ref R^T`` and the world distance between
    the images of the slice centre ``center_slice_mm`` (slice-frame mm) under the two poses.
    """
    ref = np.asarray(reference_poses, dtype=np.float64)
    est = np.asarray(poses, dtype=np.float64)
    angles = np.array([rotation_angle_deg(a[:3, :3] @ b[:3, :3].T) for a, b in zip(ref, est, strict=True)])
    shift = np.array(
        [
            np.linalg.norm(apply_affine(a, center_slice_mm) - apply_affine(b, center_slice_mm))
            for a, b in zip(ref, est, strict=True)
        ]
    )
    return angles, shift


def describe(world_to_world: np.ndarray, center_world_mm: np.ndarray) -> dict[str, list[float] | float]:
    """A world -> world rigid transform in words: Euler angles (degrees about world x, y, z; R = Rz Ry Rx), the
    displacement (mm) of ``center_world_mm`` and its length, and the rotation angle (degrees)."""
    m = np.asarray(world_to_world, dtype=np.float64)
    c = np.asarray(center_world_mm, dtype=np.float64)
    shift = apply_affine(m, c) - c
    return {
        "angles_deg": [float(a) for a in rotation_angles(m[:3, :3])],
        "rotation_deg": rotation_angle_deg(m[:3, :3]),
        "shift_mm": [float(v) for v in shift],
        "displacement_mm": float(np.linalg.norm(shift)),
    }
