"""A dense voxel grid with trilinear interpolation: the explicit representation behind the same protocol.

Index -> ``u`` convention (``align_corners=True``): for a grid of shape ``(X, Y, Z)`` the array axes map to ``u``'s
x, y, z *in that order*, and sample ``[i, j, k]`` sits at ``u = (-1 + 2 i / (X - 1), -1 + 2 j / (Y - 1),
-1 + 2 k / (Z - 1))``: the first and last samples of every axis lie on the box faces ``u = -1`` and ``u = +1``.
So to initialise from a classical reconstruction on a voxel grid, build the
:class:`~slicefield.representations.base.Box` from the world positions of the *first and last voxel centres* (not
the outer voxel edges). Outside the box the value of the nearest face is used (border padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slicefield.representations._common import check_points

#: Default grid shape (X, Y, Z).
VOXEL_SHAPE = (64, 64, 64)


@dataclass(frozen=True)
class VoxelGridConfig:
    """Configuration of :class:`VoxelGrid`."""

    shape: tuple[int, int, int] = VOXEL_SHAPE
    """Samples along u's x, y, z (array axes 0, 1, 2); each at least 2."""
    init_value: float = 0.0
    """Value every sample starts at (deterministic; use :meth:`VoxelGrid.from_array` to start from data)."""


class VoxelGrid(nn.Module):
    """Voxel field: ``u (N, 3) float32 in [-1, 1]^3 -> trilinear intensity (N,) float32``.

    ``self.values``: (X, Y, Z) float32 parameter, indexed like the input array of :meth:`from_array`.
    """

    def __init__(self, config: VoxelGridConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VoxelGridConfig()
        if len(config.shape) != 3 or min(config.shape) < 2:
            raise ValueError(f"VoxelGrid shape must be 3 sizes >= 2 (samples on the box faces), got {config.shape}")
        self.values = nn.Parameter(torch.full(tuple(config.shape), float(config.init_value), dtype=torch.float32))

    @classmethod
    def from_array(cls, values: np.ndarray | torch.Tensor) -> VoxelGrid:
        """A grid holding ``values (X, Y, Z)`` (copied, as float32); see the module docstring for where they sit."""
        arr = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        if arr.ndim != 3:
            raise ValueError(f"VoxelGrid.from_array needs a 3D array (X, Y, Z), got shape {tuple(arr.shape)}")
        grid = cls(VoxelGridConfig(shape=tuple(int(s) for s in arr.shape)))
        with torch.no_grad():
            grid.values.copy_(arr.to(torch.float32))
        return grid

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Trilinear intensities ``(N,)`` float32 at normalised positions ``u (N, 3)``."""
        check_points(u)
        n = u.shape[0]
        # grid_sample's 5D input is (1, C, D, H, W) and its grid's last axis is (x -> W, y -> H, z -> D):
        # put array axis 0 (u's x) last.
        volume = self.values.permute(2, 1, 0)[None, None]
        out = F.grid_sample(
            volume, u.float().view(1, n, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.view(n)
