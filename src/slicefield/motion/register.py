"""Stack-to-stack rigid registration with SimpleITK (IREM section 2.1: align the stacks into one space first).

Each stack, read as a 3D image on its own nominal grid (:meth:`~slicefield.volume.Stack.to_volume`), is registered
to a fixed image (the reference stack, or a reconstruction) by maximising Mattes mutual information (or
correlation) over a rigid transform, multi-resolution (shrink + Gaussian smoothing per level), starting from the
identity, i.e. from what the headers say. SimpleITK works in LPS; every transform returned here is converted to a
world mm RAS **world -> world** map ``T`` that moves the stack onto the fixed image: ``aligned pose = T @ pose``.
Slice values are never resampled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ..errors import SlicefieldError
from ..itk import to_sitk
from ..metrics import foreground_mask
from ..volume import Stack, Volume
from .transforms import describe

log = logging.getLogger(__name__)

#: RAS <-> LPS (its own inverse), on homogeneous 4-vectors.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

Metric = Literal["mattes", "correlation"]

#: Regular-step gradient descent: first step (mm of physical shift, through the optimiser scales), smallest step
#: before it stops, and the factor the step shrinks by when the direction turns.
OPTIMIZER_FIRST_STEP = 2.0
OPTIMIZER_MIN_STEP = 1e-5
OPTIMIZER_RELAXATION = 0.7


@dataclass(frozen=True)
class RegistrationConfig:
    """Options of the rigid stack registration."""

    metric: Metric = "mattes"
    """Similarity: ``mattes`` (Mattes mutual information, any contrast) or ``correlation`` (same contrast)."""
    bins: int = 32
    """Histogram bins of the Mattes metric."""
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    """Image shrink factor per resolution level, coarse to fine."""
    smoothing_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    """Gaussian smoothing sigma (mm) per resolution level."""
    iterations: int = 300
    """Most optimiser iterations per level (regular-step gradient descent)."""
    sampling: float = 0.5
    """Fraction of the fixed image's voxels (inside its mask) sampled by the metric."""
    seed: int = 0
    """Seed of the metric's random sampling (same seed, same result)."""
    threads: int = 1
    """ITK threads of the registration. ITK splits the sampled metric across threads, so the result depends on their
    number; a fixed number gives the same result on every machine (stacks are small: one thread takes seconds)."""
    use_mask: bool = True
    """Restrict the metric to the fixed image's automatic foreground (Otsu, dilated)."""
    reference: int = 0
    """Index of the reference stack for :func:`register_stacks` (it stays where its header puts it)."""


@dataclass
class StackTransform:
    """The rigid correction of one stack.

    world_to_world: ``(4, 4)`` world mm RAS -> world mm RAS; the aligned stack's poses are
    ``world_to_world @ slice_to_world``. center_mm: world mm RAS point (the stack's centre) about which
    :meth:`to_json` describes the transform.
    """

    name: str
    world_to_world: np.ndarray
    center_mm: np.ndarray
    metric: float | None = None
    reference: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reference": self.reference,
            "frame": "world mm RAS -> world mm RAS; aligned slice_to_world = world_to_world @ header slice_to_world",
            "world_to_world": self.world_to_world.tolist(),
            "center_mm": self.center_mm.tolist(),
            **describe(self.world_to_world, self.center_mm),
            "metric": self.metric,
        }


def transform_stack(stack: Stack, world_to_world: np.ndarray) -> Stack:
    """The same stack (values, mask, PSF untouched) with every pose moved: ``world_to_world @ slice_to_world``."""
    m = np.asarray(world_to_world, dtype=np.float64)
    return replace(stack, slice_to_world=m[None] @ stack.slice_to_world, meta=dict(stack.meta))


def stack_center(stack: Stack) -> np.ndarray:
    """World mm RAS centre ``(3,)`` of a stack's slice corners."""
    return stack.world_corners().mean(axis=0)


def _regular_volume(stack: Stack) -> Volume:
    try:
        return stack.to_volume()
    except SlicefieldError as e:
        raise SlicefieldError(
            f"stack {stack.name!r} is not a regular grid of parallel slices, so it cannot be registered as a volume",
            fix="register the stacks before slice-level motion correction (--motion stack), or pass header poses",
        ) from e


def rigid_register(
    fixed: Volume,
    moving: Volume,
    *,
    config: RegistrationConfig = RegistrationConfig(),
    fixed_mask: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Rigid transform that brings ``moving`` onto ``fixed`` (both on their own grids, voxel -> world mm RAS).

    Returns ``(T, metric)``: ``T`` ``(4, 4)`` world mm RAS -> world mm RAS such that the anatomy at world point
    ``p`` of ``moving`` lies at ``T p`` in ``fixed``'s space (so ``T @ pose`` aligns the moving stack's poses), and
    the final metric value (lower is better). fixed_mask: bool ``fixed.shape``, where the metric is sampled.
    """
    import SimpleITK as sitk

    if len(config.shrink_factors) != len(config.smoothing_mm):
        raise ValueError("shrink_factors and smoothing_mm need one entry per level")
    fixed_img = to_sitk(fixed.data, fixed.affine)
    moving_img = to_sitk(moving.data, moving.affine)
    reg = sitk.ImageRegistrationMethod()
    if config.metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.bins)
    elif config.metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        raise ValueError(f"unknown metric {config.metric!r}")
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # SimpleITK reads seed 0 as "seed from the wall clock" (sitkWallClock): shift by one to stay reproducible
    reg.SetMetricSamplingPercentage(config.sampling, config.seed + 1)
    reg.SetNumberOfThreads(config.threads)
    if fixed_mask is not None:
        mask = to_sitk(fixed_mask.astype(np.float32), fixed.affine)
        reg.SetMetricFixedMask(sitk.Cast(mask, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=OPTIMIZER_FIRST_STEP,
        minStep=OPTIMIZER_MIN_STEP,
        numberOfIterations=config.iterations,
        relaxationFactor=OPTIMIZER_RELAXATION,
        gradientMagnitudeTolerance=1e-12,  # stop on the step size, not on the (tiny) metric gradient
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(config.smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    # initialised from the headers: the identity, rotating about the fixed image's centre
    initial = sitk.Euler3DTransform()
    center = fixed_img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed_img.GetSize()])
    initial.SetCenter(center)
    reg.SetInitialTransform(initial, inPlace=False)
    if progress is not None:
        levels = len(config.shrink_factors)
        reg.AddCommand(sitk.sitkMultiResolutionIterationEvent, lambda: progress(reg.GetCurrentLevel() + 1, levels))
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(config.threads)  # the metric's threads follow the default
    try:
        result = reg.Execute(sitk.Cast(fixed_img, sitk.sitkFloat32), sitk.Cast(moving_img, sitk.sitkFloat32))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    tx = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetNthTransform(0))
    # ITK: fixed physical point x (LPS) -> moving point A x + b; the anatomy at moving q is at fixed A^-1 (q - b)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(tx.GetMatrix()).reshape(3, 3)
    c = np.asarray(tx.GetCenter())
    lps[:3, 3] = np.asarray(tx.GetTranslation()) + c - lps[:3, :3] @ c
    t_ras = _FLIP @ np.linalg.inv(lps) @ _FLIP
    return t_ras, float(reg.GetMetricValue())


def _mask(volume: Volume) -> np.ndarray | None:
    from scipy import ndimage

    if not np.any(volume.data > 0):
        return None
    return ndimage.binary_dilation(foreground_mask(volume.data), iterations=3)


def register_stacks(
    stacks: list[Stack],
    *,
    config: RegistrationConfig = RegistrationConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Stack], list[StackTransform]]:
    """Align every stack to the reference stack ``config.reference`` (rigid, world mm RAS).

    Returns the aligned stacks (poses moved, values untouched) and one :class:`StackTransform` per stack (the
    reference's is the identity). Stacks must be regular grids of parallel slices (as read from headers).
    """
    if not 0 <= config.reference < len(stacks):
        raise SlicefieldError(
            f"reference stack index {config.reference} is out of range for {len(stacks)} stacks",
            fix=f"pass an index from 0 to {len(stacks) - 1}",
        )
    ref = stacks[config.reference]
    fixed = _regular_volume(ref)
    mask = _mask(fixed) if config.use_mask else None
    aligned, transforms = [], []
    for k, stack in enumerate(stacks):
        if k == config.reference:
            t, metric = np.eye(4), None
        else:
            t, metric = rigid_register(fixed, _regular_volume(stack), config=config, fixed_mask=mask)
            log.info("%s -> %s: %s", stack.name, ref.name, describe(t, stack_center(stack)))
        aligned.append(transform_stack(stack, t))
        transforms.append(StackTransform(stack.name, t, stack_center(stack), metric, ref.name))
        if progress is not None:
            progress(k + 1, len(stacks))
    return aligned, transforms


def register_stacks_to_volume(
    stacks: list[Stack],
    volume: Volume,
    *,
    config: RegistrationConfig = RegistrationConfig(),
    mask: np.ndarray | None = None,
) -> tuple[list[Stack], list[StackTransform]]:
    """Align every stack to a volume (e.g. the current reconstruction of all of them), rigid, world mm RAS.

    mask: bool ``volume.shape`` where the metric is sampled (default: the volume's dilated foreground when
    ``config.use_mask``). Returns the aligned stacks and their transforms (relative to the stacks as given).
    """
    if mask is None and config.use_mask:
        mask = _mask(volume)
    aligned, transforms = [], []
    for stack in stacks:
        t, metric = rigid_register(volume, _regular_volume(stack), config=config, fixed_mask=mask)
        aligned.append(transform_stack(stack, t))
        transforms.append(StackTransform(stack.name, t, stack_center(stack), metric, "reconstruction"))
    return aligned, transforms
