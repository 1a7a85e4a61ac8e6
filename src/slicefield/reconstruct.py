"""One entry point for every reconstruction method, so the CLI, the demo and the benchmark treat them alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .baselines.bspline import bspline_average
from .baselines.srr import SRRConfig, srr
from .errors import SlicefieldError
from .fit.engine import FitConfig, FitResult
from .fit.prior import PriorConfig
from .representations.gaussians import GaussianFitConfig
from .volume import Stack, Volume

#: Methods available to ``reconstruct``, in the order a benchmark lists them.
METHODS: tuple[str, ...] = ("bspline", "srr", "inr")
#: Methods that fit a field (the rest are classical); ``irem`` is the IREM paper's network and schedule.
FIELD_METHODS: tuple[str, ...] = ("inr", "irem")
#: Every method ``reconstruct`` accepts.
ALL_METHODS: tuple[str, ...] = tuple(dict.fromkeys(METHODS + FIELD_METHODS + ("gaussians",)))

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ReconstructConfig:
    """Options for :func:`reconstruct`."""

    method: str = "srr"
    """Reconstruction method: one of METHODS."""
    srr: SRRConfig = field(default_factory=SRRConfig)
    """Options of the srr method."""
    inr: FitConfig = field(default_factory=FitConfig)
    """Options of the inr method (the default neural-field reconstruction)."""
    irem: FitConfig = field(default_factory=lambda: IREM_FIT)
    """Options of the irem method (the IREM paper's network and training schedule)."""
    gaussians: GaussianFitConfig = field(default_factory=GaussianFitConfig)
    """Options of the gaussians method (anisotropic 3D Gaussians, analytic slice PSF)."""
    checkpoint_dir: str | None = None
    """Field methods: folder for checkpoints (and resume)."""
    resume: bool = False
    """Field methods: continue from the checkpoint in checkpoint_dir."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """inr with a prior volume: how it is registered, intensity-matched and weighted (:mod:`slicefield.fit.prior`)."""


#: IREM as published: Fourier features + 18-layer MLP, Adam lr 1e-4 halved every 500 epochs, mini-batch 2500,
#: fitted to mini-batches of acquired pixels (here with PSF samples), no warm start.
IREM_FIT = FitConfig(
    representation="irem",
    mode="slices",
    steps=2000,
    lr=1e-4,
    lr_halve_every=0,
    batch_pixels=2500,
    psf_samples=8,
    warm_start="none",
    weight=0.0,
)


def reconstruct(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: ReconstructConfig = ReconstructConfig(),
    progress: ProgressFn | None = None,
    prior: Volume | None = None,
    prior_name: str = "prior",
) -> Volume:
    """Reconstruct a volume on ``grid`` (its shape and voxel -> world mm RAS affine) from ``stacks``.

    prior: method inr only: a prior volume (own grid, voxel -> world mm RAS affine; a template or an earlier scan)
    that the field starts from (prior embedding, see :mod:`slicefield.fit.prior`); prior_name: its name in errors.
    """
    if not stacks:
        raise SlicefieldError("no stacks to reconstruct from", fix="pass at least one stack")
    _check_prior_method(config.method, prior)
    if config.method == "bspline":
        data = bspline_average(stacks, grid, progress=progress)
    elif config.method == "srr":
        init = bspline_average(stacks, grid)
        data = srr(stacks, grid, config=config.srr, init=init, progress=progress)
    elif config.method in FIELD_METHODS:
        return fit(stacks, grid, config=config, progress=progress, prior=prior, prior_name=prior_name).volume
    elif config.method == "gaussians":
        from .representations.gaussians import fit_gaussians

        return fit_gaussians(stacks, grid, config=config.gaussians, progress=progress).volume
    else:
        raise SlicefieldError(f"unknown method {config.method!r}", fix=f"use one of {', '.join(ALL_METHODS)}")
    return Volume(np.asarray(data, np.float32), grid.affine.copy())


def _check_prior_method(method: str, prior: Volume | None) -> None:
    if prior is not None and method != "inr":
        raise SlicefieldError(f"a prior volume works with method inr, not {method}", fix="use --method inr")


def fit(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: ReconstructConfig,
    progress: ProgressFn | None = None,
    prior: Volume | None = None,
    prior_name: str = "prior",
) -> FitResult:
    """Fit the field of a field method (``config.method`` in FIELD_METHODS) and read it on ``grid``.

    prior, prior_name: as for :func:`reconstruct` (method inr only).
    """
    from .fit.engine import fit_field

    _check_prior_method(config.method, prior)

    return fit_field(
        stacks,
        grid,
        config=config.inr if config.method == "inr" else config.irem,
        checkpoint_dir=config.checkpoint_dir,
        resume=config.resume,
        progress=progress,
        prior=prior,
        prior_config=config.prior,
        prior_name=prior_name,
    )
