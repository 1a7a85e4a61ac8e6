"""A piecewise-trilinear field as a multiresolution pyramid: the CDF 5/3 lifting wavelet, separable in 3D.

One level along one axis splits samples ``x`` (length n >= 2) into the even samples ``s`` (ceil(n/2)) and the odd
ones ``d`` (floor(n/2)) and lifts them:

* predict: ``d_i -= (s_i + s_{i+1}) / 2`` -- the odd sample minus its **linear interpolation** from the even ones;
* update:  ``s_i += (d_{i-1} + d_i) / 4`` -- keeps the coarse samples' mean (the 5/3 low-pass).

Ends are mirrored (whole-sample symmetric extension). Read back from its coarse level alone, the pyramid is the
trilinear interpolation of the coarse grid; each finer level adds the residual of that interpolation (the detail
coefficients ``d``, zero wherever the field is locally linear). The inverse undoes the two steps in reverse order,
so ``inverse(forward(x)) == x`` up to float rounding. Each level splits every axis still >= 2 samples long into a
low (``L``) and high (``H``) half, giving up to 7 detail bands per level named by axis order (``"LLH"``: high along
the third axis) and one coarse band carried to the next level.

Used by :mod:`slicefield.compress` (quantised details are mostly zero). Frame: array index order, unit spacing;
nothing here knows about world coordinates.
"""

from __future__ import annotations

import itertools

import numpy as np

#: Details of one level: band name ("L"/"H" per split axis, "-" for an axis too short to split) -> coefficients.
Level = dict[str, np.ndarray]


def _neighbours(s: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s_{i+1} for each d_i, d_{i-1} for each s_i, d_i for each s_i), ends mirrored; axis 0."""
    ns, nd = len(s), len(d)
    s_next = s[1 : nd + 1] if ns > nd else np.concatenate([s[1:], s[-1:]])
    d_prev = np.concatenate([d[:1], d[:-1]])
    d_here = d
    if ns > nd:  # odd length: the last even sample mirrors the last odd one on both sides
        d_prev = np.concatenate([d_prev, d[-1:]])
        d_here = np.concatenate([d, d[-1:]])
    return s_next, d_prev, d_here


def lift_forward(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """One 5/3 level along ``axis`` (length >= 2): (coarse ``s``, detail ``d``)."""
    x = np.moveaxis(x, axis, 0)
    s, d = x[0::2].astype(np.float64), x[1::2].astype(np.float64)
    s_next, _, _ = _neighbours(s, d)
    d = d - 0.5 * (s[: len(d)] + s_next)
    _, d_prev, d_here = _neighbours(s, d)
    s = s + 0.25 * (d_prev + d_here)
    return np.moveaxis(s, 0, axis), np.moveaxis(d, 0, axis)


def lift_inverse(s: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`lift_forward`."""
    s, d = np.moveaxis(s, axis, 0), np.moveaxis(d, axis, 0)
    _, d_prev, d_here = _neighbours(s, d)
    s = s - 0.25 * (d_prev + d_here)
    s_next, _, _ = _neighbours(s, d)
    d = d + 0.5 * (s[: len(d)] + s_next)
    x = np.empty((len(s) + len(d),) + s.shape[1:], dtype=np.float64)
    x[0::2], x[1::2] = s, d
    return np.moveaxis(x, 0, axis)


def forward(x: np.ndarray, *, levels: int) -> tuple[np.ndarray, list[Level]]:
    """``levels`` pyramid levels of a 3D array -> (coarsest band, details finest first).

    A level splits every axis that is still >= 2 samples long; the pyramid stops early when none is.
    """
    if x.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {x.shape}")
    coarse, details = np.asarray(x, dtype=np.float64), []
    for _ in range(levels):
        split = [ax for ax in range(3) if coarse.shape[ax] >= 2]
        if not split:
            break
        bands = {"": coarse}
        for ax in range(3):
            new = {}
            for name, band in bands.items():
                if ax in split:
                    new[name + "L"], new[name + "H"] = lift_forward(band, ax)
                else:
                    new[name + "-"] = band
            bands = new
        coarse_name = "".join("L" if ax in split else "-" for ax in range(3))
        coarse = bands.pop(coarse_name)
        details.append(bands)
    return coarse, details


def inverse(coarse: np.ndarray, details: list[Level]) -> np.ndarray:
    """Inverse of :func:`forward`."""
    for bands in reversed(details):
        name0 = next(iter(bands))
        coarse_name = "".join("-" if c == "-" else "L" for c in name0)
        bands = {**bands, coarse_name: coarse}
        for ax in reversed(range(3)):
            merged = {}
            for prefix in sorted({n[:ax] for n in bands}):
                if prefix + "-" in bands:
                    merged[prefix] = bands[prefix + "-"]
                else:
                    merged[prefix] = lift_inverse(bands[prefix + "L"], bands[prefix + "H"], ax)
            bands = merged
        coarse = bands[""]
    return coarse


def _gains_1d(n: int, levels: int) -> list[dict[str, float]]:
    """Squared norm of the 1D synthesis of one interior coefficient, per level and band kind "L", "H", "-".

    "-" (the axis was not split at that level: the band passed through) is the "L" of the last level that split it.
    """
    lengths = [n]
    for _ in range(levels):
        lengths.append((lengths[-1] + 1) // 2 if lengths[-1] >= 2 else lengths[-1])

    def synth(level: int, kind: str) -> float:
        if kind == "-" or lengths[level] < 2:
            below = [lv for lv in range(level) if lengths[lv] >= 2]
            return synth(below[-1], "L") if below else 1.0
        m = lengths[level]
        s, d = np.zeros((m + 1) // 2), np.zeros(m // 2)
        band = s if kind == "L" else d
        band[len(band) // 2] = 1.0  # a unit coefficient mid-band, everything else zero
        x = lift_inverse(s, d, 0)
        for lv in range(level - 1, -1, -1):  # through the finer levels, their details zero
            if lengths[lv] >= 2:
                x = lift_inverse(x, np.zeros(lengths[lv] // 2), 0)
        return float(np.sum(x**2))

    return [{k: synth(lv, k) for k in ("L", "H", "-")} for lv in range(levels)]


def band_gains(shape: tuple[int, ...], names: list[list[str]]) -> tuple[list[dict[str, float]], float]:
    """Squared norm of the field made by one unit coefficient of each detail band, and of the coarsest band.

    ``names``: the detail band names of each level (finest first), as :func:`forward` made them. The 5/3 synthesis
    is not orthonormal: a quantisation error ``e`` in band b adds about ``gain_b e^2`` to the field's squared
    error, so equal-distortion steps are ``step / sqrt(gain_b)``. Separable: the product of the 1D gains along the
    axes (interior coefficients; ends ignored).
    """
    levels = len(names)
    axes = [_gains_1d(n, levels) for n in shape]

    def gain(level: int, name: str) -> float:
        return float(np.prod([axes[ax][level][c] for ax, c in enumerate(name)]))

    details = [{name: gain(lv, name) for name in level_names} for lv, level_names in enumerate(names)]
    if not levels:
        return details, 1.0
    coarse = "".join("-" if c == "-" else "L" for c in names[-1][0])
    return details, gain(levels - 1, coarse)


def layout(shape: tuple[int, ...], *, levels: int) -> tuple[tuple[int, ...], list[list[tuple[str, tuple[int, ...]]]]]:
    """Shapes :func:`forward` makes for ``shape``: (coarsest band shape, per level [(band name, band shape)])."""
    coarse, out = tuple(int(n) for n in shape), []
    for _ in range(levels):
        split = [n >= 2 for n in coarse]
        if not any(split):
            break
        options = [("L", "H") if sp else ("-",) for sp in split]
        coarse_name = "".join("L" if sp else "-" for sp in split)
        bands = []
        for letters in itertools.product(*options):  # the order forward() makes them in
            name = "".join(letters)
            if name != coarse_name:
                bands.append((name, tuple(_band_length(c, n) for c, n in zip(name, coarse, strict=True))))
        out.append(bands)
        coarse = tuple((n + 1) // 2 if sp else n for n, sp in zip(coarse, split, strict=True))
    return coarse, out


def _band_length(kind: str, n: int) -> int:
    """Samples of band ``kind`` ("L": the even samples, "H": the odd ones, "-": not split) of an axis of n."""
    return (n + 1) // 2 if kind == "L" else n // 2 if kind == "H" else n
