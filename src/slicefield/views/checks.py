"""Geometry checks before rendering or fitting views: each problem is one line naming the file, the problem, the fix.

- a volume whose voxels are metres (or whose cameras are in metres) rather than mm;
- a volume outside a camera's frustum (behind the source, or projecting off the detector entirely);
- a detector that does not cover the volume (truncated projections, which no reconstruction can undo).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SlicefieldError
from ..geometry import apply_affine
from ..volume import Volume
from .cameras import Camera

#: A voxel smaller than this (mm) is taken for a header written in metres (1 mm = 0.001 m).
MIN_VOXEL_MM = 0.02
#: A volume narrower than this many detector pixels is taken for a unit mix-up between volume and cameras.
MIN_EXTENT_PIXELS = 2.0
#: Slack (pixels) allowed at the detector's edge before a projection counts as truncated.
EDGE_SLACK_PIXELS = 0.5


def foreground_corners(volume: Volume) -> np.ndarray:
    """World mm RAS ``(8, 3)`` of the corners of the box of non-zero voxels (voxel edges, not centres); the whole
    grid when every voxel is zero."""
    nz = np.argwhere(volume.data != 0)
    if len(nz) == 0:
        lo, hi = np.zeros(3), np.array(volume.shape, dtype=np.float64) - 1.0
    else:
        lo, hi = nz.min(axis=0).astype(np.float64), nz.max(axis=0).astype(np.float64)
    lo, hi = lo - 0.5, hi + 0.5
    ijk = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    return apply_affine(volume.affine, ijk)


def check_volume_units(volume: Volume, *, path: str | Path | None = None) -> None:
    """Raise when the voxel size looks like metres (smaller than :data:`MIN_VOXEL_MM`)."""
    spacing = volume.spacing
    if spacing.min() < MIN_VOXEL_MM:
        raise SlicefieldError(
            f"voxel size {spacing.min():.4g} mm is implausibly small: the header looks like it is in metres, not mm",
            path=path,
            fix="rescale the affine to mm (multiply its first three columns by 1000) or fix the header's xyzt_units",
        )


def needed_fov_mm(cameras: Sequence[Camera], corners_mm: np.ndarray) -> float:
    """Smallest detector field of view at the isocentre (mm) that keeps ``corners_mm`` ``(N, 3)`` on every
    camera's detector (cameras with the same geometry apart from ``pixel_mm``)."""
    need = 0.0
    for cam in cameras:
        uv, _ = cam.project(corners_mm)
        cx, cy = cam.principal_point
        dev = np.abs(uv - np.array([cx, cy])).max()
        need = max(need, 2.0 * (dev + 0.5) * cam.pixel_mm)
    return need


def check_cameras(
    cameras: Sequence[Camera], corners_mm: np.ndarray, *, path: str | Path | None = None, what: str = "the volume"
) -> None:
    """Raise unless every camera sees all of the object whose corners are ``corners_mm`` ``(N, 3)`` world mm."""
    corners = np.asarray(corners_mm, dtype=np.float64)
    centre = corners.mean(axis=0)
    radius = float(np.linalg.norm(corners - centre, axis=1).max())
    for k, cam in enumerate(cameras):
        extent_px = 2.0 * radius / cam.pixel_mm
        if cam.projection == "cone":
            source = cam.pose[:3, 3]
            if np.linalg.norm(source - centre) <= radius:
                raise SlicefieldError(
                    f"view {k}: the X-ray source is {np.linalg.norm(source - centre):.3g} mm from the centre of "
                    f"{what}, inside it (radius {radius:.3g} mm); distances look like metres, not mm",
                    path=path,
                    fix=f"give source distances in mm, larger than {radius:.0f} (e.g. --distance 1000)",
                )
        if extent_px < MIN_EXTENT_PIXELS:
            raise SlicefieldError(
                f"view {k}: {what} is {2 * radius:.3g} mm across but a detector pixel is {cam.pixel_mm:.3g} mm "
                "(it would cover under 2 pixels): mm and metres are mixed up",
                path=path,
                fix="give the detector field of view in mm (--fov) and check the volume's header units",
            )
        uv, depth = cam.project(corners)
        if cam.projection == "cone" and (depth <= 0).all():
            raise SlicefieldError(
                f"view {k}: {what} is behind the camera (outside its frustum)",
                path=path,
                fix="point the orbit at the volume (--center) or check the camera poses",
            )
        lo = -0.5 - EDGE_SLACK_PIXELS
        hi_u = cam.width - 0.5 + EDGE_SLACK_PIXELS
        hi_v = cam.height - 0.5 + EDGE_SLACK_PIXELS
        umin, vmin = uv.min(axis=0)
        umax, vmax = uv.max(axis=0)
        if umax < lo or umin > hi_u or vmax < lo or vmin > hi_v:
            raise SlicefieldError(
                f"view {k}: {what} projects entirely off the detector (outside the camera frustum)",
                path=path,
                fix="centre the orbit on the volume (--center X,Y,Z in mm RAS) or check the volume's affine",
            )
        if cam.projection == "cone" and (depth <= 0).any():
            raise SlicefieldError(
                f"view {k}: the X-ray source is inside {what}'s box",
                path=path,
                fix=f"move the source further out (--distance > {radius:.0f} mm)",
            )
        if umin < lo or umax > hi_u or vmin < lo or vmax > hi_v:
            need = needed_fov_mm(cameras, corners)  # over the whole orbit, so the suggested --fov works
            raise SlicefieldError(
                f"view {k}: the detector ({cam.width * cam.pixel_mm:.1f} mm at the isocentre) does not cover "
                f"{what} (the orbit needs {need:.1f} mm); its projections would be truncated",
                path=path,
                fix=f"pass --fov {np.ceil(need):.0f} (or leave --fov out to fit it) or centre the orbit with --center",
            )
