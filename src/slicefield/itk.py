"""Bridge between slicefield Volumes (world mm RAS) and SimpleITK images (physical mm LPS).

SimpleITK stores origin and direction in LPS and arrays in (z, y, x) order; these helpers do both flips so
that callers only ever see RAS affines.
"""

from __future__ import annotations

import numpy as np

from .geometry import direction_cosines, voxel_spacing
from .volume import Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """Array ``(X, Y, Z)`` + voxel->world RAS affine -> ``SimpleITK.Image`` with the same physical geometry."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(data, np.float32), (2, 1, 0))))
    img.SetSpacing([float(s) for s in voxel_spacing(affine)])
    img.SetOrigin([float(o) for o in _RAS_TO_LPS @ affine[:3, 3]])
    img.SetDirection([float(d) for d in (_RAS_TO_LPS @ direction_cosines(affine)).ravel()])
    return img


def from_sitk(img) -> Volume:
    """``SimpleITK.Image`` -> Volume with a RAS affine."""
    import SimpleITK as sitk

    data = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)).astype(np.float32)
    affine = np.eye(4)
    direction = _RAS_TO_LPS @ np.asarray(img.GetDirection()).reshape(3, 3)
    affine[:3, :3] = direction * np.asarray(img.GetSpacing())[None, :]
    affine[:3, 3] = _RAS_TO_LPS @ np.asarray(img.GetOrigin())
    return Volume(data, affine)


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    shape: tuple[int, int, int],
    target_affine: np.ndarray,
    interpolation: str = "bspline",
    default: float = 0.0,
) -> np.ndarray:
    """Resample an image (``data`` on ``affine``) onto another grid (``shape``, ``target_affine``), world RAS.

    interpolation: ``"bspline"`` (cubic B-spline), ``"linear"`` or ``"nearest"``. Points outside get ``default``.
    """
    import SimpleITK as sitk

    modes = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    ref = to_sitk(np.zeros(tuple(int(s) for s in shape)[::-1], np.float32).T, target_affine)
    out = sitk.Resample(to_sitk(data, affine), ref, sitk.Transform(), modes[interpolation], float(default))
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)).astype(np.float32)
