"""The Representation protocol: a field mapping positions to intensities.

Every representation is a ``torch.nn.Module`` whose ``forward`` takes *normalised* positions
``u: (N, 3) float32`` in ``[-1, 1]^3`` and returns values ``(N,)`` float32. The map between world mm (RAS) and
``u`` is a :class:`Box`, owned by the fitting code and stored with the model, so inputs and outputs of the
public API are always world mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Box:
    """An axis-aligned world box (mm, RAS) mapped affinely onto ``[-1, 1]^3``."""

    lo_mm: tuple[float, float, float]
    hi_mm: tuple[float, float, float]

    @classmethod
    def around(cls, points_mm: np.ndarray, *, margin_mm: float = 0.0) -> Box:
        """The box around world points ``(N, 3)`` mm, widened by ``margin_mm`` on every side."""
        lo = np.asarray(points_mm).min(axis=0) - margin_mm
        hi = np.asarray(points_mm).max(axis=0) + margin_mm
        return cls(tuple(float(v) for v in lo), tuple(float(v) for v in hi))

    def normalise(self, xyz_mm: torch.Tensor) -> torch.Tensor:
        """World mm ``(N, 3)`` -> normalised ``(N, 3)`` in [-1, 1] inside the box."""
        lo = torch.as_tensor(self.lo_mm, dtype=xyz_mm.dtype, device=xyz_mm.device)
        hi = torch.as_tensor(self.hi_mm, dtype=xyz_mm.dtype, device=xyz_mm.device)
        return 2.0 * (xyz_mm - lo) / (hi - lo) - 1.0


@dataclass(frozen=True)
class GridFrame:
    """World mm (RAS) -> normalised ``u`` through a fit grid's voxel frame: voxel centres ``0 .. n-1`` -> ``[-1, 1]``.

    Unlike :class:`Box`, it follows the grid's axes (flipped, permuted or oblique), so a VoxelGrid's array axes
    are exactly the fit grid's array axes. ``world_to_u``: 4x4 row-major, as a tuple for JSON.
    """

    world_to_u: tuple[float, ...]

    @classmethod
    def of_grid(cls, shape: tuple[int, int, int], affine: np.ndarray) -> GridFrame:
        n = np.maximum(np.asarray(shape, dtype=np.float64) - 1.0, 1.0)
        vox_to_u = np.diag(np.append(2.0 / n, 1.0))
        vox_to_u[:3, 3] = -1.0
        return cls(tuple(float(v) for v in (vox_to_u @ np.linalg.inv(affine)).ravel()))

    def world_corners(self) -> np.ndarray:
        """World mm of the 8 corners ``u = +-1`` (the fit grid's corner voxel centres), ``(8, 3)``."""
        inv = np.linalg.inv(np.asarray(self.world_to_u).reshape(4, 4))
        u = np.array([[a, b, c, 1.0] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
        return (u @ inv.T)[:, :3]

    def normalise(self, xyz_mm: torch.Tensor) -> torch.Tensor:
        """World mm ``(N, 3)`` -> normalised ``(N, 3)``."""
        m = torch.as_tensor(np.asarray(self.world_to_u).reshape(4, 4), dtype=xyz_mm.dtype, device=xyz_mm.device)
        return xyz_mm @ m[:3, :3].T + m[:3, 3]
