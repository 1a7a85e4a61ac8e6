"""Slice profiles (PSF) as quadrature weights.

A stack's PSF is separable in its slice frame: in-plane x, in-plane y and through-plane z.
``"gaussian"``: in-plane FWHM = :data:`INPLANE_FWHM_PER_SPACING` x pixel spacing, through-plane FWHM = thickness.
``"box"``: in-plane width = pixel spacing, through-plane width = thickness.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from ..geometry import FWHM_PER_SIGMA

#: In-plane PSF FWHM as a multiple of the pixel spacing (the usual MRI approximation of a sinc by a Gaussian).
INPLANE_FWHM_PER_SPACING = 1.2
#: Gaussian profiles are cut at this many standard deviations.
TRUNCATE_SIGMAS = 3.0


def profile_halfwidth(kind: str, width_mm: float) -> float:
    """Half support (mm) of a profile of FWHM (gaussian) or full width (box) ``width_mm``."""
    if kind == "gaussian":
        return TRUNCATE_SIGMAS * width_mm / FWHM_PER_SIGMA
    if kind == "box":
        return width_mm / 2.0
    raise ValueError(f"unknown profile kind {kind!r}")


def profile_weights(
    centers_mm: np.ndarray, samples_mm: np.ndarray, bin_mm: float, *, kind: str, width_mm: float
) -> np.ndarray:
    """Weights ``(n_centers, n_samples)`` of a 1D profile integrated over sample bins, rows summing to 1.

    centers_mm: ``(n,)`` profile centres; samples_mm: ``(m,)`` sample positions, each standing for a bin of
    ``bin_mm`` around it. width_mm: FWHM (gaussian) or full width (box). Same axis and units for all.
    """
    d = np.asarray(samples_mm, dtype=np.float64)[None, :] - np.asarray(centers_mm, dtype=np.float64)[:, None]
    lo, hi = d - bin_mm / 2.0, d + bin_mm / 2.0
    if kind == "gaussian":
        sigma = width_mm / FWHM_PER_SIGMA
        cut = TRUNCATE_SIGMAS * sigma  # integrate over [-cut, cut] only: symmetric wherever the centre falls
        w = ndtr(np.clip(hi, -cut, cut) / sigma) - ndtr(np.clip(lo, -cut, cut) / sigma)
    elif kind == "box":
        w = np.clip(np.minimum(hi, width_mm / 2.0) - np.maximum(lo, -width_mm / 2.0), 0.0, None)
    else:
        raise ValueError(f"unknown profile kind {kind!r}")
    total = w.sum(axis=1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("a profile centre has no samples within its support")
    return w / total
