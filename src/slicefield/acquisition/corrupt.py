"""Corrupted slices for simulations: artefacts that no rigid motion or intensity scale explains.

Like the rest of the simulator, a random draw (:func:`sample_corruptions`) fills a JSON-serialisable record, and
:func:`apply_corruption` applies it deterministically. Kinds, each on one whole 2D slice ``(ni, nj)``:

- ``"dropout"``: signal loss in a band: values multiplied by ``1 - depth * exp(-u^2 / (2 width^2))``, with ``u``
  the in-plane distance (as a fraction of the slice diagonal) from a line through the slice at ``angle_deg``.
- ``"stripes"``: additive sinusoidal stripes ``amplitude * max * sin(2 pi u / period_px + phase)`` over the whole
  slice (``u`` in pixels across the stripes), as from a spike in k-space.
- ``"ghost"``: an additive copy of the slice shifted by half the field of view along in-plane axis ``axis``
  (wrapped), times ``strength``: a Nyquist ghost.

Amplitudes are relative to ``intensity_max`` (the simulated volume's maximum), as the simulator's noise is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ..geometry import apply_affine
from ..volume import Stack, Volume

#: Artefact kinds that :func:`apply_corruption` knows.
CORRUPTION_KINDS: tuple[str, ...] = ("dropout", "stripes", "ghost")
#: A slice is eligible for corruption when at least this fraction of its pixels lie in the object (the volume's
#: automatic foreground), so that an artefact on an empty slice, harmless and undetectable, is not counted.
MIN_OBJECT_FRACTION = 0.1

#: Ranges (uniform) of each kind's random parameters.
DROPOUT_DEPTH = (0.6, 0.9)
DROPOUT_WIDTH = (0.12, 0.25)
STRIPES_AMPLITUDE = (0.08, 0.15)
STRIPES_PERIOD_PX = (3.0, 8.0)
GHOST_STRENGTH = (0.3, 0.6)


def sample_corruptions(
    rng: np.random.Generator, object_fraction: np.ndarray, *, fraction: float
) -> list[dict[str, Any]]:
    """Draw which slices of one stack are corrupted and how.

    object_fraction: ``(n_slices,)`` fraction of each slice's pixels inside the object (motion-free geometry).
    fraction: share of the stack's slices to corrupt; ``round(fraction * n_slices)`` slices are drawn without
    replacement among those with ``object_fraction >= MIN_OBJECT_FRACTION`` (all slices if too few qualify).
    Returns ``[{"slice": int, "kind": str, "params": {...}}, ...]`` sorted by slice.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corrupted-slice fraction must be in [0, 1], got {fraction}")
    n = len(object_fraction)
    count = int(round(fraction * n))
    if count == 0:
        return []
    candidates = np.flatnonzero(np.asarray(object_fraction) >= MIN_OBJECT_FRACTION)
    if len(candidates) < count:
        candidates = np.arange(n)
    chosen = np.sort(rng.choice(candidates, size=count, replace=False))
    out = []
    for s in chosen:
        kind = CORRUPTION_KINDS[int(rng.integers(len(CORRUPTION_KINDS)))]
        if kind == "dropout":
            params = {
                "angle_deg": float(rng.uniform(0.0, 180.0)),
                "offset": float(rng.uniform(-0.15, 0.15)),
                "width": float(rng.uniform(*DROPOUT_WIDTH)),
                "depth": float(rng.uniform(*DROPOUT_DEPTH)),
            }
        elif kind == "stripes":
            params = {
                "angle_deg": float(rng.uniform(0.0, 180.0)),
                "period_px": float(rng.uniform(*STRIPES_PERIOD_PX)),
                "phase": float(rng.uniform(0.0, 2 * np.pi)),
                "amplitude": float(rng.uniform(*STRIPES_AMPLITUDE)),
            }
        else:
            params = {"axis": int(rng.integers(2)), "strength": float(rng.uniform(*GHOST_STRENGTH))}
        out.append({"slice": int(s), "kind": kind, "params": params})
    return out


def apply_corruption(values: np.ndarray, corruption: dict[str, Any], *, intensity_max: float) -> np.ndarray:
    """One slice ``(ni, nj)`` with the artefact a record entry describes (deterministic); float32."""
    v = np.asarray(values, dtype=np.float64)
    ni, nj = v.shape
    kind, p = corruption["kind"], corruption["params"]
    i, j = np.meshgrid(np.arange(ni) - (ni - 1) / 2, np.arange(nj) - (nj - 1) / 2, indexing="ij")
    if kind in ("dropout", "stripes"):
        a = np.radians(p["angle_deg"])
        u = i * np.cos(a) + j * np.sin(a)  # pixels across the band / stripes
    if kind == "dropout":
        diag = float(np.hypot(ni, nj))
        d = u / diag - p["offset"]
        out = v * (1.0 - p["depth"] * np.exp(-0.5 * (d / p["width"]) ** 2))
    elif kind == "stripes":
        out = v + p["amplitude"] * intensity_max * np.sin(2 * np.pi * u / p["period_px"] + p["phase"])
    elif kind == "ghost":
        axis = int(p["axis"])
        out = v + p["strength"] * np.roll(v, v.shape[axis] // 2, axis=axis)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}; use one of {', '.join(CORRUPTION_KINDS)}")
    return out.astype(np.float32)


def object_fraction(volume: Volume, stack: Stack, *, stride: int = 2) -> np.ndarray:
    """``(n_slices,)``: fraction of each slice's pixel centres (every ``stride``-th pixel along each in-plane axis,
    at the stack's poses, world mm RAS) inside the volume's automatic foreground
    (:func:`~slicefield.metrics.foreground_mask`, the brain mask of the benchmarks), nearest voxel."""
    from ..metrics import foreground_mask

    inside = foreground_mask(volume.data).astype(np.float32)
    world_to_vox = np.linalg.inv(volume.affine)
    out = np.zeros(stack.n_slices)
    for s in range(stack.n_slices):
        pts = apply_affine(world_to_vox, stack.pixel_world(s)[::stride, ::stride])
        vals = ndimage.map_coordinates(inside, np.moveaxis(pts, -1, 0), order=0, mode="grid-constant", cval=0.0)
        out[s] = float(np.mean(vals > 0.5))
    return out
