"""Rendering views of a Volume or of any field along camera rays: DRR, MIP and emission-absorption.

Rays (world mm RAS, :meth:`Camera.rays`) are clipped to the object's box and sampled every ``step_mm`` with the
midpoint rule; a Volume is read with trilinear interpolation (``torch.nn.functional.grid_sample``, zero outside
the grid), a field is called on world mm positions. Modes (per ray, samples ``f_k`` at segment lengths ``w_k`` mm):

- ``drr``: the line integral ``sum_k f_k w_k`` (intensity x mm), what an X-ray of an attenuation map measures;
- ``mip``: ``max_k f_k`` (intensity; 0 for a ray that misses the object);
- ``emission``: emission-absorption volume rendering with density ``sigma_k = absorption_per_mm * max(f_k, 0) /
  scale`` and emitted value ``c_k = f_k / scale``: ``sum_k T_k (1 - exp(-sigma_k w_k)) c_k`` with
  ``T_k = exp(-sum_{j<k} sigma_j w_j)`` (dimensionless, in units of ``scale``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..volume import Volume
from .cameras import Camera

Mode = Literal["drr", "mip", "emission"]
MODES: tuple[str, ...] = ("drr", "mip", "emission")

#: Rays marched at once (bounds memory: rays x samples x 3 float32).
RAY_CHUNK = 4096
#: Percentile of the foreground intensities used as the emission mode's default ``scale``.
EMISSION_SCALE_PERCENTILE = 99.5

#: A field: world mm RAS positions ``(N, 3)`` float64 -> values ``(N,)``.
Field = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RenderConfig:
    """How rays are sampled and turned into pixel values."""

    mode: Mode = "drr"
    """drr (line integrals), mip (maximum intensity) or emission (emission-absorption)."""
    step_mm: float | None = None
    """Distance between samples along a ray (mm); None: half the smallest voxel size (1 mm for a field)."""
    absorption_per_mm: float = 0.05
    """emission mode: density per mm at intensity ``scale``."""
    scale: float | None = None
    """emission mode: intensity mapped to 1; None: the 99.5th percentile of the Volume's non-zero voxels."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.step_mm is not None and not self.step_mm > 0:
            raise ValueError(f"step_mm must be > 0, got {self.step_mm}")


def clip_rays(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit ray parameters of the box ``[lo, hi]`` for rays ``o + t d`` (all in the box frame)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        ta = (lo - o) * inv
        tb = (hi - o) * inv
    tmin = np.where(np.isnan(ta), -np.inf, np.minimum(ta, tb))
    tmax = np.where(np.isnan(ta), np.inf, np.maximum(ta, tb))
    # A ray parallel to a slab (d = 0) is inside it for all t if o is between the planes, else never.
    par = d == 0
    inside = (o >= lo) & (o <= hi)
    tmin = np.where(par, np.where(inside, -np.inf, np.inf), tmin)
    tmax = np.where(par, np.where(inside, np.inf, -np.inf), tmax)
    return tmin.max(axis=-1), tmax.min(axis=-1)


def march(
    origins: np.ndarray,
    dirs: np.ndarray,
    *,
    world_to_box: np.ndarray,
    box_lo: np.ndarray,
    box_hi: np.ndarray,
    sample_box: Callable[[np.ndarray], np.ndarray],
    step_mm: float,
    mode: Mode,
    forward_only: bool,
    absorption_per_mm: float = 0.05,
    scale: float = 1.0,
) -> np.ndarray:
    """Render rays ``(R, 3)`` world mm RAS (unit ``dirs``) through an object living in a box frame.

    world_to_box: ``(4, 4)`` world mm -> box frame (voxel indices for a Volume, world mm for a field); the box is
    ``[box_lo, box_hi]`` there. sample_box: box-frame positions ``(N, 3)`` -> values ``(N,)``. forward_only: clip
    ``t >= 0`` (cone rays start at the source). Returns ``(R,)`` float64.
    """
    m = np.asarray(world_to_box, dtype=np.float64)
    out = np.zeros(len(origins), dtype=np.float64)
    for s in range(0, len(origins), RAY_CHUNK):
        o = origins[s : s + RAY_CHUNK]
        d = dirs[s : s + RAY_CHUNK]
        ob = o @ m[:3, :3].T + m[:3, 3]
        db = d @ m[:3, :3].T
        t0, t1 = clip_rays(ob, db, box_lo, box_hi)
        if forward_only:
            t0 = np.maximum(t0, 0.0)
        hit = t1 > t0
        if not hit.any():
            continue
        idx = np.flatnonzero(hit)
        t0, t1 = t0[idx], t1[idx]
        n = int(np.ceil((t1 - t0).max() / step_mm))
        k = np.arange(n)
        start = t0[:, None] + k[None] * step_mm
        w = np.clip(t1[:, None] - start, 0.0, step_mm)  # segment lengths (mm), 0 past the exit
        t = start + 0.5 * w
        pts = ob[idx, None, :] + t[..., None] * db[idx, None, :]
        f = sample_box(pts.reshape(-1, 3)).reshape(t.shape).astype(np.float64)
        valid = w > 0
        if mode == "drr":
            val = (f * w).sum(axis=1)
        elif mode == "mip":
            val = np.where(valid, f, -np.inf).max(axis=1)
        else:
            sigma = absorption_per_mm * np.maximum(f, 0.0) / scale
            tau = sigma * w
            trans = np.exp(-(np.cumsum(tau, axis=1) - tau))
            val = (trans * (1.0 - np.exp(-tau)) * (f / scale)).sum(axis=1)
        out[s + idx] = val
    return out


def volume_sampler(volume: Volume) -> Callable[[np.ndarray], np.ndarray]:
    """Trilinear reader of ``volume`` at voxel-index positions ``(N, 3)`` (zero outside the grid)."""
    import torch
    import torch.nn.functional as F

    data = torch.from_numpy(np.ascontiguousarray(volume.data, dtype=np.float32))[None, None]
    size = np.maximum(np.array(volume.shape, dtype=np.float64) - 1.0, 1.0)

    def sample(ijk: np.ndarray) -> np.ndarray:
        g = (2.0 * ijk / size - 1.0)[:, ::-1].astype(np.float32)  # grid_sample wants (k, j, i) for (X, Y, Z)
        grid = torch.from_numpy(np.ascontiguousarray(g)).view(1, -1, 1, 1, 3)
        with torch.no_grad():
            v = F.grid_sample(data, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return v.view(-1).numpy()

    return sample


def emission_scale(volume: Volume) -> float:
    """The emission mode's default ``scale``: 99.5th percentile of the non-zero voxels (1 if there are none)."""
    nz = volume.data[volume.data != 0]
    return float(np.percentile(nz, EMISSION_SCALE_PERCENTILE)) if nz.size else 1.0


def render_volume(volume: Volume, cameras: Sequence[Camera], config: RenderConfig = RenderConfig()) -> np.ndarray:
    """Views of a Volume, ``(n_views, H, W)`` float32 (units: see the module docstring)."""
    step = config.step_mm if config.step_mm is not None else 0.5 * float(volume.spacing.min())
    scale = config.scale if config.scale is not None else emission_scale(volume)
    sampler = volume_sampler(volume)
    # The box frame is voxel indices; rays are clipped to the non-zero voxels (plus one voxel), the rest is 0.
    nz = np.argwhere(volume.data != 0)
    top = np.array(volume.shape, dtype=np.float64) - 1.0
    if len(nz) == 0:
        return np.zeros((len(cameras), cameras[0].height, cameras[0].width), np.float32) if cameras else np.zeros(0)
    lo = np.maximum(nz.min(axis=0) - 1.0, 0.0)
    hi = np.minimum(nz.max(axis=0) + 1.0, top)
    return _render(cameras, np.linalg.inv(volume.affine), lo, hi, sampler, step, config, scale)


def render_field(
    field: Field,
    cameras: Sequence[Camera],
    *,
    bounds_mm: tuple[Sequence[float], Sequence[float]],
    config: RenderConfig = RenderConfig(),
) -> np.ndarray:
    """Views of a field (callable: world mm RAS ``(N, 3)`` -> ``(N,)``), ``(n_views, H, W)`` float32.

    bounds_mm: ``(lo, hi)`` world mm RAS corners of the axis-aligned box outside which the field is taken as 0.
    For ``emission`` mode ``config.scale`` is required (there is no volume to take a percentile of).
    """
    if config.mode == "emission" and config.scale is None:
        raise ValueError("emission rendering of a field needs config.scale (the intensity mapped to 1)")
    step = config.step_mm if config.step_mm is not None else 1.0
    lo, hi = (np.asarray(b, dtype=np.float64) for b in bounds_mm)

    def sample(xyz: np.ndarray) -> np.ndarray:
        return np.asarray(field(xyz), dtype=np.float64).reshape(-1)

    return _render(cameras, np.eye(4), lo, hi, sample, step, config, config.scale or 1.0)


def _render(cameras, world_to_box, lo, hi, sample, step, config: RenderConfig, scale: float) -> np.ndarray:
    """Each camera's image ``(H, W)``; the ray parameter (and ``step``) is world mm along the unit world direction,
    whatever the box frame's scale (see :func:`march`)."""
    out = []
    for cam in cameras:
        o, d = cam.rays()
        val = march(
            o.reshape(-1, 3),
            d.reshape(-1, 3),
            world_to_box=world_to_box,
            box_lo=lo,
            box_hi=hi,
            sample_box=sample,
            step_mm=step,
            mode=config.mode,
            forward_only=cam.projection == "cone",
            absorption_per_mm=config.absorption_per_mm,
            scale=scale,
        )
        out.append(val.reshape(cam.height, cam.width))
    return np.stack(out).astype(np.float32)


def model_field(model, frame, scale: float) -> Field:
    """A fitted slicefield representation (``fit.engine.load_model``'s model, frame, scale) as a Field."""
    import torch

    def field(xyz: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = frame.normalise(torch.as_tensor(xyz, dtype=torch.float32))
            return model(u).reshape(-1).numpy() * scale

    return field
