"""Bias-field (intensity inhomogeneity) correction of stacks: N4 (Tustison et al. 2010) via SimpleITK.

Each stack is corrected on its own nominal 3D grid (the coil's field is fixed in scanner space, so it is smooth
across the stack's slices even when the head moved). N4 runs on a shrunk copy inside the stack's automatic
foreground; the fitted log field is then evaluated on the full grid and divided out of every pixel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..errors import SlicefieldError
from ..itk import to_sitk
from ..volume import Stack
from .masks import stack_foreground

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiasFieldConfig:
    """Options of the N4 bias-field correction."""

    shrink: int = 2
    """N4 runs on the stack shrunk by this factor in-plane (the field is smooth; the result is full size)."""
    iterations: tuple[int, ...] = (50, 50, 30)
    """Iterations per fitting level (one entry per B-spline refinement level)."""
    control_points: int = 4
    """B-spline control points per axis at the first level."""


def correct_bias_field(stack: Stack, *, config: BiasFieldConfig = BiasFieldConfig()) -> tuple[Stack, np.ndarray]:
    """The stack with its bias field divided out, and the field ``(n, ni, nj)`` (multiplicative, ~1).

    Raises SlicefieldError for a stack that is not a regular grid of parallel slices (correct the bias field
    before motion correction moves the slices).
    """
    import SimpleITK as sitk

    try:
        volume = stack.to_volume()
    except SlicefieldError as e:
        raise SlicefieldError(
            f"stack {stack.name!r} is not a regular grid of slices, so its bias field cannot be fitted",
            fix="correct the bias field on the stacks as read from their headers",
        ) from e
    data = np.maximum(volume.data, 0.0)
    mask = np.moveaxis(stack_foreground(stack), 0, -1)
    if not mask.any():
        log.warning("%s: empty foreground, bias field not corrected", stack.name)
        return stack, np.ones(stack.data.shape, np.float32)
    image = to_sitk(data + 1e-3 * float(data.max()), volume.affine)  # N4 needs positive values
    mask_img = sitk.Cast(to_sitk(mask.astype(np.float32), volume.affine), sitk.sitkUInt8)
    shrink = [config.shrink, config.shrink, 1]
    small = sitk.Shrink(image, shrink)
    small_mask = sitk.Shrink(mask_img, shrink)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(config.iterations))
    n4.SetNumberOfControlPoints([config.control_points] * 3)
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(image))  # (slice, j, i)
    field = np.exp(np.transpose(log_field, (2, 1, 0))).astype(np.float32)  # (i, j, slice)
    field = np.moveaxis(field, -1, 0)  # (n, ni, nj)
    corrected = replace(stack, data=(stack.data / field).astype(np.float32), meta=dict(stack.meta))
    return corrected, field
