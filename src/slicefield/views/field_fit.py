"""Fit a neural field or a lattice of Gaussians to sparse views (the non-voxel rows of the views benchmark).

Same data, split, operator and held-out scoring as :func:`~slicefield.views.fit.fit_views`: the training views
``b`` are rendered from values ``x`` on the orbit-aligned grid (:func:`~slicefield.views.fit.orbit_frame_grid`,
voxel -> world mm RAS ``grid.affine``) by the sparse (or torch) projector ``A`` (intensity -> intensity x mm), on the
scaled unknown ``z = x / x_scale`` of :func:`~slicefield.views.fit.solve` (``x_scale = b_scale k``,
``k = 1 / (n pixel_mm)``), and the held-out cameras are rendered from the fitted grid values.

What differs is the unknown:

- :func:`fit_views_field` (``planes``, ``hashgrid``, ``siren``, ``irem``): ``z`` at a voxel is a field
  (:func:`slicefield.representations.build_representation`, normalised through the orbit grid's
  :class:`~slicefield.representations.base.GridFrame`, as ``slicefield.fit.engine`` builds it for stacks) read at
  the voxel's centre (world mm RAS), on the voxels crossed by no empty training ray (space carving, as the voxel fit
  does; 0 elsewhere). Warm start: the voxel fit (CGLS + a few FISTA iterations) distilled into the field on random
  voxels (mean squared error, as the stacks path distils its srr start); then Adam on the mean squared error of the
  scaled training views ``1/2 mean (k A z - b / b_scale)^2``. Its exact gradient with respect to the grid values is
  ``k A^T (k A z - b / b_scale) / n_pixels`` (the projector's adjoint), back-propagated into the field chunk by
  chunk (as the stacks path's grid mode does). Stops at ``time_budget_s`` (warm start included).
- :func:`fit_views_gaussians`: one isotropic Gaussian (std ``sigma_vox``) per orbit-grid voxel near the signal of
  the voxel fit, inside the carved support; the views are the Gaussians' **closed-form line integrals**
  (:mod:`.splat`; exact for parallel and cone rays, the separable fast path on a parallel orbit), linear in the
  amplitudes. The amplitudes start from :func:`~slicefield.representations.gaussians.deconvolve_lattice` of the voxel
  fit (their grid reading reproduces it) and are refined by the voxel fit's own FISTA (amplitudes ``>= 0``, TV of the
  amplitudes, :func:`~slicefield.views.fit._fista`) on the views objective, with the voxels' carved support (a
  Gaussian sits on a voxel crossed by no empty ray). Carving by the Gaussians' own footprints instead zeroes every
  Gaussian within ``TRUNCATE_SIGMA`` std of the silhouette: on the test phantom (24 views of 20^2 pixels, every 3rd
  trained, 100 iterations, 2026-12-07) 39.8 dB held-out PSNR against 45.5 with the voxels' support (the voxel fit:
  44.9). The grid values (the exported volume) are the lattice's grid reading (the field averaged over each voxel).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import SlicefieldError
from ..geometry import apply_affine
from .fit import (
    ViewFit,
    ViewFitConfig,
    _fista,
    make_projector,
    orbit_frame_grid,
    solve,
    split_with_held_out,
    support_mask,
)
from .io import Views

log = logging.getLogger(__name__)

#: Representations :func:`fit_views_field` fits (the voxel grid is :func:`~slicefield.views.fit.fit_views`).
FIELD_REPRESENTATIONS = ("planes", "hashgrid", "siren", "irem")
#: Voxels whose warm-start value exceeds this fraction of its maximum count as signal (gaussians: where the lattice
#: holds a Gaussian, after a dilation by the kernel's reach).
SIGNAL_FRACTION = 0.01


@dataclass(frozen=True)
class FieldViewFitConfig:
    """How a field (or a lattice of Gaussians) is fitted to the training views."""

    train_every: int = 5
    """Views 0, k, 2k, ... are the training set; the rest are held out (as :class:`ViewFitConfig`)."""
    warm: ViewFitConfig = ViewFitConfig(iterations=20)
    """The voxel fit used as the warm start (its ``train_every`` and ``time_budget_s``: this config's)."""
    warm_steps: int = 100
    """Fields: Adam steps distilling the warm start into the field (random voxels of the carved support)."""
    steps: int | None = None
    """Fields: Adam steps on the views after the distillation; gaussians: FISTA iterations. None: until the budget
    (or 200 when there is no budget)."""
    lr: float | None = None
    """Fields: Adam learning rate; None: the representation's (:data:`slicefield.fit.engine.DEFAULT_LR`)."""
    views_lr_factor: float = 0.01
    """Fields: the learning rate of the steps on the views (a fresh Adam), as a multiple of ``lr``. Adam moves every
    parameter by about its learning rate from the first step, which undoes the distillation: on the 24^3 test phantom
    (24 views of 20^2 pixels, every 3rd trained, 60 distillation + 15 view steps, 2026-11-23) held-out PSNR at factor
    1 / 0.1 / 0.01: hashgrid (small) 32.0 / 44.7 / 44.4 dB, SIREN 15.4 (lr 1e-2) / 39.0 / 41.7 (lr 1e-3), IREM (lr
    1e-2) 10.4 / 20.1 / 28.9; the views loss rose during the steps at factor 1."""
    batch_voxels: int = 2**16
    """Fields: voxels per distillation batch and per chunk of the back-propagation (bounds memory)."""
    sigma_vox: float = 0.6
    """Gaussians: std of every Gaussian, in orbit-grid voxels. Held-out PSNR after 100 FISTA iterations, 2026-12-07:
    Colin27 2 mm (the benchmark's views task) at 0.5 / 0.55 / 0.6 / 0.65 / 0.7 -> 49.65 / 50.87 / 51.30 / 50.35 /
    50.40 dB; the 24^3 test phantom 45.53 / 47.30 / 46.47 / 45.07 / 43.64 (the voxel fits: 50.48 and 44.91)."""
    time_budget_s: float | None = None
    """Stop after this many seconds from the start (warm start included); the held-out rendering comes after."""
    seed: int = 0
    """Seed of the field's initialisation and the distillation batches."""
    device: str = "cpu"
    """Fields: cpu, cuda or auto (the projector runs on the CPU either way)."""

    def __post_init__(self) -> None:
        if self.train_every < 2:
            raise ValueError(f"train_every must be >= 2 (some views must be held out), got {self.train_every}")
        if self.warm_steps < 0 or (self.steps is not None and self.steps < 0) or self.batch_voxels < 1:
            raise ValueError("warm_steps and steps must be >= 0, batch_voxels >= 1")
        if not self.sigma_vox > 0:
            raise ValueError(f"sigma_vox must be > 0, got {self.sigma_vox}")


@dataclass
class _Problem:
    """The training problem shared by both fits: the scaled views and their operator."""

    grid: object
    train: list[int]
    held: list[int]
    projector: object
    bs: np.ndarray
    """``(n_train, H, W)`` float64: training views / b_scale."""
    k: float
    x_scale: float
    warm: np.ndarray
    """``grid.shape`` float64: the voxel fit, scaled (z units)."""
    support: np.ndarray
    """``grid.shape`` bool: voxels crossed by no empty training ray."""


def _problem(views: Views, config: FieldViewFitConfig, t0: float) -> _Problem:
    train, held = split_with_held_out(len(views.cameras), config.train_every)
    grid = orbit_frame_grid(views.cameras)
    warm_cfg = replace(config.warm, train_every=config.train_every, time_budget_s=config.time_budget_s)
    projector = make_projector([views.cameras[k] for k in train], grid, warm_cfg.projector)
    b = views.images[train].astype(np.float64)
    x, _ = solve(projector, b, warm_cfg)
    b_scale = float(np.abs(b).max()) or 1.0
    k = 1.0 / (float(np.prod(grid.shape)) ** (1.0 / 3.0) * grid.pixel_mm)  # as solve()
    bs = b / b_scale
    support = support_mask(lambda y: k * projector.adjoint(y), bs)
    log.info("views warm start (voxel fit) in %.1f s", time.perf_counter() - t0)
    return _Problem(grid, train, held, projector, bs, k, b_scale * k, x.astype(np.float64) / (b_scale * k), support)


def _finish(p: _Problem, views: Views, z: np.ndarray, history: list[dict], t0: float, config) -> ViewFit:
    seconds = time.perf_counter() - t0
    x = (z * p.x_scale).astype(np.float32)
    held_projector = make_projector([views.cameras[k] for k in p.held], p.grid, config.warm.projector)
    rendered = held_projector.forward(x.astype(np.float64)).astype(np.float32)
    return ViewFit(x, p.grid, p.train, p.held, rendered, history, seconds)


def _over(config: FieldViewFitConfig, t0: float, per_step: float = 0.0) -> bool:
    return config.time_budget_s is not None and time.perf_counter() - t0 + per_step > config.time_budget_s


def fit_views_field(
    views: Views,
    *,
    representation: str,
    config: FieldViewFitConfig = FieldViewFitConfig(),
    representation_config: object | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ViewFit, torch.nn.Module]:
    """Fit field ``representation`` (one of :data:`FIELD_REPRESENTATIONS`) to the training views of ``views``
    (module docstring); returns the fit (grid values = the field read on the orbit grid, intensities; held-out
    renders) and the field (normalised coordinates of the orbit grid's frame -> scaled intensity ``z``)."""
    from ..fit.engine import DEFAULT_LR, _recalibrate_batchnorm, evaluate_on, resolve_device
    from ..representations import build_representation, default_config
    from ..representations.base import GridFrame

    if representation not in FIELD_REPRESENTATIONS:
        raise SlicefieldError(
            f"unknown view-fit representation {representation!r}",
            fix=f"use one of {', '.join(FIELD_REPRESENTATIONS)} (voxel: fit_views)",
        )
    t0 = time.perf_counter()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    p = _problem(views, config, t0)
    frame = GridFrame.of_grid(p.grid.shape, p.grid.affine)
    model = build_representation(representation, representation_config or default_config(representation)).to(device)
    lr = config.lr if config.lr is not None else DEFAULT_LR.get(representation, 1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    # the field is read at the centres (world mm RAS -> normalised) of the carved support's voxels only
    ijk = np.argwhere(p.support).astype(np.float64)
    u = frame.normalise(torch.from_numpy(apply_affine(p.grid.affine, ijk).astype(np.float32)))
    target = torch.from_numpy(p.warm[p.support].astype(np.float32))
    history: list[dict] = []
    for step in range(config.warm_steps):
        if step and _over(config, t0):
            log.info("time budget reached during the distillation (%d of %d steps)", step, config.warm_steps)
            break
        idx = torch.from_numpy(rng.integers(0, len(u), config.batch_voxels))
        loss = torch.mean((model(u[idx].to(device)) - target[idx].to(device)) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"stage": "distil", "step": step + 1, "loss": float(loss.detach())})

    def read() -> np.ndarray:
        z = np.zeros(p.grid.shape)
        z[p.support] = evaluate_on(model, u, device).numpy()
        return z

    n_steps = config.steps if config.steps is not None else (10**9 if config.time_budget_s is not None else 200)
    opt = torch.optim.Adam(model.parameters(), lr=lr * config.views_lr_factor)  # fresh moments: a new objective
    n_pix = float(p.bs.size)
    t_loop = time.perf_counter()
    done = 0
    for step in range(n_steps):
        per_step = (time.perf_counter() - t_loop) / step if step else 0.0
        if _over(config, t0, per_step):
            break
        r = p.k * p.projector.forward(read()) - p.bs
        g = torch.from_numpy((p.k * p.projector.adjoint(r) / n_pix)[p.support].astype(np.float32))
        opt.zero_grad()
        for i in range(0, len(u), config.batch_voxels):  # exact gradient, back-propagated chunk by chunk
            f = model(u[i : i + config.batch_voxels].to(device))
            (f * g[i : i + config.batch_voxels].to(device)).sum().backward()
        opt.step()
        done = step + 1
        history.append({"stage": "views", "step": done, "loss": 0.5 * float(np.vdot(r, r)) / n_pix})
        if progress is not None:
            progress(done, n_steps if config.steps is not None else done)
    log.info("%s: %d view steps in %.1f s", representation, done, time.perf_counter() - t_loop)
    _recalibrate_batchnorm(model, u, rng, device)
    return _finish(p, views, read(), history, t0, config), model


def gaussian_reading(amplitudes: np.ndarray, *, sigma_vox: float) -> np.ndarray:
    """The grid reading of a lattice of isotropic Gaussians of std ``sigma_vox`` voxels, one per voxel with the
    amplitudes ``amplitudes`` (grid shape; 0 where there is none): the separable correlation with
    :func:`~slicefield.representations.gaussians.lattice_kernel_1d` (self-adjoint)."""
    from ..representations.gaussians import correlate_separable, lattice_kernel_1d

    return correlate_separable(amplitudes, lattice_kernel_1d(sigma_vox).astype(amplitudes.dtype))


def lattice_centres_mm(grid, keep: np.ndarray) -> np.ndarray:
    """``(N, 3)`` world mm RAS: the centres of the voxels of ``keep`` (``grid.shape`` bool, C order), one Gaussian
    each."""
    return apply_affine(grid.affine, np.argwhere(keep).astype(np.float64))


def lattice_view_operator(cameras: list, grid, keep: np.ndarray, *, sigma_vox: float):
    """The closed-form DRR operator (:mod:`.splat`) of one isotropic Gaussian of std ``sigma_vox`` voxels at each
    voxel of ``keep`` (``grid.shape`` bool; centres at the voxel centres, world mm RAS ``grid.affine``) seen by
    ``cameras``: ``(forward, adjoint)`` between amplitude grids ``grid.shape`` (intensity, 0 off ``keep``) and views
    ``(n_views, H, W)`` (intensity x mm). A parallel orbit on ``grid`` takes the separable fast path
    (:class:`~.splat.OrbitLatticeOperator`), any other cameras the general one
    (:class:`~.splat.GaussianViewOperator`)."""
    from .projector import _grid_camera, orbit_grid
    from .splat import GaussianViewOperator, OrbitLatticeOperator

    m = keep.astype(np.float64)
    if orbit_grid([*cameras, _grid_camera(grid)]) is not None:
        op = OrbitLatticeOperator(cameras, grid, sigma_vox=sigma_vox)
        return (lambda a: op.forward(a * m)), (lambda y: op.adjoint(y) * m)
    means = lattice_centres_mm(grid, keep)
    gen = GaussianViewOperator(cameras, means, np.full(len(means), sigma_vox * grid.pixel_mm))

    def adjoint(y: np.ndarray) -> np.ndarray:
        a = np.zeros(grid.shape)
        a[keep] = gen.adjoint(y)
        return a

    return (lambda a: gen.forward(a[keep])), adjoint


def fit_views_gaussians(
    views: Views,
    *,
    config: FieldViewFitConfig = FieldViewFitConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ViewFit, np.ndarray, np.ndarray]:
    """Fit a lattice of Gaussians to the training views of ``views`` (module docstring: the views are their
    closed-form line integrals); returns the fit (grid values = the lattice's grid reading, intensities; held-out
    views rendered in closed form), the kept voxels ``keep`` (grid shape, bool: one Gaussian each) and the final
    amplitudes (grid shape, intensities, 0 off ``keep``)."""
    from scipy import ndimage

    from ..representations.gaussians import deconvolve_lattice, lattice_kernel_1d

    t0 = time.perf_counter()
    p = _problem(views, config, t0)
    reach = len(lattice_kernel_1d(config.sigma_vox)) // 2
    signal = p.warm > SIGNAL_FRACTION * max(float(p.warm.max()), 1e-30)
    keep = ndimage.binary_dilation(signal, iterations=max(reach, 1)) & p.support
    if not keep.any():
        raise SlicefieldError("the voxel fit of the training views has no signal", fix="check the views")
    a0 = np.zeros(p.grid.shape)
    a0[keep] = deconvolve_lattice(p.warm, keep, sigma_vox=config.sigma_vox)
    train_cams = [views.cameras[k] for k in p.train]
    forward, adjoint = lattice_view_operator(train_cams, p.grid, keep, sigma_vox=config.sigma_vox)

    def fwd(a: np.ndarray) -> np.ndarray:
        return p.k * forward(a)

    def adj(y: np.ndarray) -> np.ndarray:
        return p.k * adjoint(y)

    n_it = config.steps if config.steps is not None else (10**9 if config.time_budget_s is not None else 200)
    history: list[dict] = []
    fista = replace(config.warm, iterations=n_it, time_budget_s=config.time_budget_s)
    a = _fista(fwd, adj, p.bs, a0, fista, history=history, t0=t0, progress=progress, support=keep) if n_it else a0
    log.info("gaussians: %d FISTA iterations, %d Gaussians", len(history), int(keep.sum()))
    seconds = time.perf_counter() - t0
    amplitudes = a * keep * p.x_scale  # intensities
    held = [views.cameras[k] for k in p.held]
    rendered = lattice_view_operator(held, p.grid, keep, sigma_vox=config.sigma_vox)[0](amplitudes).astype(np.float32)
    x = gaussian_reading(amplitudes, sigma_vox=config.sigma_vox).astype(np.float32)
    fit = ViewFit(x, p.grid, p.train, p.held, rendered, history, seconds)
    return fit, keep, amplitudes.astype(np.float32)
