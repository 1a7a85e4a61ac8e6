"""Automatic foreground masks of stacks (where registration and outlier statistics look)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..metrics import foreground_mask
from ..volume import Stack


def stack_foreground(stack: Stack, *, dilate_mm: float = 0.0) -> np.ndarray:
    """Bool ``(n, ni, nj)``: the stack's automatic foreground, dilated in-plane by ``dilate_mm``.

    The slices are treated as one 3D image (Otsu threshold, largest connected component, closing, hole filling:
    :func:`~slicefield.metrics.foreground_mask`); each slice's part is then dilated in its own plane by
    ``dilate_mm`` (pixels of the stack's in-plane spacing), so that anatomy moved by a few mm stays inside.
    A constant stack has an empty foreground.
    """
    data = np.asarray(stack.data)
    if float(data.max()) <= float(data.min()):
        return np.zeros(data.shape, dtype=bool)
    mask = foreground_mask(data)
    steps = int(round(dilate_mm / float(np.mean(stack.spacing))))
    if steps > 0:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_dilation(mask, structure=structure, iterations=steps)
    return mask
