"""Super-resolution reconstruction: regularised least squares on the forward operator, by conjugate gradients.

Solves  min_x  sum_s ||A_s x - y_s||^2 + lambda * R(x)  on the target voxel grid, where ``A_s`` is the stack's
:class:`~slicefield.acquisition.operator.StackOperator` and R is either Tikhonov on the image gradient
(``sum |grad x|^2``) or edge-preserving Huber on each forward difference (anisotropic, so invariant to
flips and permutations of the array axes), solved by iteratively reweighted least
squares (a few CG solves, each warm-started from the last).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..acquisition.operator import StackOperator
from ..volume import Stack, Volume


@dataclass(frozen=True)
class SRRConfig:
    """Options of the classical super-resolution reconstruction."""

    regularization: Literal["tikhonov", "huber"] = "huber"
    """Penalty on the image gradient: tikhonov (smooth) or huber (edge-preserving)."""
    weight: float | None = None
    """Regularisation weight lambda, relative to one stack's data term (dimensionless: the operator rows sum to 1);
    None: set from the noise level estimated in the stacks (:func:`auto_weight`)."""
    huber_delta: float = 0.02
    """Huber threshold on each voxel difference, as a fraction of the 99.5th percentile of the slice values (/mm)."""
    iterations: int = 12
    """Conjugate-gradient iterations per solve."""
    reweightings: int = 3
    """Huber only: number of reweighted solves."""
    nonnegative: bool = True
    """Clip negative intensities at the end."""


#: auto_weight: lambda at the reference relative noise level; calibrated on a Colin27 crop, x4 orthogonal stacks
#: (best lambda 0.02 / 0.05 / 0.2 at 0.5 / 1 / 3 % noise; benchmarks/RESULTS.md, "Regularisation weight").
AUTO_WEIGHT_AT_REFERENCE = 0.05
#: auto_weight: relative noise (estimated sigma / 99.5th percentile of the slice values) of that reference.
AUTO_WEIGHT_REFERENCE_NOISE = 0.011
#: auto_weight: lambda grows as (relative noise) ** this.
AUTO_WEIGHT_EXPONENT = 1.4
#: auto_weight: bounds on lambda.
AUTO_WEIGHT_RANGE = (0.005, 1.0)


def intensity_scale(stacks: list[Stack]) -> float:
    """99.5th percentile of all slice values: the intensity unit of the regulariser's thresholds."""
    return float(np.percentile(np.concatenate([s.data.ravel() for s in stacks]), 99.5)) or 1.0


def auto_weight(stacks: list[Stack]) -> float:
    """Regularisation weight from the noise level: median Immerkaer sigma of the stacks over the intensity scale."""
    from ..metrics import estimate_noise_sigma

    relative = float(np.median([estimate_noise_sigma(s.data) for s in stacks])) / intensity_scale(stacks)
    lam = AUTO_WEIGHT_AT_REFERENCE * (relative / AUTO_WEIGHT_REFERENCE_NOISE) ** AUTO_WEIGHT_EXPONENT
    return float(np.clip(lam, *AUTO_WEIGHT_RANGE))


def _weighted_in(stacks: list[Stack], slice_weights: Sequence[np.ndarray]) -> list[Stack]:
    """The stacks restricted to their slices of positive weight (stacks with none are dropped)."""
    from dataclasses import replace

    out = []
    for s, w in zip(stacks, slice_weights, strict=True):
        keep = np.asarray(w) > 0
        if keep.any():
            mask = None if s.mask is None else s.mask[keep]
            out.append(replace(s, data=s.data[keep], slice_to_world=s.slice_to_world[keep], mask=mask))
    return out or stacks


def _gradient(x: np.ndarray) -> list[np.ndarray]:
    """Forward differences along each axis (zero at the far boundary), voxel units."""
    out = []
    for a in range(3):
        g = np.zeros_like(x)
        sl = [slice(None)] * 3
        sl[a] = slice(0, -1)
        g[tuple(sl)] = np.diff(x, axis=a)
        out.append(g)
    return out


def _divergence_adjoint(gs: list[np.ndarray]) -> np.ndarray:
    """Adjoint of :func:`_gradient` (that is, minus the divergence)."""
    out = np.zeros_like(gs[0])
    for a, g in enumerate(gs):
        sl_lo = [slice(None)] * 3
        sl_hi = [slice(None)] * 3
        sl_lo[a] = slice(0, -1)
        sl_hi[a] = slice(1, None)
        out[tuple(sl_lo)] -= g[tuple(sl_lo)]
        out[tuple(sl_hi)] += g[tuple(sl_lo)]
    return out


def srr(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: SRRConfig = SRRConfig(),
    init: np.ndarray | None = None,
    operators: list[StackOperator] | None = None,
    progress: Callable[[int, int], None] | None = None,
    slice_weights: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Reconstruct the volume on ``grid`` (shape and affine, world mm RAS) from ``stacks``; ``grid.shape`` float32.

    init: starting volume (e.g. the B-spline average); zeros otherwise.
    operators: prebuilt forward operators for these stacks on this grid (built here when omitted).
    progress: called as ``progress(done, total)`` after each CG iteration.
    slice_weights: per stack, ``(n_slices,)`` non-negative weight of each slice in the data term (0 leaves a slice
    out, e.g. an outlier); multiplies the stack's mask.
    """
    if operators is None:
        operators = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
    masks = [np.ones(s.data.shape, np.float32) if s.mask is None else s.mask.astype(np.float32) for s in stacks]
    if slice_weights is not None:
        if len(slice_weights) != len(stacks):
            raise ValueError(f"{len(slice_weights)} slice-weight arrays for {len(stacks)} stacks")
        masks = [m * np.asarray(w, np.float32)[:, None, None] for m, w in zip(masks, slice_weights, strict=True)]
    rhs = sum(op.adjoint(m * s.data) for op, s, m in zip(operators, stacks, masks, strict=True))
    kept = stacks if slice_weights is None else _weighted_in(stacks, slice_weights)  # the intensity unit and noise
    delta = config.huber_delta * intensity_scale(kept)  # level come from the slices that count
    lam = np.float32(auto_weight(kept) if config.weight is None else config.weight)
    solves = config.reweightings if config.regularization == "huber" else 1
    total = solves * config.iterations
    x = np.zeros(grid.shape, np.float32) if init is None else np.array(init, np.float32)
    done = 0
    for _ in range(solves):
        if config.regularization == "huber":
            # one weight per edge (per axis difference): invariant to flips and permutations of the array axes
            ws = [np.minimum(1.0, delta / np.maximum(np.abs(g), 1e-12)).astype(np.float32) for g in _gradient(x)]
        else:
            ws = [np.float32(1.0)] * 3

        def normal(v: np.ndarray, ws=ws) -> np.ndarray:
            data = sum(op.adjoint(m * op.forward(v)) for op, m in zip(operators, masks, strict=True))
            return data + lam * _divergence_adjoint([w * g for w, g in zip(ws, _gradient(v), strict=True)])

        r = rhs - normal(x)
        p = r.copy()
        rr = float(np.vdot(r, r))
        for _ in range(config.iterations):
            ap = normal(p)
            alpha = rr / max(float(np.vdot(p, ap)), 1e-30)
            x += np.float32(alpha) * p
            r -= np.float32(alpha) * ap
            rr_new = float(np.vdot(r, r))
            p = r + np.float32(rr_new / max(rr, 1e-30)) * p
            rr = rr_new
            done += 1
            if progress is not None:
                progress(done, total)
    if config.nonnegative:
        np.maximum(x, 0.0, out=x)
    return x
