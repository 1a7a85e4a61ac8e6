"""The data model: a Volume (values on a voxel grid) and a Stack (2D slices with their own poses).

See :mod:`slicefield.geometry` for the frames (world mm RAS, voxel, slice frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from .errors import SlicefieldError
from .geometry import apply_affine, direction_cosines, orthogonality_error_deg, voxel_spacing

PSFKind = Literal["gaussian", "box"]
PSF_KINDS: tuple[str, ...] = ("gaussian", "box")

#: Largest shear (degrees) tolerated in an affine before it is rejected as non-orthogonal.
MAX_SHEAR_DEG = 0.01


@dataclass
class Volume:
    """Values on a voxel grid.

    data: ``(X, Y, Z)`` float32, array axes in any orientation.
    affine: ``(4, 4)`` float64, voxel index -> world mm (RAS).
    mask: optional ``(X, Y, Z)`` bool foreground.
    """

    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.data.ndim != 3:
            raise ValueError(f"Volume data must be 3D, got shape {self.data.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        if self.mask is not None and self.mask.shape != self.data.shape:
            raise ValueError(f"mask shape {self.mask.shape} != data shape {self.data.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis, ``(3,)``."""
        return voxel_spacing(self.affine)

    def with_data(self, data: np.ndarray) -> Volume:
        """The same grid (and mask) with other values."""
        return replace(self, data=data)

    def world_corners(self) -> np.ndarray:
        """World mm RAS of the 8 corner voxel centres, ``(8, 3)``."""
        n = np.array(self.shape) - 1
        ijk = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])], dtype=float)
        return apply_affine(self.affine, ijk)


@dataclass
class Stack:
    """A set of 2D slices, each with its own rigid pose.

    data: ``(n_slices, ni, nj)`` float32 slice values.
    slice_to_world: ``(n_slices, 4, 4)`` float64; maps slice-frame mm ``(x=i*dx, y=j*dy, z)`` of each slice
        to world mm RAS. Its 3x3 part is orthonormal (possibly a reflection); ``z`` runs along the slice normal.
    spacing: in-plane pixel size ``(dx, dy)`` in mm.
    thickness: slice thickness in mm (FWHM of a Gaussian profile, or width of a box profile).
    psf: ``"gaussian"`` (in-plane FWHM 1.2 x spacing, through-plane FWHM = thickness) or ``"box"``.
    mask: optional ``(n_slices, ni, nj)`` bool; False pixels are ignored by the fitting.
    """

    data: np.ndarray
    slice_to_world: np.ndarray
    spacing: tuple[float, float]
    thickness: float
    psf: PSFKind = "gaussian"
    mask: np.ndarray | None = None
    name: str = "stack"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32)
        self.slice_to_world = np.asarray(self.slice_to_world, dtype=np.float64)
        self.spacing = (float(self.spacing[0]), float(self.spacing[1]))
        self.thickness = float(self.thickness)
        if self.data.ndim != 3:
            raise ValueError(f"Stack data must be (n_slices, ni, nj), got {self.data.shape}")
        if self.slice_to_world.shape != (self.data.shape[0], 4, 4):
            raise ValueError(f"slice_to_world must be ({self.data.shape[0]}, 4, 4), got {self.slice_to_world.shape}")
        if self.psf not in PSF_KINDS:
            raise ValueError(f"psf must be one of {PSF_KINDS}, got {self.psf!r}")
        if min(self.spacing) <= 0 or self.thickness <= 0:
            raise ValueError("spacing and thickness must be positive")

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[0])

    @property
    def normal(self) -> np.ndarray:
        """World direction of the first slice's z axis, ``(3,)``."""
        return self.slice_to_world[0, :3, 2]

    def slice_positions_mm(self) -> np.ndarray:
        """Offset of each slice centre along the first slice's normal, relative to slice 0, ``(n_slices,)`` mm."""
        return (self.slice_to_world[:, :3, 3] - self.slice_to_world[0, :3, 3]) @ self.normal

    @property
    def slice_spacing(self) -> float:
        """Median distance between consecutive slices along the normal (mm); the thickness for one slice."""
        if self.n_slices < 2:
            return self.thickness
        return float(np.median(np.abs(np.diff(self.slice_positions_mm()))))

    @property
    def gap(self) -> float:
        """Slice spacing minus thickness (mm): > 0 is a gap, < 0 an overlap."""
        return self.slice_spacing - self.thickness

    def with_data(self, data: np.ndarray) -> Stack:
        return replace(self, data=data)

    def pixel_world(self, s: int) -> np.ndarray:
        """World mm RAS of every pixel centre of slice ``s``, ``(ni, nj, 3)``."""
        ni, nj = self.data.shape[1:]
        x = np.arange(ni) * self.spacing[0]
        y = np.arange(nj) * self.spacing[1]
        pts = np.stack(np.meshgrid(x, y, [0.0], indexing="ij"), axis=-1)[:, :, 0]
        return apply_affine(self.slice_to_world[s], pts)

    def world_corners(self, *, slab: bool = False) -> np.ndarray:
        """World mm RAS of the corners of every slice (pixel centres), ``(4 * n, 3)`` on the slice planes, or with
        ``slab`` ``(8 * n, 3)``: half a thickness either side of each plane along its normal (the slice's slab)."""
        ni, nj = self.data.shape[1:]
        xs = (0.0, (ni - 1) * self.spacing[0])
        ys = (0.0, (nj - 1) * self.spacing[1])
        zs = (-0.5 * self.thickness, 0.5 * self.thickness) if slab else (0.0,)
        pts = np.array([[x, y, z] for x in xs for y in ys for z in zs])
        return np.concatenate([apply_affine(m, pts) for m in self.slice_to_world])

    def nominal_affine(self) -> np.ndarray:
        """Voxel ``(i, j, slice)`` -> world affine of the stack as a regular 3D grid.

        Raises SlicefieldError when the slices are not parallel, equally spaced and on one in-plane grid
        (e.g. after per-slice motion).
        """
        m0 = self.slice_to_world[0]
        a = np.eye(4)
        a[:3, 0] = m0[:3, 0] * self.spacing[0]
        a[:3, 1] = m0[:3, 1] * self.spacing[1]
        a[:3, 3] = m0[:3, 3]
        if self.n_slices == 1:
            a[:3, 2] = m0[:3, 2] * self.thickness
            return a
        step = self.slice_to_world[1, :3, 3] - m0[:3, 3]
        a[:3, 2] = step
        expected = m0[:3, 3][None] + np.arange(self.n_slices)[:, None] * step[None]
        same_rot = np.allclose(self.slice_to_world[:, :3, :3], m0[None, :3, :3], atol=1e-6)
        if not same_rot or not np.allclose(self.slice_to_world[:, :3, 3], expected, atol=1e-4):
            raise SlicefieldError(
                f"stack {self.name!r} is not a regular grid of parallel slices",
                fix="this operation needs a motion-free stack; use the slice poses instead",
            )
        return a

    def to_volume(self) -> Volume:
        """The stack as a Volume with axes ``(i, j, slice)`` and its nominal affine."""
        return Volume(np.moveaxis(self.data, 0, -1), self.nominal_affine())

    @classmethod
    def from_volume(
        cls,
        volume: Volume,
        *,
        slice_axis: int | None = None,
        thickness: float | None = None,
        psf: PSFKind = "gaussian",
        name: str = "stack",
    ) -> Stack:
        """Interpret a 3D image on a grid as a stack of slices along ``slice_axis``.

        slice_axis: array axis across slices; default the axis with the largest spacing (ties: the last).
        thickness: slice thickness in mm; default the slice spacing (no gap).
        """
        spacing = volume.spacing
        if orthogonality_error_deg(volume.affine) > MAX_SHEAR_DEG:
            raise SlicefieldError(
                f"stack {name!r} has a sheared (non-orthogonal) affine",
                fix="resample it onto an orthogonal grid first",
            )
        if slice_axis is None:
            slice_axis = int(np.flatnonzero(spacing >= spacing.max() - 1e-6)[-1])
        inplane = [a for a in range(3) if a != slice_axis]
        data = np.transpose(volume.data, (slice_axis, *inplane))
        d = direction_cosines(volume.affine)
        n = data.shape[0]
        poses = np.tile(np.eye(4), (n, 1, 1))
        poses[:, :3, 0] = d[:, inplane[0]]
        poses[:, :3, 1] = d[:, inplane[1]]
        poses[:, :3, 2] = d[:, slice_axis]
        ijk = np.zeros((n, 3))
        ijk[:, slice_axis] = np.arange(n)
        poses[:, :3, 3] = apply_affine(volume.affine, ijk)
        mask = None if volume.mask is None else np.transpose(volume.mask, (slice_axis, *inplane))
        return cls(
            data=data,
            slice_to_world=poses,
            spacing=(spacing[inplane[0]], spacing[inplane[1]]),
            thickness=float(spacing[slice_axis]) if thickness is None else thickness,
            psf=psf,
            mask=mask,
            name=name,
        )
