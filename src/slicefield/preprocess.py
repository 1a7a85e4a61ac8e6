"""Intensity and in-plane resolution preprocessing of images and slice stacks.

See :mod:`slicefield.geometry` for the frames; a Stack's pixel ``(i, j)`` has its centre at slice-frame
``(i * dx, j * dy, 0)`` mm.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np

from .volume import Stack

#: Number of grey levels of the equalised output (8-bit, as in Gonzalez & Woods).
DEFAULT_LEVELS = 256

RescaleOrder = Literal["bicubic", "bilinear"]


def quantise(image: np.ndarray, *, levels: int = DEFAULT_LEVELS) -> np.ndarray:
    """Integer grey levels ``0..levels-1`` of ``image`` (any shape), int64, same shape.

    Linear map of the image's [min, max] onto [0, levels - 1], rounded half up:
    ``r = floor((levels - 1) * (x - min) / (max - min) + 1/2)``. A constant image maps to level 0.
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    x = np.asarray(image, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("image contains NaN or infinite values; replace them before equalising")
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros(x.shape, dtype=np.int64)
    q = np.floor((levels - 1) * (x - lo) / (hi - lo) + 0.5).astype(np.int64)
    return np.clip(q, 0, levels - 1)


def histogram_equalize(
    image: np.ndarray, *, levels: int = DEFAULT_LEVELS, mask: np.ndarray | None = None
) -> np.ndarray:
    """Histogram equalisation ``T(r_k) = floor((L - 1) C(r_k) + 1/2)`` of a 2D or 3D image.

    1. The image is quantised to ``L = levels`` integer levels ``r_k = 0..L-1`` by :func:`quantise`
       (linear map of the whole image's [min, max] onto [0, L-1], rounded half up).
    2. ``C(r_k)`` is the cumulative distribution of the quantised levels: the fraction of voxels with level
       ``<= r_k``, counted over the ``mask``'s voxels when a mask is given, otherwise over all voxels.
    3. Every voxel (also those outside the mask) gets ``T(r_k)``, computed exactly in integer arithmetic.

    image: ``(X, Y)`` or ``(X, Y, Z)``, any intensity units. mask: optional bool array of the same shape.
    Returns float32 of the same shape with integer values in ``0..L-1``; ``T`` is non-decreasing in the input.
    A constant image maps to ``L - 1`` everywhere (``C = 1``).
    """
    q = quantise(image, levels=levels)
    if mask is None:
        counted = q.ravel()
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != q.shape:
            raise ValueError(f"mask shape {mask.shape} != image shape {q.shape}")
        if not mask.any():
            raise ValueError("mask is empty; pass a mask with at least one True voxel")
        counted = q[mask]
    cumulative = np.cumsum(np.bincount(counted, minlength=levels))  # voxels with level <= r_k
    n = int(counted.size)
    # floor((L-1) * cum / n + 1/2) == floor((2 (L-1) cum + n) / (2 n)), exact in integers.
    table = (2 * (levels - 1) * cumulative + n) // (2 * n)
    return table[q].astype(np.float32)


def _pair(value: float | tuple[float, float], what: str) -> tuple[float, float]:
    a = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,))
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"{what} must be positive, got {value}")
    return float(a[0]), float(a[1])


def rescale_slices(
    stack: Stack,
    *,
    factor: float | tuple[float, float] | None = None,
    spacing: float | tuple[float, float] | None = None,
    order: RescaleOrder = "bicubic",
) -> Stack:
    """Resample every slice in-plane to a finer or coarser pixel grid over the same field of view.

    Give exactly one of ``factor`` (new pixels per old pixel along ``(i, j)``; 2 halves the pixel size) or
    ``spacing`` (target in-plane pixel size ``(dx, dy)`` in mm). Slices keep their thickness, PSF kind and
    through-plane position; the data are ``(n_slices, ni', nj')`` float32.

    Geometry (pixel-centre convention). A pixel is a ``dx`` x ``dy`` square centred on its sample, so the slice
    covers the field of view ``[-dx/2, (ni - 1/2) dx] x [-dy/2, (nj - 1/2) dy]`` in its slice frame. The new
    grid covers exactly the same field of view:

    - ``ni' = max(1, round(ni * factor))`` (or ``round(ni * dx / spacing)``) and ``dx' = ni * dx / ni'``;
      so ``dx'`` equals ``dx / factor`` (or the requested ``spacing``) up to this rounding of the pixel count;
    - the centre of the new pixel ``(0, 0)`` is at slice-frame ``((dx' - dx) / 2, (dy' - dy) / 2)``, so each
      ``slice_to_world`` is moved by that offset along its own in-plane axes (rotation unchanged);
    - the value at new pixel ``i'`` is interpolated at old fractional index ``(i' + 1/2) dx' / dx - 1/2``.

    This is ``torch.nn.functional.interpolate(..., size=(ni', nj'), align_corners=False)``. ``align_corners=True``
    would instead pin the corner pixel centres, which changes the field of view and makes the spacing
    ``(ni - 1) dx / (ni' - 1)`` rather than ``dx / factor``. Interpolation uses ``antialias=True``: when
    downsampling the kernel is widened (a low-pass filter, like the larger pixels' own averaging), and in both
    directions it is the Keys cubic with ``a = -0.5``, which reproduces quadratics exactly (plain torch bicubic
    uses ``a = -0.75`` and is not even exact for linear ramps). New pixel centres within about two old pixels of
    the field-of-view edge lie outside the old samples' hull and are extrapolated (weights renormalised).

    A mask, if present, is resampled by nearest neighbour on the same pixel-centre grid (``"nearest-exact"``).
    """
    import torch
    import torch.nn.functional as F

    if (factor is None) == (spacing is None):
        raise ValueError("give exactly one of factor= and spacing=")
    if order not in ("bicubic", "bilinear"):
        raise ValueError(f"order must be 'bicubic' or 'bilinear', got {order!r}")
    n_old = np.array(stack.data.shape[1:], dtype=np.int64)
    d_old = np.array(stack.spacing, dtype=np.float64)
    ratio = np.array(_pair(factor, "factor")) if factor is not None else d_old / np.array(_pair(spacing, "spacing"))
    n_new = np.maximum(1, np.rint(n_old * ratio)).astype(np.int64)
    fov = n_old * d_old
    d_new = fov / n_new
    size = (int(n_new[0]), int(n_new[1]))

    data = torch.from_numpy(np.ascontiguousarray(stack.data, dtype=np.float32))[None]  # (1, n_slices, ni, nj)
    new_data = F.interpolate(data, size=size, mode=order, align_corners=False, antialias=True)[0].numpy()

    new_mask = None
    if stack.mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(stack.mask, dtype=np.float32))[None]
        new_mask = F.interpolate(m, size=size, mode="nearest-exact")[0].numpy() > 0.5

    shift = 0.5 * (d_new - d_old)  # slice-frame mm of the new pixel (0, 0) centre
    poses = stack.slice_to_world.copy()
    poses[:, :3, 3] += poses[:, :3, 0] * shift[0] + poses[:, :3, 1] * shift[1]

    return replace(
        stack,
        data=np.ascontiguousarray(new_data, dtype=np.float32),
        slice_to_world=poses,
        spacing=(float(d_new[0]), float(d_new[1])),
        mask=new_mask,
        meta=dict(stack.meta),
    )
