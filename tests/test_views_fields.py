"""Tests for slicefield.views.field_fit: neural fields and a lattice of Gaussians fitted to sparse views.

A 24^3 phantom (conftest, 1 mm), 24 parallel views of 20^2 pixels about S, trained on every 3rd; CPU only, each
test a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import brain_phantom
from slicefield.representations import HashGridConfig, TriPlaneConfig
from slicefield.views.cameras import OrbitConfig
from slicefield.views.field_fit import FieldViewFitConfig, fit_views_field, fit_views_gaussians, gaussian_reading
from slicefield.views.fit import ViewFitConfig, fit_views, view_metrics
from slicefield.views.io import Views
from slicefield.views.pipeline import plan_orbit
from slicefield.views.render import render_volume

TRAIN_EVERY = 3
WARM = ViewFitConfig(iterations=20)


@pytest.fixture(scope="module")
def views() -> Views:
    phantom = brain_phantom(24)
    cams = plan_orbit(phantom, OrbitConfig(n_views=24, step_deg=15.0, size=20))
    meta = {"subject": {"shape": list(phantom.shape), "affine": phantom.affine.tolist()}, "mode": "drr"}
    return Views(render_volume(phantom, cams), cams, [15.0 * k for k in range(24)], meta)


def _psnr(views: Views, fit) -> float:
    return float(
        np.mean([view_metrics(views.images[k], r)["psnr"] for k, r in zip(fit.held_out, fit.rendered, strict=True)])
    )


def test_hashgrid_fit_beats_its_untrained_field_and_its_loss_falls(views: Views) -> None:
    small = HashGridConfig(log2_table_size=12, levels=8)
    bare = FieldViewFitConfig(train_every=TRAIN_EVERY, warm=WARM, warm_steps=0, steps=0)
    untrained, _ = fit_views_field(views, representation="hashgrid", representation_config=small, config=bare)
    cfg = FieldViewFitConfig(train_every=TRAIN_EVERY, warm=WARM, warm_steps=60, steps=15, batch_voxels=4096)
    fit, model = fit_views_field(views, representation="hashgrid", representation_config=small, config=cfg)
    assert fit.grid_values.shape == fit.grid.shape
    assert len(fit.held_out) == 16 and fit.rendered.shape == (16, 20, 20)
    losses = [h["loss"] for h in fit.history if h["stage"] == "views"]
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert _psnr(views, fit) > _psnr(views, untrained) + 10.0
    assert _psnr(views, fit) > 25.0
    assert sum(p.numel() for p in model.parameters()) > 0


def test_time_budget_stops_the_field_fit(views: Views) -> None:
    cfg = FieldViewFitConfig(train_every=TRAIN_EVERY, warm=WARM, warm_steps=5, time_budget_s=1.0, batch_voxels=4096)
    fit, _ = fit_views_field(views, representation="planes", representation_config=TriPlaneConfig(resolutions=(16, 32)),
                             config=cfg)  # fmt: skip
    assert fit.seconds < 10.0 and np.isfinite(fit.rendered).all()


def test_gaussians_reading_reproduces_the_start_and_the_fit_scores_like_it(views: Views) -> None:
    cfg = FieldViewFitConfig(train_every=TRAIN_EVERY, warm=WARM, steps=100)
    fit, keep, start = fit_views_gaussians(views, config=cfg)
    voxel = fit_views(views, ViewFitConfig(train_every=TRAIN_EVERY, iterations=20))
    reading = gaussian_reading(start.astype(np.float64), sigma_vox=cfg.sigma_vox)
    peak = float(voxel.grid_values.max())
    assert np.abs(reading[keep] - voxel.grid_values[keep]).max() < 1e-3 * peak
    assert np.all(start[~keep] == 0) and 0 < keep.sum() < keep.size
    losses = [h["data"] for h in fit.history if "data" in h]
    assert len(losses) == 100 and losses[-1] < losses[0]
    assert _psnr(views, fit) > _psnr(views, voxel)  # 45.2 dB against 44.9 (2026-11-23)


def test_unknown_representation_is_one_clear_error(views: Views) -> None:
    from slicefield.errors import SlicefieldError

    with pytest.raises(SlicefieldError, match="unknown view-fit representation 'voxel'"):
        fit_views_field(views, representation="voxel")
