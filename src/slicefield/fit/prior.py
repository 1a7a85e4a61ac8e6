"""Prior embedding (NeRP, Shen et al. 2022): start a field from a prior volume and, optionally, pull it towards it.

A prior is a volume of the same kind of anatomy on its own grid: a template (e.g. MNI152) of another subject, or an
earlier scan of the same subject. :func:`embed_prior` turns it into values on the fit grid, in the stacks'
intensity units:

1. **align**: a first estimate from the stacks (B-spline average, or srr) on the fit grid is the fixed image; the
   prior (on its own grid, its affine respected) is registered to it with SimpleITK, Mattes mutual information,
   started from the centres of mass (intensity moments), rigid first, then affine when asked for. The result is
   ``T``: world mm RAS -> world mm RAS such that the prior's anatomy at world point ``q`` lies at ``T q`` in the
   subject (``registration="none"``: ``T`` = identity, the headers are trusted). Then (``deformable_mm``) a smooth
   cubic B-spline displacement ``d`` (world mm RAS, on the fit grid) refines it;
2. **resample**: prior values read at ``T^-1 (p + d(p))`` for every fit-grid voxel centre ``p`` (cubic spline,
   0 outside);
3. **match intensities**: ``a * prior + b`` with the mean and standard deviation of the acquired slice values
   inside the object (the latter less the noise variance estimated in the slices), the prior being pushed through
   the stacks' forward operators (PSF and all) so that both sides have the same blur. Moments, not a regression:
   a least-squares slope shrinks towards 0 as soon as the prior is a little misaligned (regression dilution).
   ``intensity="local"`` then multiplies by a smooth gain field (bias fields, regional contrast).

The fit then starts from these values instead of srr/bspline (NeRP's initialisation), and, when the pull weight is
not zero, adds ``weight * sum_v rho(x_v - p_v) / n_pixels`` to the objective (same normalisation as the data term
of :mod:`slicefield.fit.objective`; rho Huber with threshold ``pull_delta``, or quadratic). A voxel field's
objective is convex, so without the pull the start only matters as far as the fit is short of converging: the pull
is what carries the prior's information into the result (benchmarks/RESULTS.md, "Prior embedding").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import SlicefieldError
from ..motion.register import (
    OPTIMIZER_FIRST_STEP,
    OPTIMIZER_MIN_STEP,
    OPTIMIZER_RELAXATION,
    RegistrationConfig,
)
from ..volume import Stack, Volume

log = logging.getLogger(__name__)

#: RAS <-> LPS (its own inverse), on homogeneous 4-vectors.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Local intensity matching: Gaussian sigma (mm) of the smooth gain field.
LOCAL_GAIN_SIGMA_MM = 12.0
#: Local intensity matching: bounds of the gain field (a prior this far off is not trusted locally).
LOCAL_GAIN_RANGE = (0.5, 2.0)
#: Intensity matching: the object is where the prior's prediction or the slice value exceeds this fraction of its
#: 99.5th percentile.
OBJECT_FRACTION = 0.05
#: Fewest fully covered slice pixels inside the prior for the intensity fit (and to call the prior overlapping).
MIN_OVERLAP_PIXELS = 100
#: Share of the fit grid's voxels that the resampled prior must reach (else it misses the stacks: an error).
MIN_OVERLAP_FRACTION = 0.05

#: Deformable stage: B-spline control-point spacing (mm); coarse, so only smooth shape differences are modelled.
DEFORMABLE_MESH_MM = 40.0
#: Deformable stage: L-BFGS-B iterations per level.
DEFORMABLE_ITERATIONS = 50

PriorRegistration = Literal["affine", "rigid", "none"]
PriorReference = Literal["bspline", "srr"]
IntensityMatch = Literal["local", "linear", "none"]


#: Registration of a prior: two coarse levels (4 and 2 mm voxels) suffice for a brain and keep a 1 mm brain to
#: ~30 s (linear) + ~60 s (deformable) on one thread.
PRIOR_REGISTRATION = RegistrationConfig(shrink_factors=(4, 2), smoothing_mm=(2.0, 1.0), sampling=0.2, iterations=200)


@dataclass(frozen=True)
class PriorConfig:
    """How a prior volume is embedded into a field fit (used only when a prior volume is passed)."""

    registration: PriorRegistration = "affine"
    """Alignment of the prior to the stacks: affine (12 parameters, after rigid; for a template of another subject),
    rigid (6; an earlier scan of the same subject), or none (the prior is already in the subject's world frame)."""
    reference: PriorReference = "srr"
    """First estimate from the stacks that the prior is registered to (and locally matched to): srr (sharper: an
    earlier scan of Colin27 lands at 28.1 dB brain PSNR against 23.5 dB with bspline) or bspline (seconds)."""
    intensity: IntensityMatch = "local"
    """Intensity matching: linear (a * prior + b matching the mean and spread of the acquired slices, through the
    forward operators); local (linear, then times a smooth gain field: the ratio of the estimate to the prior, both
    smoothed by :data:`LOCAL_GAIN_SIGMA_MM` inside their common foreground; for bias fields and regional contrast);
    or none."""
    pull_weight: float | None = None
    """Weight of the pull towards the prior (grid mode): ``weight * sum_v rho(x_v - p_v) / n_pixels`` with x, p in
    units of the intensity scale. 0: initialise only, as NeRP. None: :func:`auto_pull_weight`, (noise / residual)^2
    with the residual of the matched prior's predicted slices: a prior that explains the data well (an earlier scan)
    is pulled towards firmly, a template of another subject hardly (benchmarks/RESULTS.md, "Prior embedding")."""
    pull_delta: float | None = 0.02
    """Huber threshold of the pull, as a fraction of the intensity scale (so a locally wrong prior pulls with a
    bounded force); None: quadratic. 0.02 was best of 0.02/0.05/0.1 (quadratic much worse) on a Colin27 crop."""
    deformable_mm: float | None = DEFORMABLE_MESH_MM
    """After the linear registration, a smooth B-spline deformation with control points every this many mm; None:
    linear only. Needed to align the fine anatomy of even the same subject to well under a millimetre."""
    registration_config: RegistrationConfig = PRIOR_REGISTRATION
    """Metric, levels and sampling of the registration (its ``reference`` field is unused here)."""


@dataclass
class PriorEmbedding:
    """A prior on the fit grid.

    values: ``grid.shape`` float32, in the stacks' intensity units (after matching).
    world_to_world: ``(4, 4)`` world mm RAS -> world mm RAS; the prior's anatomy at ``q`` is at ``T q`` (the
    linear part; a deformable refinement is applied to ``values`` but not recorded here).
    gain, offset: the linear intensity map ``gain * prior + offset`` (before any local gain).
    residual_rms: RMS of the acquired slice values minus the matched prior's predicted slices, inside the object.
    noise: noise standard deviation estimated in the slices. metric: final registration metric (None if not run).
    (Intensities in stack units.)
    """

    values: np.ndarray
    world_to_world: np.ndarray
    gain: float
    offset: float
    residual_rms: float
    noise: float
    metric: float | None = None


def check_prior_volume(prior: Volume, *, name: str = "prior") -> None:
    """Raise a one-line SlicefieldError when ``prior`` cannot serve as a prior (empty or constant)."""
    data = prior.data
    if not np.any(data > 0) or float(data.max()) - float(data.min()) <= 0:
        raise SlicefieldError(
            "the prior has no contrast (empty or constant)",
            path=name,
            fix="pass a brain image (e.g. a registered template or an earlier scan), or drop --prior",
        )


def _itk_to_ras(tx) -> np.ndarray:
    """An ITK matrix-offset transform (fixed LPS point -> moving LPS point) as world RAS moving -> fixed ``(4, 4)``."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    lps[:3, 3] = np.asarray(tx.GetTranslation()) + c - lps[:3, :3] @ c
    return _FLIP @ np.linalg.inv(lps) @ _FLIP


def register_prior(
    fixed: Volume,
    moving: Volume,
    *,
    kind: Literal["rigid", "affine"] = "affine",
    config: RegistrationConfig = PRIOR_REGISTRATION,
    fixed_mask: np.ndarray | None = None,
    name: str = "prior",
) -> tuple[np.ndarray, float]:
    """Register ``moving`` (the prior, on its own grid) to ``fixed`` (an estimate on the fit grid), world mm RAS.

    Started from the centres of mass (intensity moments), rigid then (kind ``affine``) affine, Mattes mutual
    information. Returns ``(T, metric)``: ``T`` ``(4, 4)`` world mm RAS -> world mm RAS such that the anatomy at
    ``moving``'s world point ``q`` lies at ``T q`` in ``fixed``; metric: final value (lower is better).
    fixed_mask: bool ``fixed.shape``, where the metric is sampled.
    """
    import SimpleITK as sitk

    from ..itk import to_sitk

    fixed_img = sitk.Cast(to_sitk(fixed.data, fixed.affine), sitk.sitkFloat32)
    moving_img = sitk.Cast(to_sitk(moving.data, moving.affine), sitk.sitkFloat32)
    mask = None
    if fixed_mask is not None:
        mask = sitk.Cast(to_sitk(fixed_mask.astype(np.float32), fixed.affine), sitk.sitkUInt8)

    def run(initial) -> tuple[object, float]:
        reg = _registration(config)
        reg.SetNumberOfThreads(config.threads)
        if mask is not None:
            reg.SetMetricFixedMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=OPTIMIZER_FIRST_STEP,
            minStep=OPTIMIZER_MIN_STEP,
            numberOfIterations=config.iterations,
            relaxationFactor=OPTIMIZER_RELAXATION,
            gradientMagnitudeTolerance=1e-12,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(list(config.shrink_factors))
        reg.SetSmoothingSigmasPerLevel(list(config.smoothing_mm))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        result = reg.Execute(fixed_img, moving_img)
        return sitk.CompositeTransform(result).GetNthTransform(0), float(reg.GetMetricValue())

    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)
    try:
        start = sitk.CenteredTransformInitializer(
            fixed_img, moving_img, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        rigid, metric = run(start)
        rigid = sitk.Euler3DTransform(rigid)
        result = rigid
        if kind == "affine":
            affine = sitk.AffineTransform(3)
            affine.SetCenter(rigid.GetCenter())
            affine.SetMatrix(rigid.GetMatrix())
            affine.SetTranslation(rigid.GetTranslation())
            out, metric = run(affine)
            result = sitk.AffineTransform(out)
    except RuntimeError as e:  # ITK reports no overlap, too few samples, ... as RuntimeError
        raise _itk_failure(
            e,
            "registration of the prior to the first estimate failed",
            name=name,
            fix="check that the prior shows the same anatomy, or align it first and pass --prior-registration none",
        ) from e
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    return _itk_to_ras(result), metric


def _itk_failure(error: RuntimeError, what: str, *, name: str, fix: str) -> SlicefieldError:
    """A one-line error for an ITK failure: ``what`` with the last line of ITK's message."""
    text = str(error).strip()
    detail = text.splitlines()[-1][:120] if text else type(error).__name__
    return SlicefieldError(f"{what} ({detail})", path=name, fix=fix)


def deformable_displacement(
    fixed: Volume,
    moving: Volume,
    world_to_world: np.ndarray,
    *,
    mesh_mm: float = DEFORMABLE_MESH_MM,
    config: RegistrationConfig = PRIOR_REGISTRATION,
    fixed_mask: np.ndarray | None = None,
    name: str = "prior",
) -> np.ndarray:
    """Smooth residual alignment after the linear one: a cubic B-spline transform (control points every
    ``mesh_mm``) registered by L-BFGS-B, Mattes mutual information (or correlation, ``config.metric``).

    world_to_world: the linear ``T`` (world mm RAS, prior -> subject) it refines. Returns ``d``:
    ``(X, Y, Z, 3)`` float32 world mm RAS on ``fixed``'s grid: the subject's point ``p`` shows the prior's anatomy
    at ``T^-1 (p + d(p))``.
    """
    import SimpleITK as sitk

    from ..itk import to_sitk

    fixed_img = sitk.Cast(to_sitk(fixed.data, fixed.affine), sitk.sitkFloat32)
    # the moving image as the linear stage left it (resampled on the fixed grid), so the B-spline acts in one frame
    moved = resample_prior(moving, fixed, world_to_world)
    moving_img = sitk.Cast(to_sitk(moved, fixed.affine), sitk.sitkFloat32)
    extent = np.asarray(fixed_img.GetSize()) * np.asarray(fixed_img.GetSpacing())
    mesh = [max(1, int(round(e / mesh_mm))) for e in extent]
    tx = sitk.BSplineTransformInitializer(fixed_img, mesh, 3)
    reg = _registration(config)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.Cast(to_sitk(fixed_mask.astype(np.float32), fixed.affine), sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=DEFORMABLE_ITERATIONS)
    reg.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(config.smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(tx, inPlace=True)
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)
    try:
        reg.SetNumberOfThreads(config.threads)
        reg.Execute(fixed_img, moving_img)
        field = sitk.TransformToDisplacementField(
            tx,
            sitk.sitkVectorFloat64,
            fixed_img.GetSize(),
            fixed_img.GetOrigin(),
            fixed_img.GetSpacing(),
            fixed_img.GetDirection(),
        )
    except RuntimeError as e:
        raise _itk_failure(
            e,
            "deformable registration of the prior failed",
            name=name,
            fix="use --prior-registration affine (or rigid)",
        ) from e
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    d_lps = np.transpose(sitk.GetArrayFromImage(field), (2, 1, 0, 3))  # (X, Y, Z, 3), LPS mm
    return (d_lps * np.array([-1.0, -1.0, 1.0])).astype(np.float32)


def resample_prior(
    prior: Volume, grid: Volume, world_to_world: np.ndarray, displacement: np.ndarray | None = None
) -> np.ndarray:
    """Prior values at ``T^-1 p`` for every voxel centre ``p`` of ``grid`` (cubic spline, 0 outside); ``grid.shape``.

    world_to_world: ``T`` ``(4, 4)``, world mm RAS, prior anatomy -> subject (as :func:`register_prior` returns).
    displacement: optional ``(X, Y, Z, 3)`` world mm RAS on ``grid`` (:func:`deformable_displacement`): values are
    read at ``T^-1 (p + d(p))`` instead.
    """
    from scipy import ndimage

    from ..geometry import apply_affine

    grid_to_prior = np.linalg.inv(prior.affine) @ np.linalg.inv(world_to_world) @ grid.affine
    if displacement is None:
        out = ndimage.affine_transform(
            prior.data, grid_to_prior[:3, :3], offset=grid_to_prior[:3, 3], output_shape=grid.shape, order=3, cval=0.0
        )
    else:
        ijk = np.indices(grid.shape, dtype=np.float64).reshape(3, -1).T
        world = apply_affine(grid.affine, ijk) + displacement.reshape(-1, 3)
        src = apply_affine(np.linalg.inv(prior.affine) @ np.linalg.inv(world_to_world), world)
        out = ndimage.map_coordinates(prior.data, src.T, order=3, cval=0.0).reshape(grid.shape)
    return np.clip(out, float(prior.data.min()), float(prior.data.max())).astype(np.float32)


def match_intensity(
    values: np.ndarray, stacks: list[Stack], operators: list, *, kind: IntensityMatch = "linear"
) -> tuple[float, float, float]:
    """``(gain, offset, residual_rms)`` mapping prior ``values`` (fit grid) to the stacks' intensities.

    Over pixels fully inside the grid (``A_s 1 = 1``) and inside the stack mask, :func:`match_moments` of the
    prior's predicted slices ``A_s values`` and the acquired values (noise: Immerkaer's estimate in the slices).
    kind ``none``: gain 1, offset 0.
    """
    from ..metrics import estimate_noise_sigma

    preds, ys = [], []
    ones = np.ones(values.shape, np.float32)
    noise = float(np.median([estimate_noise_sigma(s.data) for s in stacks]))
    for stack, op in zip(stacks, operators, strict=True):
        pred = op.forward(values)
        keep = op.forward(ones) > 0.999
        if stack.mask is not None:
            keep &= stack.mask
        preds.append(pred[keep])
        ys.append(stack.data[keep])
    return match_moments(np.concatenate(preds), np.concatenate(ys), noise=noise, kind=kind)


def match_moments(
    predicted: np.ndarray,
    acquired: np.ndarray,
    *,
    noise: float,
    kind: Literal["linear", "gain", "none"] = "linear",
    name: str | None = None,
) -> tuple[float, float, float]:
    """``(gain, offset, residual_rms)`` with ``gain * predicted + offset`` ~ ``acquired`` (1-D, same length).

    Over the object (prediction or acquired value above :data:`OBJECT_FRACTION` of its 99.5th percentile):
    kind ``linear``: the mean and the standard deviation (less the noise variance ``noise^2``) of the acquired
    values; ``gain``: offset 0 and equal sums (for line integrals, where a grid offset is not a constant: the sum of
    a view is the object's total intensity, whatever its alignment); ``none``: gain 1, offset 0.
    residual_rms: RMS of acquired minus matched prediction over the object. Raises a one-line SlicefieldError (about
    the prior ``name``) when fewer than :data:`MIN_OVERLAP_PIXELS` pixels are left.
    """
    p, y = predicted.astype(np.float64), acquired.astype(np.float64)
    if p.size:
        inside = (p > OBJECT_FRACTION * np.percentile(p, 99.5)) | (y > OBJECT_FRACTION * np.percentile(y, 99.5))
    else:
        inside = p > 0
    p, y = p[inside], y[inside]
    if p.size < MIN_OVERLAP_PIXELS:
        raise SlicefieldError(
            f"the prior overlaps only {p.size} acquired pixels",
            path=name,
            fix="check the prior's position (its header), or let it be registered (drop --prior-registration none)",
        )
    gain, offset = 1.0, 0.0
    if kind == "linear":
        spread = float(np.sqrt(max(float(np.var(y)) - noise**2, 0.0)))
        gain = spread / max(float(np.std(p)), 1e-12)
        offset = float(np.mean(y)) - gain * float(np.mean(p))
    elif kind == "gain":
        gain = float(np.sum(y)) / max(float(np.sum(p)), 1e-30)
    r = y - (gain * p + offset)
    return float(gain), float(offset), float(np.sqrt(np.mean(r * r)))


def align_prior(
    prior: Volume,
    grid: Volume,
    estimate: np.ndarray | None,
    *,
    config: PriorConfig = PriorConfig(),
    name: str = "prior",
) -> tuple[np.ndarray, float | None, np.ndarray]:
    """Steps 1-2 of the module docstring: ``(T, metric, values)``, the prior registered to ``estimate`` and
    resampled onto ``grid`` (shape + voxel -> world mm RAS affine).

    estimate: ``grid.shape`` intensities, a first reconstruction on ``grid`` (the fixed image; unused, may be None,
    when ``config.registration`` is none). Uses ``config.registration``, ``deformable_mm`` and
    ``registration_config``. T: ``(4, 4)`` world mm RAS, prior anatomy -> subject (identity without registration;
    a deformable refinement is in ``values`` only); metric: None without registration. Raises a one-line
    SlicefieldError when the resampled prior covers under :data:`MIN_OVERLAP_FRACTION` of the grid.
    """
    from scipy import ndimage

    from ..metrics import foreground_mask

    t, metric, displacement = np.eye(4), None, None
    if config.registration != "none":
        fixed = Volume(np.asarray(estimate, np.float32), grid.affine)
        mask = None
        if config.registration_config.use_mask and np.any(fixed.data > 0):
            mask = ndimage.binary_dilation(foreground_mask(fixed.data), iterations=3)
        kind = "rigid" if config.registration == "rigid" else "affine"
        t, metric = register_prior(
            fixed, prior, kind=kind, config=config.registration_config, fixed_mask=mask, name=name
        )
        if config.deformable_mm is not None:
            displacement = deformable_displacement(
                fixed,
                prior,
                t,
                mesh_mm=config.deformable_mm,
                config=config.registration_config,
                fixed_mask=mask,
                name=name,
            )
    values = resample_prior(prior, grid, t, displacement)
    visible = np.abs(values) > 0.01 * (float(prior.data.max()) - float(prior.data.min()))
    if np.count_nonzero(visible) < MIN_OVERLAP_FRACTION * values.size:
        raise SlicefieldError(
            "the prior hardly overlaps the reconstruction grid",
            path=name,
            fix="check the prior's header, or let it be registered (drop --prior-registration none)",
        )
    return t, metric, values


def embed_prior(
    prior: Volume,
    stacks: list[Stack],
    grid: Volume,
    *,
    config: PriorConfig = PriorConfig(),
    operators: list | None = None,
    name: str = "prior",
) -> PriorEmbedding:
    """The prior aligned, resampled onto ``grid`` (shape + voxel -> world mm RAS affine) and intensity-matched.

    operators: the stacks' :class:`~slicefield.acquisition.operator.StackOperator` on ``grid`` (built if None).
    name: how errors refer to the prior (its file name).
    """
    from ..acquisition.operator import StackOperator
    from ..baselines.bspline import bspline_average
    from ..metrics import estimate_noise_sigma

    check_prior_volume(prior, name=name)
    if operators is None:
        operators = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
    estimate = None
    if config.registration != "none" or config.intensity == "local":
        estimate = bspline_average(stacks, grid)
        if config.reference == "srr":
            from ..baselines.srr import srr

            estimate = srr(stacks, grid, init=estimate, operators=operators)
    t, metric, values = align_prior(prior, grid, estimate, config=config, name=name)
    try:
        kind = "none" if config.intensity == "none" else "linear"
        gain, offset, rms = match_intensity(values, stacks, operators, kind=kind)
    except SlicefieldError as e:
        raise SlicefieldError(e.problem, path=name, fix=e.fix) from e
    if kind == "linear" and gain <= 0:
        raise SlicefieldError(
            "the stacks show no contrast where the prior lies",
            path=name,
            fix="check that the prior and the stacks show the same anatomy",
        )
    log.debug("prior %s: gain %.4g, offset %.4g, metric %s", name, gain, offset, metric)
    matched = (gain * values + offset).astype(np.float32)
    if config.intensity == "local" and estimate is not None:
        matched = matched * local_gain(matched, estimate, grid)
        rms = _residual_rms(matched, stacks, operators)
    noise = float(np.median([estimate_noise_sigma(s.data) for s in stacks]))
    log.info("prior %s: residual rms %.4g (noise %.4g)", name, rms, noise)
    return PriorEmbedding(matched.astype(np.float32), t, gain, offset, rms, noise, metric)


def _residual_rms(values: np.ndarray, stacks: list[Stack], operators: list) -> float:
    """RMS of acquired minus predicted slice values over fully covered pixels inside the object."""
    ones = np.ones(values.shape, np.float32)
    r = []
    for stack, op in zip(stacks, operators, strict=True):
        keep = (op.forward(ones) > 0.999) & (stack.data > OBJECT_FRACTION * np.percentile(stack.data, 99.5))
        if stack.mask is not None:
            keep &= stack.mask
        r.append((stack.data - op.forward(values))[keep])
    res = np.concatenate(r)
    return float(np.sqrt(np.mean(res * res))) if res.size else float("inf")


#: auto_pull_weight: bounds of the weight.
AUTO_PULL_RANGE = (0.0, 0.3)


def auto_pull_weight(embedding: PriorEmbedding) -> float:
    """Pull weight from how well the prior explains the slices: ``(noise / residual_rms)^2``, in AUTO_PULL_RANGE.

    1 would mean the prior predicts the slices to within the noise. Colin27, two stacks, 1 % noise: an earlier scan
    of the subject registered (rigid + deformable) to the srr estimate gets 0.3 (clipped; +1.2 dB over scratch), the
    MNI152 template 0.009 (about initialise-only, its best); benchmarks/RESULTS.md, "Prior embedding".
    """
    if not np.isfinite(embedding.residual_rms) or embedding.residual_rms <= 0:
        return AUTO_PULL_RANGE[1]
    return float(np.clip((embedding.noise / embedding.residual_rms) ** 2, *AUTO_PULL_RANGE))


def local_gain(prior: np.ndarray, estimate: np.ndarray, grid: Volume) -> np.ndarray:
    """Smooth multiplicative field ``g`` (``grid.shape``) with ``g * prior`` ~ ``estimate`` at low frequencies.

    Normalised convolution (Gaussian, :data:`LOCAL_GAIN_SIGMA_MM`) of both inside their common foreground, ratio
    clipped to :data:`LOCAL_GAIN_RANGE`; 1 where the foreground is too far away to say.
    """
    from scipy import ndimage

    from ..metrics import foreground_mask

    both = (foreground_mask(estimate) & foreground_mask(prior)).astype(np.float32)
    sigma = LOCAL_GAIN_SIGMA_MM / grid.spacing
    weight = ndimage.gaussian_filter(both, sigma)
    num = ndimage.gaussian_filter(estimate * both, sigma)
    den = ndimage.gaussian_filter(prior * both, sigma)
    ok = (weight > 0.05) & (den > 1e-6 * max(float(np.abs(den).max()), 1e-30))
    ratio = np.ones(grid.shape, np.float32)
    ratio[ok] = num[ok] / den[ok]
    return np.clip(ratio, *LOCAL_GAIN_RANGE).astype(np.float32)


class PriorPull:
    """``weight * sum_v rho(x_v - p_v) / n`` and its gradient, on grid values in units of the intensity scale.

    anchor: ``(X, Y, Z)`` float32 tensor (the matched prior / scale); n: the data term's pixel count; delta: Huber
    threshold (same units) or None for a quadratic (rho(t) = t^2, as the Huber of objective.py inside delta).
    """

    def __init__(self, anchor: torch.Tensor, *, weight: float, n: float, delta: float | None = None):
        self.anchor = anchor
        self.weight = float(weight)
        self.n = float(n)
        self.delta = delta

    def value_and_grad(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        t = x - self.anchor
        if self.delta is None:
            value, dr = float((t * t).sum()), 2.0 * t
        else:
            a = t.abs()
            value = float(torch.where(a <= self.delta, t * t, 2 * self.delta * a - self.delta**2).sum())
            dr = 2.0 * t.clamp(-self.delta, self.delta)
        c = self.weight / self.n
        return c * value, c * dr


def _registration(config: RegistrationConfig):
    """A SimpleITK registration with the config's metric and random sampling (both prior registrations use it)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    if config.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.bins)
    else:
        reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(config.sampling, config.seed + 1)  # seed 0 means "wall clock" to ITK
    return reg
