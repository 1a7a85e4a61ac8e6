"""B-spline baseline: each stack resampled with cubic B-splines onto the target grid, then averaged (as in IREM)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..geometry import apply_affine
from ..itk import resample
from ..volume import Stack, Volume


def coverage(stack: Stack, grid: Volume) -> np.ndarray:
    """Bool ``grid.shape``: grid voxels inside the stack's nominal field of view (half a voxel beyond centres)."""
    aff = stack.nominal_affine()
    ijk = np.indices(grid.shape, dtype=np.float32).reshape(3, -1).T
    vox = apply_affine(np.linalg.inv(aff) @ grid.affine, ijk)
    shape = np.array([stack.data.shape[1], stack.data.shape[2], stack.data.shape[0]])
    inside = np.all((vox > -0.5) & (vox < shape - 0.5), axis=1)
    return inside.reshape(grid.shape)


def bspline_average(
    stacks: list[Stack], grid: Volume, *, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Mean over stacks of each stack resampled (cubic B-spline, world RAS) onto ``grid``; ``grid.shape`` float32.

    Each grid voxel averages the stacks whose field of view contains it; voxels seen by none are 0.
    Stacks must be motion-free (regular grids): this baseline ignores per-slice poses.
    """
    total = np.zeros(grid.shape, np.float32)
    count = np.zeros(grid.shape, np.float32)
    for k, stack in enumerate(stacks):
        vol = stack.to_volume()
        inside = coverage(stack, grid)
        total += np.where(inside, resample(vol.data, vol.affine, shape=grid.shape, target_affine=grid.affine), 0.0)
        count += inside
        if progress is not None:
            progress(k + 1, len(stacks))
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)
