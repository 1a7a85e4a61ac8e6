"""Reconstruction target grids."""

from __future__ import annotations

import numpy as np

from ..errors import SlicefieldError
from ..geometry import bounding_grid
from ..volume import Stack, Volume


def joint_grid(stacks: list[Stack], *, resolution: float) -> Volume:
    """An empty RAS-aligned grid of ``resolution`` mm voxels over the stacks' joint field of view (world mm)."""
    if resolution <= 0:
        raise SlicefieldError(f"resolution {resolution} mm must be positive", fix="pass e.g. --resolution 1")
    corners = np.concatenate([s.world_corners() for s in stacks])
    shape, affine = bounding_grid(corners, resolution)
    n = int(np.prod(shape))
    if n > 2_000_000_000 // 4 // 8:
        raise SlicefieldError(
            f"the joint field of view at {resolution} mm is {shape} voxels, too large",
            fix="pass a coarser --resolution or --like a reference grid",
        )
    return Volume(np.zeros(shape, np.float32), affine)
