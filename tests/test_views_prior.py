"""Tests for slicefield.views.prior_fit: a prior volume embedded into the voxel fit of sparse views (NeRP).

A 24^3 phantom (conftest, 1 mm), 24 parallel views of 20^2 pixels about S; the prior is the phantom moved by a known
small rigid transform and 1.5 times brighter. CPU only, each test a few seconds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import brain_phantom
from slicefield.errors import SlicefieldError
from slicefield.fit.prior import PriorConfig
from slicefield.views.cameras import OrbitConfig
from slicefield.views.field_fit import FieldViewFitConfig, _problem
from slicefield.views.fit import ViewFitConfig, fit_views, view_metrics
from slicefield.views.io import Views
from slicefield.views.pipeline import plan_orbit
from slicefield.views.prior_fit import VIEW_PRIOR, embed_view_prior, fit_views_prior
from slicefield.views.render import render_volume
from slicefield.volume import Volume
from test_prior import FINE, _max_error_mm, _move

#: The prior's move (degrees about world x, y, z; mm) and its intensity gain against the truth.
MOVE_DEG, MOVE_MM, PRIOR_GAIN = (4.0, -3.0, 6.0), (2.0, -1.5, 1.0), 1.5
#: Few training views: every 6th of 24 (4 views, 45 degrees apart).
FEW = 6
WARM = ViewFitConfig(iterations=20)
#: The prior pipeline at the phantom's scale: registration levels for a 24 mm object (test_prior's FINE).
PHANTOM_PRIOR = replace(VIEW_PRIOR, registration_config=FINE)


@pytest.fixture(scope="module")
def phantom24() -> Volume:
    return brain_phantom(24)


@pytest.fixture(scope="module")
def views(phantom24: Volume) -> Views:
    cams = plan_orbit(phantom24, OrbitConfig(n_views=24, step_deg=15.0, size=20))
    meta = {"subject": {"shape": list(phantom24.shape), "affine": phantom24.affine.tolist()}, "mode": "drr"}
    return Views(render_volume(phantom24, cams), cams, [15.0 * k for k in range(24)], meta)


@pytest.fixture(scope="module")
def moved_prior(phantom24: Volume) -> tuple[Volume, np.ndarray]:
    moved, g = _move(phantom24, MOVE_DEG, MOVE_MM)
    return Volume(PRIOR_GAIN * moved.data, moved.affine), g


def _psnr(views: Views, fit) -> float:
    return float(
        np.mean([view_metrics(views.images[k], r)["psnr"] for k, r in zip(fit.held_out, fit.rendered, strict=True)])
    )


def test_registration_to_the_views_recovers_the_move_and_the_gain(views, moved_prior, phantom24) -> None:
    prior, g = moved_prior
    p = _problem(views, FieldViewFitConfig(train_every=3, warm=WARM), 0.0)
    config = PriorConfig(registration="rigid", deformable_mm=None, intensity="linear", registration_config=FINE)
    vp = embed_view_prior(p, prior, prior_config=config)
    # within one orbit-grid voxel (1.3 mm) over the phantom's corners; 0.81 mm measured (2026-12-06)
    assert _max_error_mm(vp.embedding.world_to_world, np.linalg.inv(g), phantom24) < p.grid.pixel_mm
    assert vp.embedding.gain == pytest.approx(1.0 / PRIOR_GAIN, rel=0.03)  # 0.672 measured
    assert vp.anchor.shape == p.grid.shape and np.isfinite(vp.anchor).all()


def test_prior_embedded_fit_beats_scratch_with_few_views(views, moved_prior) -> None:
    prior, _ = moved_prior
    scratch = fit_views(views, ViewFitConfig(train_every=FEW, iterations=100))
    config = FieldViewFitConfig(train_every=FEW, warm=WARM, steps=80)  # 20 + 80 FISTA iterations, as scratch
    fit, _ = fit_views_prior(views, prior, config=config, prior_config=PHANTOM_PRIOR)
    assert fit.held_out == scratch.held_out and fit.rendered.shape == scratch.rendered.shape
    assert fit.grid_values.min() >= 0.0
    # 44.4 dB against 34.6 dB with 4 training views (2026-12-06)
    assert _psnr(views, fit) > _psnr(views, scratch) + 5.0


def test_pull_keeps_the_fit_near_the_prior(views, moved_prior) -> None:
    prior, _ = moved_prior
    config = FieldViewFitConfig(train_every=FEW, warm=WARM, steps=10)
    distance = {}
    for weight in (0.0, 1.0):
        cfg = replace(PHANTOM_PRIOR, deformable_mm=None, pull_weight=weight, pull_delta=None)
        fit, vp = fit_views_prior(views, prior, config=config, prior_config=cfg)
        distance[weight] = float(np.abs(fit.grid_values - vp.embedding.values).mean())
        assert ("penalty" in fit.history[-1]) == (weight > 0)
    assert distance[1.0] < 0.5 * distance[0.0], distance


def test_bad_prior_is_one_line_error(views, phantom24) -> None:
    far = phantom24.affine.copy()
    far[:3, 3] += 500.0  # no overlap with the views' orbit grid, and no registration to bring it back
    config = replace(PHANTOM_PRIOR, registration="none")
    fit_config = FieldViewFitConfig(train_every=FEW, warm=WARM, steps=1)
    with pytest.raises(SlicefieldError, match="hardly overlaps") as info:
        fit_views_prior(views, Volume(phantom24.data, far), config=fit_config, prior_config=config, name="far.nii.gz")
    assert "\n" not in str(info.value) and "far.nii.gz" in str(info.value)
    with pytest.raises(SlicefieldError, match="no contrast"):
        fit_views_prior(views, Volume(np.zeros((8, 8, 8), np.float32), np.eye(4)), config=fit_config)
