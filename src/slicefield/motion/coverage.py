"""Sampling coverage: how much slice data reaches each voxel of a grid, for slices at any poses.

Per-slice motion leaves a stack's slices unevenly spaced: some overlap, others leave gaps along the normal that no
slice of that stack samples, or leave the field of view. With the true poses a reconstruction still has less data
in those gaps. The coverage of voxel ``v`` is ``sum_s (A_s^T w_s)[v]``: the total PSF weight that the (weighted)
pixels of every stack place on it, ``A_s`` the stack's forward operator
(:class:`~slicefield.acquisition.operator.StackOperator`, whose rows sum to 1 inside the grid). For motion-free
stacks it is uniform inside their field of view: ``sum over stacks of voxel volume / (dx * dy * slice spacing)``
(0.75 for three 4 mm stacks of 1 mm pixels on a 1 mm grid); the ratio to that value says where data are missing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..acquisition.operator import StackOperator
from ..volume import Stack, Volume


def slice_coverage(
    stacks: list[Stack],
    grid: Volume,
    *,
    operators: list[StackOperator] | None = None,
    slice_weights: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Coverage ``grid.shape`` float32 of ``grid`` (voxel -> world mm RAS) by the slices of ``stacks`` at their poses.

    operators: prebuilt forward operators of these stacks on this grid (built here when omitted).
    slice_weights: per stack, ``(n_slices,)`` weight of each slice (0 leaves a slice out); the stack's mask, if any,
    multiplies it. Dimensionless: PSF weight per voxel (see the module docstring).
    """
    if operators is None:
        operators = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
    if len(operators) != len(stacks):
        raise ValueError(f"{len(operators)} operators for {len(stacks)} stacks")
    if slice_weights is not None and len(slice_weights) != len(stacks):
        raise ValueError(f"{len(slice_weights)} slice-weight arrays for {len(stacks)} stacks")
    out = np.zeros(grid.shape, np.float32)
    for k, (stack, op) in enumerate(zip(stacks, operators, strict=True)):
        w = np.ones(stack.data.shape, np.float32) if stack.mask is None else stack.mask.astype(np.float32)
        if slice_weights is not None:
            w = w * np.asarray(slice_weights[k], np.float32)[:, None, None]
        out += op.adjoint(w)
    return out
