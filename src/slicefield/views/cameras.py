"""Cameras for rendering views of a volume: parallel-beam and cone-beam (pinhole) detectors on an orbit.

Frames (all positions in world mm RAS, see :mod:`slicefield.geometry`):

- **camera frame**: right-handed, ``x`` along increasing detector column ``u`` (image right), ``y`` along
  increasing detector row ``v`` (image down), ``z`` the viewing direction (source -> detector). Its origin is the
  X-ray source (pinhole) for a cone-beam camera and the isocentre (the orbit centre) for a parallel-beam camera.
- **pixel**: ``(u, v)`` = (column, row) indices, integer at pixel centres; image arrays are ``(H, W)`` = ``[v, u]``.

``camera_to_world`` (4x4) maps camera-frame mm to world mm; its columns are the world directions of ``x``, ``y``,
``z`` and the origin. A cone-beam camera's intrinsics are the pinhole matrix ``K`` (pixels), with focal length
``source_to_detector_mm / detector_pixel_mm``; a parallel-beam camera's are its pixel size at the isocentre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import SlicefieldError

Projection = Literal["parallel", "cone"]
PROJECTIONS: tuple[str, ...] = ("parallel", "cone")

#: Named world axes (RAS+): the unit vector each letter points along.
AXIS_VECTORS: dict[str, tuple[float, float, float]] = {
    "R": (1.0, 0.0, 0.0),
    "L": (-1.0, 0.0, 0.0),
    "A": (0.0, 1.0, 0.0),
    "P": (0.0, -1.0, 0.0),
    "S": (0.0, 0.0, 1.0),
    "I": (0.0, 0.0, -1.0),
}
#: Where view 0's source sits, in order of preference: the first of these world directions not parallel to the
#: orbit axis (anterior, so about S view 0 looks at the face; superior for an orbit about A or P).
VIEW0_SIDES: tuple[tuple[float, float, float], ...] = ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0))


@dataclass(frozen=True)
class Camera:
    """One detector and its pose.

    width, height: detector size in pixels (image ``(H, W)``).
    pixel_mm: pixel pitch in mm *at the isocentre* (the orbit centre): for a parallel camera the detector pitch,
        for a cone camera the detector pitch divided by the magnification ``source_to_detector / source_to_iso``.
    camera_to_world: ``(4, 4)`` float64 camera frame -> world mm RAS (see the module docstring), row-major tuple.
    projection: ``"parallel"`` (rays along ``z`` through each pixel) or ``"cone"`` (rays from the source).
    source_to_iso_mm: source to isocentre distance (mm); for a parallel camera, how far before the isocentre
        ray marching may start (unused, the rays are clipped to the volume).
    source_to_detector_mm: source to detector distance (mm), cone only (the magnification's numerator).
    """

    width: int
    height: int
    pixel_mm: float
    camera_to_world: tuple[float, ...]
    projection: Projection = "parallel"
    source_to_iso_mm: float = 1000.0
    source_to_detector_mm: float = 1500.0

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.width < 1 or self.height < 1 or not self.pixel_mm > 0:
            raise ValueError("camera needs width, height >= 1 and pixel_mm > 0")
        if len(self.camera_to_world) != 16:
            raise ValueError("camera_to_world must hold 16 numbers (a 4x4 matrix, row-major)")
        if self.projection == "cone" and not (0 < self.source_to_iso_mm < self.source_to_detector_mm):
            raise ValueError("a cone camera needs 0 < source_to_iso_mm < source_to_detector_mm")

    @property
    def pose(self) -> np.ndarray:
        """``(4, 4)`` camera -> world mm RAS."""
        return np.asarray(self.camera_to_world, dtype=np.float64).reshape(4, 4)

    @property
    def magnification(self) -> float:
        """Detector size / object size at the isocentre (1 for parallel)."""
        return self.source_to_detector_mm / self.source_to_iso_mm if self.projection == "cone" else 1.0

    @property
    def detector_pixel_mm(self) -> float:
        """Pixel pitch on the detector plane (mm)."""
        return self.pixel_mm * self.magnification

    @property
    def principal_point(self) -> tuple[float, float]:
        """``(cx, cy)``: pixel coordinates of the detector centre (where the central ray hits)."""
        return (self.width - 1) / 2.0, (self.height - 1) / 2.0

    @property
    def isocenter_mm(self) -> np.ndarray:
        """World mm of the isocentre, ``(3,)``: on the central ray, ``source_to_iso_mm`` from a cone source."""
        pose = self.pose
        if self.projection == "parallel":
            return pose[:3, 3].copy()
        return pose[:3, 3] + self.source_to_iso_mm * pose[:3, 2]

    def intrinsics(self) -> np.ndarray:
        """``(3, 3)``: for a cone camera the pinhole matrix K (camera-frame mm -> homogeneous pixels); for a parallel
        camera the orthographic map ``[u, v, 1] = M @ [x, y, 1]`` from camera-frame mm."""
        cx, cy = self.principal_point
        if self.projection == "cone":
            f = self.source_to_detector_mm / self.detector_pixel_mm
            return np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
        s = 1.0 / self.pixel_mm
        return np.array([[s, 0.0, cx], [0.0, s, cy], [0.0, 0.0, 1.0]])

    def project(self, xyz_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World mm RAS ``(N, 3)`` -> pixel coordinates ``(N, 2)`` (u, v) and depth ``(N,)`` mm along ``z``
        (from the source for cone; signed, from the isocentre plane, for parallel)."""
        pose = self.pose
        cam = (np.asarray(xyz_mm, dtype=np.float64) - pose[:3, 3]) @ pose[:3, :3]
        k = self.intrinsics()
        if self.projection == "cone":
            with np.errstate(divide="ignore", invalid="ignore"):
                uv = cam[:, :2] / cam[:, 2:3]
        else:
            uv = cam[:, :2]
        return uv @ k[:2, :2].T + k[:2, 2], cam[:, 2]

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins and unit directions in world mm RAS, each ``(H, W, 3)`` float64.

        Parallel: origins on the isocentre plane (so the ray parameter ``t`` is signed), directions all ``z``.
        Cone: origins at the source, directions to each detector pixel centre.
        """
        pose = self.pose
        cx, cy = self.principal_point
        v, u = np.meshgrid(np.arange(self.height), np.arange(self.width), indexing="ij")
        x = (u - cx) * self.pixel_mm
        y = (v - cy) * self.pixel_mm
        rot, origin = pose[:3, :3], pose[:3, 3]
        if self.projection == "parallel":
            pts = np.stack([x, y, np.zeros_like(x)], axis=-1) @ rot.T + origin
            dirs = np.broadcast_to(rot[:, 2], pts.shape).copy()
            return pts, dirs
        # Cone: a pixel's ray passes the isocentre plane at (x, y) scaled by the magnification's inverse.
        d = np.stack([x, y, np.full_like(x, self.source_to_iso_mm)], axis=-1) @ rot.T
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        return np.broadcast_to(origin, d.shape).copy(), d

    def to_json(self) -> dict:
        """Everything needed to rebuild the camera, plus derived intrinsics/extrinsics, with stated frames."""
        pose = self.pose
        return {
            "projection": self.projection,
            "width": self.width,
            "height": self.height,
            "pixel_mm_at_isocenter": self.pixel_mm,
            "detector_pixel_mm": self.detector_pixel_mm,
            "source_to_iso_mm": self.source_to_iso_mm,
            "source_to_detector_mm": self.source_to_detector_mm if self.projection == "cone" else None,
            "intrinsics": self.intrinsics().tolist(),
            "camera_to_world": pose.tolist(),
            "world_to_camera": np.linalg.inv(pose).tolist(),
            "isocenter_mm": self.isocenter_mm.tolist(),
            "source_mm": pose[:3, 3].tolist() if self.projection == "cone" else None,
            "view_direction": pose[:3, 2].tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Camera:
        return cls(
            width=int(d["width"]),
            height=int(d["height"]),
            pixel_mm=float(d["pixel_mm_at_isocenter"]),
            camera_to_world=tuple(float(v) for v in np.asarray(d["camera_to_world"]).ravel()),
            projection=d["projection"],
            source_to_iso_mm=float(d["source_to_iso_mm"]),
            source_to_detector_mm=float(d["source_to_detector_mm"] or 1.5 * float(d["source_to_iso_mm"])),
        )


#: JSON description of the frames, written into cameras.json.
FRAMES_DOC = {
    "world": "mm, RAS+ (x Right, y Anterior, z Superior), as NIfTI affines",
    "camera": "x = image right (+u), y = image down (+v), z = viewing direction (source -> detector); origin at "
    "the source (cone) or at the isocentre (parallel); camera_to_world maps camera mm -> world mm",
    "pixel": "(u, v) = (column, row), integer at pixel centres; arrays are (H, W) = [v, u]",
    "intrinsics": "cone: pinhole K, camera mm -> homogeneous pixels; parallel: [u, v, 1] = M @ [x_mm, y_mm, 1]",
    "drr": "line integral of the volume's intensity along each ray, intensity x mm",
}


def axis_vector(axis: str | tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """A named world axis (``R L A P S I``) or a 3-vector -> unit vector ``(3,)``, world RAS."""
    if isinstance(axis, str):
        key = axis.strip().upper()
        if key in AXIS_VECTORS:
            return np.array(AXIS_VECTORS[key])
        try:
            vec = np.array([float(v) for v in key.split(",")])
        except ValueError:
            vec = np.zeros(0)
        if vec.shape != (3,):
            raise SlicefieldError(f"unknown orbit axis {axis!r}", fix="use one of R L A P S I, or X,Y,Z e.g. 0,0,1")
    else:
        vec = np.asarray(axis, dtype=np.float64)
    n = float(np.linalg.norm(vec))
    if vec.shape != (3,) or not n > 0:
        raise SlicefieldError(f"orbit axis {axis!r} is not a non-zero 3-vector", fix="e.g. S or 0,0,1")
    return vec / n


def axis_rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """``(3, 3)`` right-handed rotation by ``angle_deg`` about the unit ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    t = np.radians(angle_deg)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


@dataclass(frozen=True)
class OrbitConfig:
    """Cameras on a circular orbit about a world axis through a centre."""

    n_views: int = 72
    """Number of views."""
    step_deg: float = 5.0
    """Angle between consecutive views (degrees, right-handed about the axis)."""
    axis: str = "S"
    """Orbit axis: R L A P S I or X,Y,Z (world RAS); image up points along it."""
    projection: Projection = "parallel"
    """parallel (line integrals along parallel rays) or cone (rays from a point source)."""
    size: int = 128
    """Detector width and height in pixels."""
    fov_mm: float | None = None
    """Detector field of view at the isocentre (mm); None: fitted to the volume's foreground over the orbit."""
    source_to_iso_mm: float = 1000.0
    """Source to isocentre distance (mm); cone only."""
    source_to_detector_mm: float = 1500.0
    """Source to detector distance (mm); cone only."""
    start_deg: float = 0.0
    """Angle of view 0 (degrees) from the default side (anterior, or superior for an A/P axis)."""


def orbit(config: OrbitConfig, *, center_mm: np.ndarray, fov_mm: float) -> list[Camera]:
    """The orbit's cameras. center_mm: ``(3,)`` world mm RAS isocentre; fov_mm: detector width at the isocentre."""
    if config.n_views < 1 or config.size < 2:
        raise SlicefieldError("an orbit needs at least 1 view and a detector of at least 2 pixels", fix="e.g. 72, 128")
    up = axis_vector(config.axis)
    side = next(np.array(s) for s in VIEW0_SIDES if abs(float(np.dot(s, up))) < 0.9)
    side = side - np.dot(side, up) * up
    side /= np.linalg.norm(side)
    z0 = -side  # view 0 looks from `side` towards the centre
    y0 = -up
    x0 = np.cross(y0, z0)
    rot0 = np.stack([x0, y0, z0], axis=1)
    c = np.asarray(center_mm, dtype=np.float64)
    pixel = fov_mm / config.size
    cams = []
    for k in range(config.n_views):
        rot = axis_rotation(up, config.start_deg + k * config.step_deg) @ rot0
        pose = np.eye(4)
        pose[:3, :3] = rot
        pose[:3, 3] = c if config.projection == "parallel" else c - config.source_to_iso_mm * rot[:, 2]
        cams.append(
            Camera(
                width=config.size,
                height=config.size,
                pixel_mm=pixel,
                camera_to_world=tuple(float(v) for v in pose.ravel()),
                projection=config.projection,
                source_to_iso_mm=config.source_to_iso_mm,
                source_to_detector_mm=config.source_to_detector_mm,
            )
        )
    return cams
