"""Image-quality metrics (PSNR, NRMSE, SSIM) and the automatic foreground mask.

All functions take a ``reference`` (ground truth) and a ``test`` array of the same shape, 2D ``(X, Y)`` or 3D
``(X, Y, Z)``, in the same intensity units. Options are keyword-only; the intensity range ``data_range`` is
always passed explicitly (as scikit-image requires for floating-point images) except in :func:`evaluate`, whose
documented convention is ``reference.max() - reference.min()``.

A ``mask`` is a bool array of the same shape; a masked metric uses only the voxels where it is True.

Only numpy and scipy are used; scikit-image serves as the independent reference in the tests.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

#: Standard deviation (voxels) of the Gaussian SSIM window, as in Wang et al. 2004 and scikit-image.
SSIM_SIGMA = 1.5
#: SSIM stabilising constants: C1 = (K1 * data_range)^2, C2 = (K2 * data_range)^2 (Wang et al. 2004).
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: The Gaussian window is cut at this many standard deviations (scikit-image's choice: an 11-tap window at 1.5).
SSIM_TRUNCATE = 3.5

#: Bins of the intensity histogram used by the Otsu threshold (scikit-image's ``threshold_otsu`` default).
OTSU_BINS = 256
#: Iterations of the binary closing (6-neighbourhood in 3D, 4 in 2D) in :func:`foreground_mask`.
MASK_CLOSING_ITERATIONS = 2

NRMSENormalization = Literal["euclidean", "min-max", "mean"]


def _pair(reference: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference)
    test = np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(f"reference shape {reference.shape} != test shape {test.shape}")
    return reference, test


def _mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} != image shape {shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty (no True voxel); pass a mask that covers the region to evaluate")
    return mask


def _data_range(data_range: float) -> float:
    data_range = float(data_range)
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive finite number, got {data_range}")
    return data_range


def _selected(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The compared voxels as float64 1D arrays (all voxels, or the mask's)."""
    if mask is None:
        return reference.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    return reference[mask].astype(np.float64), test[mask].astype(np.float64)


def psnr(reference: np.ndarray, test: np.ndarray, *, data_range: float, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``.

    reference, test: same shape, any dimensionality, same intensity units.
    data_range: peak-to-peak intensity range (intensity units), required and > 0; there is no guess from the dtype.
    mask: optional bool array of the same shape; the MSE is then the mean over the mask's voxels only.
    Returns ``inf`` when the images agree exactly. Raises ValueError for a bad ``data_range`` or an empty mask.
    """
    reference, test = _pair(reference, test)
    data_range = _data_range(data_range)
    r, t = _selected(reference, test, _mask(mask, reference.shape))
    mse = float(np.mean((r - t) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def nrmse(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    normalization: NRMSENormalization = "euclidean",
) -> float:
    """Normalised root-mean-square error (dimensionless), scikit-image's ``normalized_root_mse`` definitions.

    With ``r``, ``t`` the compared voxels (all, or the mask's) and ``RMSE = sqrt(mean((r - t)^2))``:

    - ``"euclidean"``: ``||r - t|| / ||r||`` (= RMSE / sqrt(mean(r^2))),
    - ``"min-max"``: ``RMSE / (max(r) - min(r))``,
    - ``"mean"``: ``RMSE / mean(r)``.

    reference, test: same shape, any dimensionality. mask: optional bool array of that shape.
    """
    reference, test = _pair(reference, test)
    r, t = _selected(reference, test, _mask(mask, reference.shape))
    rmse = float(np.sqrt(np.mean((r - t) ** 2)))
    key = normalization.lower()
    if key == "euclidean":
        denom = float(np.sqrt(np.mean(r * r)))
    elif key == "min-max":
        denom = float(r.max() - r.min())
    elif key == "mean":
        denom = float(r.mean())
    else:
        raise ValueError(f"normalization must be 'euclidean', 'min-max' or 'mean', got {normalization!r}")
    if denom == 0.0:
        raise ValueError(f"nrmse is undefined: the reference's {key} normaliser is 0")
    return rmse / denom


def ssim_window_size(sigma: float = SSIM_SIGMA) -> int:
    """Side of the Gaussian SSIM window in voxels, ``2 * int(3.5 * sigma + 0.5) + 1`` (11 for sigma 1.5)."""
    return 2 * int(SSIM_TRUNCATE * sigma + 0.5) + 1


def ssim_map(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    data_range: float,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> np.ndarray:
    """Local SSIM at every voxel with a Gaussian window, ``(X, Y[, Z])`` float32, dimensionless (1 = identical).

    Matches scikit-image's ``structural_similarity(reference, test, gaussian_weights=True, sigma=sigma,
    use_sample_covariance=False, data_range=data_range, full=True)[1]``: local means, variances and covariance
    are Gaussian-weighted (isotropic ``sigma`` in voxels, cut at 3.5 sigma, ``"reflect"`` boundaries), variances
    are population ones, and ``SSIM = (2 mu_r mu_t + C1)(2 cov + C2) / ((mu_r^2 + mu_t^2 + C1)(var_r + var_t + C2))``
    with ``C1 = (k1 data_range)^2`` and ``C2 = (k2 data_range)^2``.

    The filtering is done in float32 (for speed and memory on whole brain volumes) on images shifted by the
    midpoint of their joint intensity range; the shift leaves (co)variances unchanged and reduces their
    cancellation error, so the map agrees with the float64 computation to about 1e-5.

    reference, test: same shape, 2D or 3D, every side at least :func:`ssim_window_size` voxels.
    data_range: peak-to-peak intensity range (intensity units), required and > 0.
    """
    reference, test = _pair(reference, test)
    data_range = _data_range(data_range)
    if sigma <= 0 or k1 < 0 or k2 < 0:
        raise ValueError(f"need sigma > 0, k1 >= 0 and k2 >= 0, got sigma={sigma}, k1={k1}, k2={k2}")
    win = ssim_window_size(sigma)
    if min(reference.shape) < win:
        raise ValueError(
            f"image shape {reference.shape} is smaller than the {win}-voxel SSIM window; use a smaller sigma"
        )

    lo = min(float(reference.min()), float(test.min()))
    hi = max(float(reference.max()), float(test.max()))
    shift = 0.5 * (lo + hi)
    x = reference.astype(np.float32) - np.float32(shift)
    y = test.astype(np.float32) - np.float32(shift)

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=SSIM_TRUNCATE)

    ux = blur(x)
    uy = blur(y)
    # (Co)variances are shift-invariant, so they come from the shifted images; products in place to save memory.
    vx = blur(np.square(x))
    vx -= ux * ux
    vy = blur(np.square(y))
    vy -= uy * uy
    x *= y
    del y
    vxy = blur(x)
    del x
    vxy -= ux * uy
    # Means back in the original intensities for the luminance term.
    ux += np.float32(shift)
    uy += np.float32(shift)

    c1 = np.float32((k1 * data_range) ** 2)
    c2 = np.float32((k2 * data_range) ** 2)
    # numerator = (2 ux uy + C1)(2 vxy + C2); denominator = (ux^2 + uy^2 + C1)(vx + vy + C2), built in place.
    vxy *= 2
    vxy += c2
    vx += vy
    vx += c2
    del vy
    num = ux * uy
    num *= 2
    num += c1
    num *= vxy
    del vxy
    np.square(ux, out=ux)
    np.square(uy, out=uy)
    ux += uy
    del uy
    ux += c1
    ux *= vx
    del vx
    num /= ux
    return num


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> float:
    """Mean structural similarity (dimensionless, 1 = identical) of 2D or 3D images; see :func:`ssim_map`.

    Without ``mask``: the mean of the SSIM map over the interior, after cropping ``(win - 1) // 2`` voxels
    (5 for sigma 1.5) from every side, exactly as scikit-image's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``.
    With ``mask`` (bool, same shape): the mean of the full, uncropped map over the mask's voxels.

    data_range: peak-to-peak intensity range (intensity units), required and > 0.
    """
    reference, test = _pair(reference, test)
    m = _mask(mask, reference.shape)
    s = ssim_map(reference, test, data_range=data_range, sigma=sigma, k1=k1, k2=k2)
    if m is not None:
        return float(s[m].mean(dtype=np.float64))
    pad = (ssim_window_size(sigma) - 1) // 2
    interior = s[tuple(slice(pad, n - pad) for n in s.shape)]
    return float(interior.mean(dtype=np.float64))


def otsu_threshold(values: np.ndarray, *, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold (intensity units) of the values, from a ``bins``-bin histogram over [min, max].

    The threshold is the centre of the histogram bin that maximises the between-class variance of the two
    classes "bins up to and including this one" and "bins above it" (the first such bin on ties), as in
    scikit-image's ``threshold_otsu``; foreground is ``values > threshold``. Raises ValueError on constant input.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        raise ValueError("Otsu's threshold needs an image with at least two distinct finite values")
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    hist = hist.astype(np.float64)
    w0 = np.cumsum(hist)
    w1 = np.cumsum(hist[::-1])[::-1]
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1e-300)
    m1 = (np.cumsum((hist * centres)[::-1]) / np.maximum(w1[::-1], 1e-300))[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask(volume_array: np.ndarray, *, method: Literal["otsu"] = "otsu") -> np.ndarray:
    """Automatic foreground (brain) mask, the one used by ``--mask auto``; bool, same shape as the input.

    volume_array: 2D or 3D intensities. Deterministic; the steps are:

    1. Otsu threshold ``t`` from a 256-bin histogram of all finite voxels over [min, max] (:func:`otsu_threshold`);
       candidate foreground = ``volume_array > t``.
    2. Keep the largest connected component, face connectivity (6-neighbourhood in 3D, 4 in 2D); on a tie in
       size the component met first in C (row-major) order wins.
    3. Binary closing with the same cross-shaped structuring element, 2 iterations, computed on an array padded
       by 2 background voxels so that foreground touching the border is not eroded (the closing only adds voxels).
    4. Fill holes (:func:`scipy.ndimage.binary_fill_holes`): background regions not connected to the array
       border become foreground, e.g. ventricles and other dark enclosed structures.

    The result is a single connected component. For a skull-stripped brain (background exactly 0) the threshold
    separates background from tissue and the mask is the brain with its enclosed cavities filled.
    Raises ValueError for an unknown method or a constant image.
    """
    if method != "otsu":
        raise ValueError(f"method must be 'otsu', got {method!r}")
    a = np.asarray(volume_array)
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    candidate = a > otsu_threshold(a)
    labels, n = ndimage.label(candidate, structure=structure)
    if n == 0:
        return np.zeros(a.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    pad = MASK_CLOSING_ITERATIONS
    closed = ndimage.binary_closing(np.pad(largest, pad), structure=structure, iterations=MASK_CLOSING_ITERATIONS)[
        tuple(slice(pad, -pad) for _ in range(a.ndim))
    ]
    return ndimage.binary_fill_holes(closed, structure=structure)


def evaluate(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    data_range: float | None = None,
) -> dict[str, float | None]:
    """All metrics of ``test`` against ``reference`` (same shape, 2D or 3D) in one dict.

    Keys: ``"psnr"`` (dB), ``"ssim"``, ``"nrmse"`` (euclidean) over the whole image; ``"psnr_masked"``,
    ``"ssim_masked"``, ``"nrmse_masked"`` over ``mask`` (None when no mask is given); ``"data_range"``, the range
    used. Convention of this helper only: ``data_range`` defaults to ``reference.max() - reference.min()``
    (the base metric functions require it explicitly).
    """
    reference, test = _pair(reference, test)
    if data_range is None:
        data_range = float(reference.max()) - float(reference.min())
    data_range = _data_range(data_range)
    m = _mask(mask, reference.shape)
    out: dict[str, float | None] = {
        "psnr": psnr(reference, test, data_range=data_range),
        "psnr_masked": None,
        "ssim": None,
        "ssim_masked": None,
        "nrmse": nrmse(reference, test),
        "nrmse_masked": None,
        "data_range": data_range,
    }
    s = ssim_map(reference, test, data_range=data_range)
    pad = (ssim_window_size() - 1) // 2
    out["ssim"] = float(s[tuple(slice(pad, n - pad) for n in s.shape)].mean(dtype=np.float64))
    if m is not None:
        out["psnr_masked"] = psnr(reference, test, data_range=data_range, mask=m)
        out["ssim_masked"] = float(s[m].mean(dtype=np.float64))
        out["nrmse_masked"] = nrmse(reference, test, mask=m)
    return out


#: Immerkaer's noise-estimation kernel (difference of two Laplacians): zero response to planes and quadrics.
_IMMERKAER_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=np.float32)


def estimate_noise_sigma(slices: np.ndarray) -> float:
    """Standard deviation of additive noise in a stack of 2D slices ``(n, ni, nj)``, same units as the values.

    J. Immerkaer, "Fast noise variance estimation", CVIU 64(2), 1996: sigma = sqrt(pi/2) / 6 * mean |I * N| over
    each slice's interior, with N the 3x3 kernel above; the median over slices is returned (robust to a few
    corrupt or empty slices). Accurate to ~10 % on brain MRI slices at 0.5-3 % noise.
    """
    data = np.asarray(slices, dtype=np.float32)
    if data.ndim != 3 or min(data.shape[1:]) < 3:
        raise ValueError(f"slices must be (n, ni >= 3, nj >= 3), got {data.shape}")
    per_slice = [
        float(np.abs(ndimage.convolve(sl, _IMMERKAER_KERNEL, mode="reflect"))[1:-1, 1:-1].mean()) for sl in data
    ]
    return float(np.median(per_slice) * np.sqrt(np.pi / 2.0) / 6.0)
