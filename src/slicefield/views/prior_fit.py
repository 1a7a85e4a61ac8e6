"""Prior embedding for sparse views (NeRP, Shen et al. 2022): the voxel fit started from, and pulled towards, a prior.

The views counterpart of :mod:`slicefield.fit.prior` (which embeds a prior into a fit of slice stacks). Same data,
split, operator and held-out scoring as :func:`~slicefield.views.fit.fit_views`; the unknown is the scaled grid
``z = x / x_scale`` on the orbit grid (:func:`~slicefield.views.fit.orbit_frame_grid`, voxel -> world mm RAS
``grid.affine``), as in :func:`~slicefield.views.fit.solve`.

1. **reference**: the voxel fit of the training views (CGLS + a few FISTA iterations, ``config.warm``) on the orbit
   grid;
2. **align and resample**: :func:`~slicefield.fit.prior.align_prior` registers the prior (on its own grid, its
   affine respected) to that reference (rigid, then affine, then a smooth B-spline deformation, as
   ``prior_config`` says) and resamples it onto the orbit grid;
3. **match intensities through the projector**: one gain so that the prior's predicted training views ``A p`` have
   the training views' total (:func:`~slicefield.fit.prior.match_moments`, kind ``gain``: a line integral of an
   offset is not a constant, and the total of a view is the object's integral whatever the alignment); then, with
   ``intensity="local"``, times :func:`~slicefield.fit.prior.local_gain` against the reference (regional contrast);
4. **fit**: from the matched prior ``p`` (NeRP's initialisation), the voxel fit's CGLS start (``config.warm``'s
   ``start_iterations``; from ``p`` it fits the training views and leaves the prior's null-space part alone), then
   its FISTA (``z >= 0``, carved support, TV; :func:`~slicefield.views.fit._fista`), :data:`PRIOR_ITERATIONS` of
   them by default (more wash the prior out) on::

       1/2 ||k A z - b / b_scale||^2  +  TV  +  weight sum_v rho(z_v - p_v)

   rho Huber with threshold ``pull_delta x max(p)`` or quadratic (:class:`~slicefield.fit.prior.PriorPull`), both
   terms summed (over pixels, over voxels) as the stacks' pull is relative to its data term. With views, what the
   training views do not determine (the operator's null space) stays where the start put it when ``weight`` is 0,
   except for what non-negativity and TV move, slowly: the start alone carries the prior there (the default, no
   pull: :data:`VIEW_PRIOR`); a pull also trades the fitted range space against the prior.

The registration counts inside ``config.time_budget_s`` (the clock starts before the reference fit).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..fit.prior import (
    PriorConfig,
    PriorEmbedding,
    PriorPull,
    align_prior,
    auto_pull_weight,
    check_prior_volume,
    local_gain,
    match_moments,
)
from ..volume import Volume
from .field_fit import FieldViewFitConfig, _finish, _Problem, _problem
from .fit import ViewFit, _cgls, _fista
from .io import Views

log = logging.getLogger(__name__)

#: Prior embedding for views (PriorConfig's ``reference`` is unused: the reference is the voxel fit of the views):
#: affine registration only, one gain, no pull. Colin27 2 mm, 72 DRRs of 128^2, MNI152 2 mm as the prior, held-out
#: PSNR after CGLS 10 + FISTA 100 from the prior (scratch: the voxel fit, 20 + 100 FISTA), training every 5th / 10th /
#: 20th view: scratch 50.54 / 43.93 / 34.30 dB, affine 51.35 / 44.93 / 37.44, affine + B-spline (40 mm) 51.73 / 45.43
#: / 35.30 (a 4-view reference misleads the deformation, and it costs ~20 s of a 45 s budget); a pull of weight
#: 1e-5 to 1e-3 (quadratic) lost 0.2 to 3.8 dB with 4 views, Huber 1e-4 gained 0.03 dB with 8 and lost 0.5 with 4
#: (2026-12-06, /tmp scripts on :func:`embed_view_prior` and :func:`fit_from_prior`).
VIEW_PRIOR = PriorConfig(intensity="linear", pull_weight=0.0, deformable_mm=None)
#: FISTA iterations from the prior when ``config.steps`` is None (the budget still applies): without a pull, more
#: iterations wash the prior out of the null space (non-negativity and TV mix it in). Same data, CGLS 10 + FISTA
#: 50 / 100 / 200 / 400 from the prior, every 10th view: 43.99 / 44.93 / 44.40 / 44.23 dB (scratch, 45 s: 44.29);
#: every 20th: 36.35 / 37.44 / 37.60 / 36.28 (scratch, 45 s: 35.82); every 5th: 51.35 at 100, 51.09 at the 45 s
#: budget (2026-12-06).
PRIOR_ITERATIONS = 100


@dataclass
class ViewPrior:
    """The matched prior on the orbit grid and how it got there."""

    embedding: PriorEmbedding
    """values: orbit grid shape float32, intensities (the views' units / mm); world_to_world: world mm RAS, prior
    anatomy -> subject; gain (offset 0); residual_rms and noise: in the views' units (intensity x mm)."""
    anchor: np.ndarray
    """``grid.shape`` float64: the matched prior in z units (``values / x_scale``), the start and the pull's centre."""
    weight: float
    """The pull weight used (``prior_config.pull_weight``, or :func:`~slicefield.fit.prior.auto_pull_weight`)."""


def embed_view_prior(p: _Problem, prior: Volume, *, prior_config: PriorConfig, name: str = "prior") -> ViewPrior:
    """Steps 2-3 of the module docstring for the training problem ``p`` (its voxel fit is the reference)."""
    from ..metrics import estimate_noise_sigma

    check_prior_volume(prior, name=name)
    grid = Volume(np.zeros(p.grid.shape, np.float32), p.grid.affine)
    t, metric, values = align_prior(prior, grid, p.warm * p.x_scale, config=prior_config, name=name)
    z = values.astype(np.float64) / p.x_scale

    def predict(v: np.ndarray) -> np.ndarray:
        return (p.k * p.projector.forward(v)).ravel()

    noise = estimate_noise_sigma(p.bs.astype(np.float32))
    gain, _, rms = match_moments(
        predict(z), p.bs.ravel(), noise=noise, kind="none" if prior_config.intensity == "none" else "gain", name=name
    )
    anchor = gain * z
    if prior_config.intensity == "local":
        anchor = anchor * local_gain(anchor, p.warm, grid)
        _, _, rms = match_moments(predict(anchor), p.bs.ravel(), noise=noise, kind="none")
    b_scale = p.x_scale / p.k
    embedding = PriorEmbedding(
        (anchor * p.x_scale).astype(np.float32), t, gain, 0.0, rms * b_scale, noise * b_scale, metric
    )
    weight = auto_pull_weight(embedding) if prior_config.pull_weight is None else prior_config.pull_weight
    log.info("views prior %s: gain %.4g, residual %.4g (noise %.4g), pull weight %.3g", name, gain, rms, noise, weight)
    return ViewPrior(embedding, anchor, float(weight))


def fit_from_prior(
    p: _Problem,
    vp: ViewPrior,
    *,
    config: FieldViewFitConfig,
    prior_config: PriorConfig,
    t0: float,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Step 4 of the module docstring: FISTA from ``vp.anchor`` with the pull; returns ``z`` and the history."""
    pull = None
    if vp.weight > 0:
        delta = None if prior_config.pull_delta is None else prior_config.pull_delta * float(vp.anchor.max())
        pull = PriorPull(torch.from_numpy(vp.anchor), weight=vp.weight, n=1.0, delta=delta)

    def penalty(z: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = pull.value_and_grad(torch.from_numpy(z))
        return value, grad.numpy()

    def fwd(v: np.ndarray) -> np.ndarray:
        return p.k * p.projector.forward(v)

    def adj(y: np.ndarray) -> np.ndarray:
        return p.k * p.projector.adjoint(y)

    z0 = vp.anchor
    if config.warm.start == "cgls" and config.warm.start_iterations:
        z0 = _cgls(fwd, adj, p.bs, vp.anchor, config.warm.start_iterations)  # keeps the prior's null-space part
    history: list[dict] = [{"iteration": 0, "seconds": time.perf_counter() - t0, "stage": "prior"}]
    n_it = config.steps if config.steps is not None else PRIOR_ITERATIONS
    if not n_it:
        return np.where(p.support, np.maximum(z0, 0.0), 0.0), history
    fista = replace(config.warm, iterations=n_it, time_budget_s=config.time_budget_s)
    z = _fista(
        fwd,
        adj,
        p.bs,
        z0,
        fista,
        history=history,
        t0=t0,
        progress=progress,
        support=p.support,
        penalty=None if pull is None else penalty,
        penalty_lipschitz=0.0 if pull is None else 2.0 * vp.weight,
    )
    return z, history


def fit_views_prior(
    views: Views,
    prior: Volume,
    *,
    config: FieldViewFitConfig,
    prior_config: PriorConfig = VIEW_PRIOR,
    name: str = "prior",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ViewFit, ViewPrior]:
    """Fit the training views of ``views`` on the orbit grid with ``prior`` (any grid, voxel -> world mm RAS affine)
    embedded (module docstring); returns the fit (grid values: intensities; held-out renders) and the matched prior.

    config: split, reference fit (``warm``; its ``start_iterations`` of CGLS also follow the prior), FISTA
    iterations (``steps``; None: :data:`PRIOR_ITERATIONS`) and the budget (registration included).
    prior_config: registration, deformation, intensity matching and pull (:data:`VIEW_PRIOR`). name: how errors
    refer to the prior. Raises a one-line SlicefieldError when the prior is flat, cannot be registered or does not
    overlap the views.
    """
    check_prior_volume(prior, name=name)  # before the reference fit
    t0 = time.perf_counter()
    p = _problem(views, config, t0)
    vp = embed_view_prior(p, prior, prior_config=prior_config, name=name)
    log.info("views prior embedded at %.1f s", time.perf_counter() - t0)
    z, history = fit_from_prior(p, vp, config=config, prior_config=prior_config, t0=t0, progress=progress)
    return _finish(p, views, z, history, t0, config), vp
