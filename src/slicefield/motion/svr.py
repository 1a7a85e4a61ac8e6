"""Motion-corrected reconstruction: super-resolution reconstruction alternated with slice-to-volume registration.

Pipeline (:func:`reconstruct_with_motion`), every step optional through :class:`MotionConfig`:

1. **Bias field**: N4 on each stack (:mod:`~slicefield.motion.bias`).
2. **Stack-to-stack**: rigid registration of every stack to a reference stack (:mod:`~slicefield.motion.register`).
3. **Rounds, coarse to fine** (:class:`SVRLevel`): reconstruct with ``srr`` on the round's grid (current poses,
   per-slice weights and intensity scales), then register every group of slices to that volume through the fast
   twin of the forward model (:mod:`~slicefield.motion.slice_to_volume`; a group is a slice, an interleaved
   package, or a whole stack with ``mode="stack"``), then score every slice against the volume at its new pose.
4. **Robust weights**: per slice, the RMS residual ``c p - y`` over the slice's foreground (``p`` the prediction,
   ``c`` the least-squares intensity scale) gets a robust z-score against its neighbours in the stack
   (:func:`outlier_z`); slices above ``outlier_z`` are flagged and, with ``reject_outliers``, left out of the next
   reconstruction (weight 0). Intensity scales ``c`` (normalised to median 1) divide the
   slice values in every reconstruction when ``intensity_scaling`` is on.
5. **Final reconstruction** on the target grid with the final poses, weights and scales.

Poses are ``slice_to_world`` (slice frame mm -> world mm RAS). Reported per-slice transforms are world -> world
(mm RAS) maps from the header pose to the corrected one: ``corrected = T @ header``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from ..acquisition.operator import StackOperator
from ..baselines.bspline import bspline_average
from ..baselines.srr import SRRConfig, srr
from ..errors import SlicefieldError
from ..geometry import bounding_grid, voxel_spacing
from ..itk import resample
from ..volume import Stack, Volume
from .bias import BiasFieldConfig, correct_bias_field
from .masks import stack_foreground
from .register import RegistrationConfig, StackTransform, register_stacks
from .slice_to_volume import (
    INTENSITY_SCALE_RANGE,
    BlurredVolume,
    SliceRegistrationConfig,
    ThroughPlaneProfile,
    pixel_coordinates,
    predict,
    register_group,
    through_plane_profile,
)
from .transforms import describe, rigid_about, slice_center

log = logging.getLogger(__name__)

MotionMode = Literal["none", "stack", "slice"]
MOTION_MODES: tuple[str, ...] = ("none", "stack", "slice")
#: ``step(name)`` -> a ``(done, total)`` callback for that step, or None (as in ``run_benchmark``).
StepsFn = Callable[[str], Callable[[int, int], None] | None]

#: Robust z-score of a slice's residual above which it is flagged (Iglewicz & Hoaglin's cut).
OUTLIER_Z = 3.5
#: 0.6745 = Phi^-1(0.75): median absolute deviation -> standard deviation for Gaussian data.
MAD_TO_SIGMA = 0.6745
#: Floor of the outlier z-score's scale, as a fraction of the median residual. Once slices are aligned, residuals
#: are mostly noise and their MAD is tiny; with this floor a slice is flagged only when its residual exceeds its
#: neighbours' by more than outlier_z x 25 % of the median (about twice the typical residual).
RELATIVE_SCALE_FLOOR = 0.25


@dataclass(frozen=True)
class SVRLevel:
    """One round of reconstruct -> register."""

    resolution_mm: float | None = None
    """Voxel size (mm) of the round's reconstruction grid (RAS-aligned, over the target grid's field of view);
    None: the target grid itself."""
    blur_mm: float = 0.0
    """Extra smoothing (Gaussian sigma, mm) of volume and slices while registering: wider capture, less detail."""
    stride: int = 2
    """Register on every stride-th pixel along each in-plane axis."""
    starts_mm: tuple[float, ...] = ()
    """Extra starts along each slice's normal (mm) for this round's registration (wider capture range)."""


#: Default rounds: ten on a 2 mm grid, smoothed and with extra starts through the plane first, then two on the
#: target grid (chosen on Colin27 with +-5 deg / +-5 mm per-slice motion; the first two, with 6 and 4 mm of blur
#: and starts up to 8 mm, widen the capture range for +-10 deg / +-10 mm; benchmarks/RESULTS.md).
DEFAULT_LEVELS: tuple[SVRLevel, ...] = (
    SVRLevel(resolution_mm=2.0, blur_mm=6.0, stride=2, starts_mm=(-8.0, -4.0, 4.0, 8.0)),
    SVRLevel(resolution_mm=2.0, blur_mm=4.0, stride=2, starts_mm=(-6.0, -3.0, 3.0, 6.0)),
    SVRLevel(resolution_mm=2.0, blur_mm=3.0, stride=2, starts_mm=(-6.0, -3.0, 3.0, 6.0)),
    SVRLevel(resolution_mm=2.0, blur_mm=2.0, stride=2, starts_mm=(-3.0, 3.0)),
    SVRLevel(resolution_mm=2.0, blur_mm=1.0, stride=2),
    SVRLevel(resolution_mm=2.0, blur_mm=0.5, stride=2),
    *(SVRLevel(resolution_mm=2.0, blur_mm=0.0, stride=2) for _ in range(4)),
    SVRLevel(resolution_mm=None, blur_mm=0.0, stride=2),
    SVRLevel(resolution_mm=None, blur_mm=0.0, stride=2),
)

#: Default rounds of mode stack (whole stacks refined against the reconstruction after the stack registration).
STACK_LEVELS: tuple[SVRLevel, ...] = (
    SVRLevel(resolution_mm=2.0, blur_mm=1.0, stride=2),
    SVRLevel(resolution_mm=None, blur_mm=0.0, stride=2),
)


@dataclass(frozen=True)
class MotionConfig:
    """Options of motion-corrected reconstruction."""

    mode: MotionMode = "slice"
    """none: no registration; stack: each stack moves as one rigid body; slice: every slice (or package) moves."""
    packages: int = 0
    """mode slice: 0 registers each slice on its own; k >= 1 registers k interleaved packages per stack (slices
    i with i % k == p move together)."""
    levels: tuple[SVRLevel, ...] | None = None
    """Rounds of reconstruct -> register, coarse to fine; None: DEFAULT_LEVELS for mode slice, STACK_LEVELS for
    mode stack. Mode none runs only the last one (reconstruct -> score the slices -> reweight), and only with
    reject_outliers."""
    register_stacks: bool = True
    """modes stack and slice: first register every stack to the reference stack (SimpleITK)."""
    reject_outliers: bool = False
    """Leave slices whose residual is far out of line (robust z > outlier_z) out of the reconstruction."""
    outlier_z: float = OUTLIER_Z
    """Robust z-score of a slice's RMS residual, against its neighbours in the stack, above which it is flagged
    (:func:`outlier_z`)."""
    outlier_window: int = 2
    """Neighbours on each side that a slice's residual is compared with."""
    intensity_scaling: bool = True
    """Fit and divide out a per-slice intensity scale."""
    bias_field: bool = False
    """Correct each stack's bias field (N4) first."""
    anchor_mean: bool = True
    """mode slice: after each round, undo the mean correction of all registered slices relative to their header
    poses (stack registration included), i.e. put the reconstruction where the headers put the head on average.
    The data alone cannot tell a rigid drift of the whole reconstruction."""
    mask_margin_mm: float = 8.0
    """The automatic foreground of each stack, dilated in-plane by this (mm), is where slices are registered
    and scored."""
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    """Stack-to-stack registration options."""
    slices: SliceRegistrationConfig = field(default_factory=SliceRegistrationConfig)
    """Slice-to-volume registration options (each level overrides blur_mm and stride)."""
    bias: BiasFieldConfig = field(default_factory=BiasFieldConfig)
    """N4 options."""
    round_iterations: int = 8
    """CG iterations per solve of the reconstructions inside the rounds (warm-started; the final one uses the
    srr options as given)."""
    round_reweightings: int = 2
    """Huber reweightings of the reconstructions inside the rounds."""
    workers: int | None = None
    """Threads registering slices in parallel; default the CPU count."""


@dataclass
class SliceMotion:
    """Per-slice outcome for one stack.

    header_poses, poses: ``(n, 4, 4)`` slice frame mm -> world mm RAS, as read and as corrected.
    transforms: ``(n, 4, 4)`` world mm RAS -> world mm RAS, ``poses = transforms @ header_poses``.
    weights: ``(n,)`` weight in the final reconstruction (0 = excluded). scales: ``(n,)`` intensity scale
    (``y ~ scale * prediction``; the reconstruction used ``y / scale``). residual: ``(n,)`` RMS residual over the
    slice's foreground (stack units); z: its robust z-score against neighbouring slices (:func:`outlier_z`);
    flagged: slices with ``z > outlier_z``; registered: ``(n,)`` False where the slice was left at its previous
    pose in the last round; pixels: ``(n,)`` foreground pixels scored.
    """

    name: str
    header_poses: np.ndarray
    poses: np.ndarray
    weights: np.ndarray
    scales: np.ndarray
    residual: np.ndarray
    z: np.ndarray
    flagged: list[int]
    registered: np.ndarray
    pixels: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def transforms(self) -> np.ndarray:
        return self.poses @ np.linalg.inv(self.header_poses)

    def to_json(self) -> dict[str, Any]:
        center = slice_center(self.spacing, self.shape)
        slices = []
        for s in range(len(self.poses)):
            c_world = self.header_poses[s, :3, :3] @ center + self.header_poses[s, :3, 3]
            slices.append(
                {
                    "slice": s,
                    "world_to_world": self.transforms[s].tolist(),
                    "slice_to_world": self.poses[s].tolist(),
                    **describe(self.transforms[s], c_world),
                    "weight": float(self.weights[s]),
                    "scale": float(self.scales[s]),
                    "residual": float(self.residual[s]),
                    **{k: float(v[s]) for k, v in self.extra.items()},
                    "z": float(self.z[s]),
                    "flagged": s in self.flagged,
                    "registered": bool(self.registered[s]),
                    "pixels": int(self.pixels[s]),
                }
            )
        return {"name": self.name, "flagged": self.flagged, "slices": slices}


@dataclass
class MotionResult:
    """What :func:`reconstruct_with_motion` found: the volume, corrected stacks and per-slice records."""

    volume: Volume
    stacks: list[Stack]
    """The input stacks with corrected poses (values bias-corrected when asked, not intensity-scaled)."""
    slices: list[SliceMotion]
    stack_transforms: list[StackTransform]
    rounds: list[dict[str, Any]]
    config: MotionConfig

    @property
    def flagged(self) -> list[tuple[str, int]]:
        return [(m.name, s) for m in self.slices for s in m.flagged]

    def to_json(self) -> dict[str, Any]:
        return {
            "frames": (
                "slice_to_world: slice frame mm -> world mm RAS; world_to_world: world mm RAS -> world mm RAS, "
                "corrected slice_to_world = world_to_world @ header slice_to_world; angles_deg: about world x, y, z "
                "(R = Rz Ry Rx); shift_mm: displacement of the slice centre"
            ),
            "mode": self.config.mode,
            "reject_outliers": self.config.reject_outliers,
            "outlier_z": self.config.outlier_z,
            "flagged": [{"stack": n, "slice": s} for n, s in self.flagged],
            "stack_transforms": [t.to_json() for t in self.stack_transforms],
            "stacks": [m.to_json() for m in self.slices],
            "rounds": self.rounds,
        }


def level_grid(grid: Volume, resolution_mm: float | None) -> Volume:
    """The grid of a round: ``grid`` itself, or a RAS-aligned grid of ``resolution_mm`` voxels over its extent."""
    if resolution_mm is None or resolution_mm <= float(np.max(voxel_spacing(grid.affine))) + 1e-6:
        return grid
    shape, affine = bounding_grid(grid.world_corners(), resolution_mm)
    return Volume(np.zeros(shape, np.float32), affine)


def slice_groups(stack: Stack, *, mode: MotionMode, packages: int) -> list[np.ndarray]:
    """Slices of one stack that move together: one group per slice, per interleaved package, or the whole stack."""
    n = stack.n_slices
    if mode == "stack":
        return [np.arange(n)]
    if packages >= 1:
        return [np.arange(p, n, packages) for p in range(min(packages, n))]
    return [np.array([s]) for s in range(n)]


def downsample_inplane(stack: Stack, factor: int) -> Stack:
    """The stack with ``factor`` x ``factor`` pixel blocks averaged (trailing pixels that fill no block dropped).

    Poses move so that the new pixel (0, 0) sits at the centre of its block (slice frame mm); the PSF kind and
    thickness are kept (the in-plane PSF of the coarser pixels is then the model's, an approximation that the
    coarse rounds of motion correction tolerate). Used to make coarse reconstructions cheap.
    """
    if factor <= 1:
        return stack
    n, ni, nj = stack.data.shape
    mi, mj = max(1, ni // factor), max(1, nj // factor)
    fi, fj = min(factor, ni), min(factor, nj)
    blocks = stack.data[:, : mi * fi, : mj * fj].reshape(n, mi, fi, mj, fj).mean(axis=(2, 4))
    shift = np.array([(fi - 1) * stack.spacing[0] / 2.0, (fj - 1) * stack.spacing[1] / 2.0])
    poses = stack.slice_to_world.copy()
    poses[:, :3, 3] += poses[:, :3, 0] * shift[0] + poses[:, :3, 1] * shift[1]
    mask = None
    if stack.mask is not None:
        mask = stack.mask[:, : mi * fi, : mj * fj].reshape(n, mi, fi, mj, fj).any(axis=(2, 4))
    return replace(
        stack,
        data=blocks.astype(np.float32),
        slice_to_world=poses,
        spacing=(stack.spacing[0] * fi, stack.spacing[1] * fj),
        mask=mask,
        meta=dict(stack.meta),
    )


def _map(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


class _Samplers:
    """One BlurredVolume per (isotropic sigma) needed by the stacks' PSFs at one blur level."""

    def __init__(self, volume: Volume, profiles: list[ThroughPlaneProfile], blur_mm: float):
        self._by_sigma: dict[float, BlurredVolume] = {}
        self.samplers = []
        for p in profiles:
            sigma = round(float(np.sqrt(p.isotropic_sigma_mm**2 + blur_mm**2)), 4)
            if sigma not in self._by_sigma:
                self._by_sigma[sigma] = BlurredVolume(volume, sigma_mm=sigma)
            self.samplers.append(self._by_sigma[sigma])


def score_slices(
    stacks: list[Stack],
    volume: Volume,
    masks: list[np.ndarray],
    *,
    min_pixels: int,
) -> list[dict[str, np.ndarray]]:
    """Per stack: ``residual`` (relative), ``scale`` and ``pixels`` of every slice against ``volume`` (fast twin).

    masks: per stack, bool ``(n, ni, nj)`` pixels scored. residual = ``||c p - y|| / ||y||`` with ``p`` the
    predicted and ``y`` the measured values, ``c = <p, y> / <p, p>`` (clipped). Slices with fewer than
    ``min_pixels`` pixels get residual NaN and scale 1.
    """
    step = float(np.min(voxel_spacing(volume.affine)))
    profiles = [through_plane_profile(s, step_mm=step) for s in stacks]
    samplers = _Samplers(volume, profiles, 0.0).samplers
    out = []
    for stack, mask, profile, sampler in zip(stacks, masks, profiles, samplers, strict=True):
        pix = pixel_coordinates(stack, mask, stride=1)
        res = np.full(stack.n_slices, np.nan)
        rms = np.full(stack.n_slices, np.nan)
        ncc = np.full(stack.n_slices, np.nan)
        scale = np.ones(stack.n_slices)
        count = np.array([len(ij) for ij, _ in pix])
        for s, (ij, xy) in enumerate(pix):
            if len(ij) < min_pixels:
                continue
            y = stack.data[s][ij[:, 0], ij[:, 1]].astype(np.float64)
            p, _ = predict(sampler, stack.slice_to_world[s], xy, profile)
            pp = float(p @ p)
            c = float(np.clip(float(p @ y) / pp, *INTENSITY_SCALE_RANGE)) if pp > 0 else 1.0
            yy = float(y @ y)
            res[s] = float(np.linalg.norm(c * p - y) / np.sqrt(yy)) if yy > 0 else np.nan
            rms[s] = float(np.sqrt(np.mean((c * p - y) ** 2)))
            ncc[s] = float(np.corrcoef(p, y)[0, 1])
            scale[s] = c
        out.append({"residual": res, "rms": rms, "ncc": ncc, "scale": scale, "pixels": count})
    return out


def _anchor(poses: list[np.ndarray], start: list[np.ndarray], registered: list[np.ndarray]) -> list[np.ndarray]:
    """Poses with the mean world -> world correction (relative to ``start``, over registered slices) undone.

    The mean is the mean rotation vector and the mean displacement of the centre of all slices (world mm RAS).
    """
    from scipy.spatial.transform import Rotation

    corr = np.concatenate([p[r] @ np.linalg.inv(s0[r]) for p, s0, r in zip(poses, start, registered, strict=True)])
    if len(corr) == 0:
        return poses
    center = np.concatenate([s0[:, :3, 3] for s0 in start]).mean(axis=0)
    omega = Rotation.from_matrix(corr[:, :3, :3]).as_rotvec().mean(axis=0)
    shift = (corr[:, :3, :3] @ center + corr[:, :3, 3] - center).mean(axis=0)
    undo = np.linalg.inv(rigid_about(omega, shift, center))
    return [undo[None] @ p for p in poses]


def _factor(stack: Stack, voxel_mm: float) -> int:
    """In-plane downsampling factor of a stack for a reconstruction grid of ``voxel_mm`` voxels (>= 1)."""
    return max(1, int(np.floor(voxel_mm / float(np.min(stack.spacing)) + 1e-6)))


def outlier_z(values: np.ndarray, *, window: int = 2) -> np.ndarray:
    """Robust z-scores ``(n,)`` of per-slice residuals ``(n,)`` (NaN: not scored, z 0) against their neighbours.

    Each slice is compared with the median of the scored slices within ``window`` of it (itself excluded), so the
    smooth rise of the residual towards the ends of a stack (less anatomy, more partial volume) is not mistaken for
    an artefact; the differences are then scaled by their median absolute deviation (``/ 0.6745``, Iglewicz &
    Hoaglin), floored at ``RELATIVE_SCALE_FLOOR`` x the median residual. Fewer than 3 scored slices: all 0.
    """
    x = np.asarray(values, dtype=np.float64)
    z = np.zeros(len(x))
    ok = np.flatnonzero(np.isfinite(x))
    if len(ok) < 3:
        return z
    xs = x[ok]
    base = np.array([np.median(np.r_[xs[max(0, i - window) : i], xs[i + 1 : i + 1 + window]]) for i in range(len(xs))])
    d = xs - base
    med = float(np.median(d))
    scale = max(float(np.median(np.abs(d - med))) / MAD_TO_SIGMA, RELATIVE_SCALE_FLOOR * float(np.median(xs)))
    if scale > 0:
        z[ok] = (d - med) / scale
    return z


def _robust_flags(residual: np.ndarray, threshold: float, window: int) -> tuple[np.ndarray, list[int]]:
    z = outlier_z(residual, window=window)
    return z, [int(i) for i in np.flatnonzero(z > threshold)]


def reconstruct_with_motion(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: MotionConfig = MotionConfig(),
    srr_config: SRRConfig | None = None,
    method: str = "srr",
    progress: StepsFn | None = None,
) -> MotionResult:
    """Motion-corrected reconstruction of ``stacks`` on ``grid`` (shape + voxel -> world mm RAS affine).

    srr_config: options of every srr reconstruction (default ``SRRConfig()``).
    method: the final reconstruction, ``srr`` or (mode none or stack only, where stacks stay regular grids)
    ``bspline``. See the module docstring for the steps.
    """
    srr_config = SRRConfig() if srr_config is None else srr_config
    if config.mode not in MOTION_MODES:
        raise SlicefieldError(f"unknown motion mode {config.mode!r}", fix=f"use one of {', '.join(MOTION_MODES)}")
    if method not in ("srr", "bspline"):
        raise SlicefieldError(
            f"motion correction reconstructs with srr or bspline, not {method!r}",
            fix="pass --method srr (the neural-field path has no motion correction yet)",
        )
    if method == "bspline" and (config.mode == "slice" or config.reject_outliers):
        raise SlicefieldError(
            "bspline cannot use per-slice poses or weights",
            fix="use --method srr with --motion slice or --reject-outliers",
        )
    if not stacks:
        raise SlicefieldError("no stacks to reconstruct from", fix="pass at least one stack")

    def step(name: str) -> Callable[[int, int], None] | None:
        return progress(name) if progress is not None else None

    header_poses = [s.slice_to_world.copy() for s in stacks]
    current = list(stacks)
    rounds: list[dict[str, Any]] = []
    if config.bias_field:
        cb = step("bias field")
        fixed = []
        for k, s in enumerate(current):
            fixed.append(correct_bias_field(s, config=config.bias)[0])
            if cb is not None:
                cb(k + 1, len(current))
        current = fixed
    stack_transforms: list[StackTransform] = []
    if config.mode in ("stack", "slice") and config.register_stacks and len(current) > 1:
        t0 = time.perf_counter()
        current, stack_transforms = register_stacks(current, config=config.registration, progress=step("stacks"))
        rounds.append({"round": "stacks", "seconds": time.perf_counter() - t0})

    masks = [stack_foreground(s, dilate_mm=config.mask_margin_mm) for s in current]
    n_slices = [s.n_slices for s in current]
    weights = [np.ones(n) for n in n_slices]
    scales = [np.ones(n) for n in n_slices]
    registered = [np.ones(n, dtype=bool) for n in n_slices]
    scores: list[dict[str, np.ndarray]] | None = None
    zs = [np.zeros(n) for n in n_slices]
    flags: list[list[int]] = [[] for _ in n_slices]
    volume: Volume | None = None
    workers = config.workers or os.cpu_count() or 1
    levels = config.levels
    if levels is None:
        levels = STACK_LEVELS if config.mode == "stack" else DEFAULT_LEVELS
    if config.mode == "none":
        levels = levels[-1:] if config.reject_outliers else ()

    round_srr = replace(srr_config, iterations=config.round_iterations, reweightings=config.round_reweightings)

    def reconstruct_on(target: Volume, name: str, srr_options: SRRConfig = srr_config) -> Volume:
        cb = step(name)
        if volume is None:
            try:
                init = bspline_average(current, target)
            except SlicefieldError:
                init = None
        else:
            init = resample(
                volume.data, volume.affine, shape=target.shape, target_affine=target.affine, interpolation="linear"
            )
        voxel = float(np.min(voxel_spacing(target.affine)))
        data = [
            downsample_inplane(s.with_data(s.data / sc[:, None, None].astype(np.float32)), _factor(s, voxel))
            for s, sc in zip(current, scales, strict=True)
        ]
        ops = [StackOperator(s, target.shape, target.affine) for s in data]
        x = srr(data, target, config=srr_options, init=init, operators=ops, progress=cb, slice_weights=weights)
        return Volume(x, target.affine.copy())

    for li, level in enumerate(levels):
        t0 = time.perf_counter()
        target = level_grid(grid, level.resolution_mm)
        volume = reconstruct_on(target, f"round {li + 1}: srr", round_srr)
        t_srr = time.perf_counter() - t0
        moved = 0
        if config.mode in ("stack", "slice"):
            cfg = replace(
                config.slices,
                blur_mm=level.blur_mm,
                stride=level.stride,
                starts_mm=level.starts_mm,
                intensity_scaling=config.intensity_scaling,
            )
            step_mm = float(np.min(voxel_spacing(target.affine)))
            profiles = [through_plane_profile(s, step_mm=step_mm) for s in current]
            samplers = _Samplers(volume, profiles, level.blur_mm).samplers
            jobs = []
            for k, s in enumerate(current):
                stride = level.stride * (2 if config.mode == "stack" else 1)
                pix = pixel_coordinates(s, masks[k], stride=stride)
                data = s.data
                if level.blur_mm > 0:
                    sig = level.blur_mm / np.asarray(s.spacing)
                    data = ndimage.gaussian_filter(data, (0.0, sig[0], sig[1]))
                for g in slice_groups(s, mode=config.mode, packages=config.packages):
                    xy = [pix[i][1] for i in g]
                    vals = [data[i][pix[i][0][:, 0], pix[i][0][:, 1]].astype(np.float64) for i in g]
                    jobs.append((k, g, xy, vals))
            cb = step(f"round {li + 1}: register")
            done = [0]

            poses_now = [s.slice_to_world for s in current]
            n_jobs = len(jobs)

            def run(job, samplers=samplers, profiles=profiles, poses=poses_now, cfg=cfg, cb=cb, n=n_jobs, done=done):
                k, g, xy, vals = job
                fit = register_group(samplers[k], profiles[k], poses[k][g], xy, vals, config=cfg)
                done[0] += 1
                if cb is not None:
                    cb(done[0], n)
                return fit

            fits = _map(run, jobs, workers)
            new_poses = [s.slice_to_world.copy() for s in current]
            for (k, g, _, _), fit in zip(jobs, fits, strict=True):
                new_poses[k][g] = fit.delta[None] @ new_poses[k][g]
                registered[k][g] = fit.registered
                moved += int(fit.registered) * len(g)
            if config.mode == "slice" and config.anchor_mean:
                new_poses = _anchor(new_poses, header_poses, registered)
            current = [replace(s, slice_to_world=p, meta=dict(s.meta)) for s, p in zip(current, new_poses, strict=True)]
        t_reg = time.perf_counter() - t0 - t_srr
        scores = score_slices(current, volume, masks, min_pixels=config.slices.min_pixels)
        for k, sc in enumerate(scores):
            zs[k], flags[k] = _robust_flags(sc["rms"], config.outlier_z, config.outlier_window)
            if config.reject_outliers:
                weights[k] = np.ones(n_slices[k])
                weights[k][flags[k]] = 0.0
        if config.intensity_scaling:
            all_scales = np.concatenate([sc["scale"] for sc in scores])
            norm = float(np.median(all_scales)) or 1.0
            scales = [sc["scale"] / norm for sc in scores]
        rounds.append(
            {
                "round": li + 1,
                "grid_shape": list(target.shape),
                "resolution_mm": float(np.max(voxel_spacing(target.affine))),
                "blur_mm": level.blur_mm,
                "stride": level.stride,
                "srr_seconds": t_srr,
                "register_seconds": t_reg,
                "registered_slices": moved,
                "flagged": int(sum(len(f) for f in flags)),
                "median_relative_residual": float(np.nanmedian(np.concatenate([sc["residual"] for sc in scores]))),
            }
        )
        log.info("motion round %d: %s", li + 1, rounds[-1])

    t0 = time.perf_counter()
    if method == "bspline":
        final = Volume(bspline_average(current, grid, progress=step("bspline")), grid.affine.copy())
    else:
        final = reconstruct_on(grid, "final srr")
    rounds.append({"round": "final", "method": method, "seconds": time.perf_counter() - t0})
    if scores is None:
        scores = score_slices(current, final, masks, min_pixels=config.slices.min_pixels)
        for k, sc in enumerate(scores):
            zs[k], flags[k] = _robust_flags(sc["rms"], config.outlier_z, config.outlier_window)
    records = [
        SliceMotion(
            name=s.name,
            header_poses=h,
            poses=s.slice_to_world.copy(),
            weights=weights[k],
            scales=scales[k],
            residual=scores[k]["rms"],
            z=zs[k],
            flagged=flags[k],
            registered=registered[k],
            pixels=scores[k]["pixels"],
            spacing=s.spacing,
            shape=tuple(s.data.shape[1:]),
            extra={"relative_residual": scores[k]["residual"], "ncc": scores[k]["ncc"]},
        )
        for k, (s, h) in enumerate(zip(current, header_poses, strict=True))
    ]
    return MotionResult(final, current, records, stack_transforms, rounds, config)
