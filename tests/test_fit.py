"""The neural-field engine: operator twins, objective gradient, fitting, determinism, checkpoints, model files."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from slicefield.acquisition.operator import StackOperator
from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.acquisition.torch_operator import TorchStackOperator
from slicefield.baselines.bspline import bspline_average
from slicefield.fit.engine import FitConfig, fit_field, load_model, model_document, sample_model
from slicefield.fit.objective import GridObjective
from slicefield.geometry import rigid_matrix
from slicefield.itk import resample
from slicefield.metrics import foreground_mask, psnr
from slicefield.representations import HashGridConfig
from slicefield.volume import Volume

FAST = FitConfig(representation="voxel", steps=30, lr=0.02, warm_start="bspline", device="cpu")
#: A small hash grid so the tests stay quick on 2 cores.
SMALL_HASH = HashGridConfig(levels=6, log2_table_size=14, base_resolution=8, finest_resolution=64, decoder_width=32)


@pytest.fixture(scope="module")
def acquired(phantom):
    cfg = SimulationConfig(orientations=("axial", "coronal", "sagittal"), thickness=3.0, noise=0.01, seed=1)
    stacks, _ = simulate(phantom, cfg)
    return stacks


def _psnr(truth: Volume, x: np.ndarray) -> float:
    mask = foreground_mask(truth.data)
    return psnr(truth.data, x, data_range=float(truth.data.max() - truth.data.min()), mask=mask)


def test_torch_operator_matches_scipy_operator(phantom, acquired):
    stack = acquired[1]
    stack.slice_to_world = rigid_matrix((4, -3, 7), (0.4, 0, -0.3))[None] @ stack.slice_to_world  # oblique
    op = StackOperator(stack, phantom.shape, phantom.affine)
    top = TorchStackOperator(op)
    x = np.random.default_rng(0).random(phantom.shape, dtype=np.float32)
    y = np.random.default_rng(1).random(stack.data.shape, dtype=np.float32)
    np.testing.assert_allclose(top.forward(torch.from_numpy(x)).numpy(), op.forward(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(top.adjoint(torch.from_numpy(y)).numpy(), op.adjoint(y), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prior", ["huber", "tgv"])
def test_objective_gradient_matches_finite_differences(phantom, acquired, prior):
    obj = GridObjective(
        acquired, phantom, scale=1.0, weight=0.05, delta=0.02, device=torch.device("cpu"), prior=prior, tgv_ratio=0.7
    )
    rng = np.random.default_rng(0)
    x = torch.from_numpy(phantom.data + rng.normal(0, 0.05, phantom.shape).astype(np.float32))
    w = obj.initial_w(x)
    if w is not None:  # move w off the image gradient so both tgv terms are active
        w = w + torch.from_numpy(rng.normal(0, 0.05, w.shape).astype(np.float32))
    v = torch.from_numpy(rng.normal(0, 1, phantom.shape).astype(np.float32))
    vw = None if w is None else torch.from_numpy(rng.normal(0, 1, w.shape).astype(np.float32))
    ev = obj.value_and_grad(x, w)
    assert (ev.grad_w is None) == (prior == "huber")
    eps = 1e-3
    for dx, dw, grad in [(v, None, ev.grad)] + ([(None, vw, ev.grad_w)] if w is not None else []):

        def total(sign, dx=dx, dw=dw):
            xs = x if dx is None else x + sign * eps * dx
            ws = w if dw is None else w + sign * eps * dw
            e = obj.value_and_grad(xs, ws)
            return e.data + e.prior

        numeric = (total(1) - total(-1)) / (2 * eps)
        direction = dx if dx is not None else dw
        assert numeric == pytest.approx(float((grad.double() * direction.double()).sum()), rel=2e-2)


def test_voxel_field_loss_falls_and_beats_one_stack(phantom, acquired):
    result = fit_field(acquired, phantom, config=FAST)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0]
    # the field beats trilinear interpolation of one stack onto the grid, and the B-spline average
    one = acquired[0].to_volume()
    trilinear = resample(
        one.data, one.affine, shape=phantom.shape, target_affine=phantom.affine, interpolation="linear"
    )
    assert _psnr(phantom, result.volume.data) > _psnr(phantom, trilinear) + 1.0  # measured +1.9 dB
    assert _psnr(phantom, result.volume.data) > _psnr(phantom, bspline_average(acquired, phantom)) + 1.0
    np.testing.assert_array_equal(result.volume.affine, phantom.affine)


def test_hashgrid_grid_mode_loss_falls(phantom, acquired):
    cfg = replace(FAST, representation="hashgrid", steps=15, lr=1e-2, warm_steps=60)
    result = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    one = acquired[0].to_volume()
    trilinear = resample(
        one.data, one.affine, shape=phantom.shape, target_affine=phantom.affine, interpolation="linear"
    )
    assert _psnr(phantom, result.volume.data) > _psnr(phantom, trilinear)


def test_slices_mode_siren_loss_falls(phantom, acquired):
    cfg = FitConfig(
        representation="siren",
        mode="slices",
        steps=60,
        lr=1e-3,
        batch_pixels=512,
        psf_samples=4,
        warm_start="none",
        weight=0.0,
        device="cpu",
    )
    result = fit_field(acquired, phantom, config=cfg)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])


def test_same_seed_same_output_and_other_seed_differs(phantom, acquired):
    cfg = replace(FAST, representation="hashgrid", steps=6, warm_steps=5, batch_voxels=2**12)
    a = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH).volume.data
    b = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH).volume.data
    c = fit_field(acquired, phantom, config=replace(cfg, seed=1), representation_config=SMALL_HASH).volume.data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_resume_continues_to_the_same_result(phantom, acquired, tmp_path):
    cfg = replace(FAST, representation="hashgrid", steps=12, warm_steps=5, batch_voxels=2**12, checkpoint_every=4)
    whole = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH).volume.data
    # a run "killed" after 8 steps (its last checkpoint), then resumed
    fit_field(
        acquired, phantom, config=replace(cfg, steps=8), representation_config=SMALL_HASH, checkpoint_dir=tmp_path
    )
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 8
    resumed = fit_field(
        acquired, phantom, config=cfg, representation_config=SMALL_HASH, checkpoint_dir=tmp_path, resume=True
    )
    assert resumed.steps_done == 12
    np.testing.assert_allclose(resumed.volume.data, whole, rtol=0, atol=1e-5)


def test_tgv_fit_beats_one_stack_and_resumes_with_its_auxiliary_field(phantom, acquired, tmp_path):
    cfg = replace(FAST, prior="tgv", steps=30, checkpoint_every=10)
    whole = fit_field(acquired, phantom, config=cfg)
    assert whole.history[-1]["loss"] < 0.8 * whole.history[0]["loss"]
    one = acquired[0].to_volume()
    trilinear = resample(
        one.data, one.affine, shape=phantom.shape, target_affine=phantom.affine, interpolation="linear"
    )
    assert _psnr(phantom, whole.volume.data) > _psnr(phantom, trilinear) + 1.0
    fit_field(acquired, phantom, config=replace(cfg, steps=20), checkpoint_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["aux"].shape == (3, *phantom.shape)
    resumed = fit_field(acquired, phantom, config=cfg, checkpoint_dir=tmp_path, resume=True)
    np.testing.assert_allclose(resumed.volume.data, whole.volume.data, rtol=0, atol=1e-5)


def test_time_budget_stops_early_with_a_result(phantom, acquired):
    calls = []
    result = fit_field(
        acquired,
        phantom,
        config=replace(FAST, steps=10_000, time_budget_s=0.5),
        progress=lambda done, total: calls.append((done, total)),
    )
    assert result.stopped_by_budget
    assert result.steps_done < 10_000
    # progress totals follow the budget (for an honest ETA), ending at the step the budget stopped
    assert all(done <= total <= 10_000 for done, total in calls)
    assert calls[-1] == (result.steps_done, result.steps_done)
    assert np.isfinite(result.volume.data).all()


def test_time_budget_also_bounds_the_warm_start_and_slow_steps(phantom, acquired):
    """A non-voxel field's distillation of the warm start (here a million steps, hours) stops at the budget, and no
    step is started that would end past it."""
    cfg = replace(FAST, representation="hashgrid", warm_steps=10**6, batch_voxels=2**12, time_budget_s=1.0)
    t0 = time.perf_counter()
    result = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH)
    assert time.perf_counter() - t0 < 60  # generous for a loaded machine; without the bound it runs for hours
    assert result.stopped_by_budget and result.steps_done == 0
    assert np.isfinite(result.volume.data).all()
    # the distilled start is already much closer to the truth than an untrained field
    untrained = fit_field(acquired, phantom, config=replace(cfg, warm_start="none", steps=0, time_budget_s=None))
    assert _psnr(phantom, result.volume.data) > _psnr(phantom, untrained.volume.data) + 3


def test_siren_default_learning_rate_fits_instead_of_collapsing(phantom, acquired):
    """SIREN diverged at the shared lr 1e-2 (brain PSNR ~7 dB here, 5.7 dB on Colin27); its default is 1e-3."""
    from slicefield.representations.siren import SirenConfig

    cfg = replace(FAST, representation="siren", lr=None, steps=10, warm_steps=60, batch_voxels=2**13)
    result = fit_field(acquired, phantom, config=cfg, representation_config=SirenConfig(width=64, layers=3))
    assert _psnr(phantom, result.volume.data) > _psnr(phantom, bspline_average(acquired, phantom)) - 3.0


def test_model_file_round_trip_and_sampling_on_the_fit_grid(phantom, acquired, tmp_path):
    cfg = replace(FAST, representation="hashgrid", steps=3, warm_steps=3, batch_voxels=2**12)
    result = fit_field(acquired, phantom, config=cfg, representation_config=SMALL_HASH)
    path = tmp_path / "model.pt"
    torch.save(model_document(result, representation="hashgrid", representation_config=result.model.config), path)
    model, frame, scale = load_model(path)
    again = sample_model(model, frame, scale, phantom)
    np.testing.assert_allclose(again.data, result.volume.data, rtol=1e-5, atol=1e-5)
    # a finer grid over the same box: its voxels at the fit grid's centres read the same values
    fine_affine = phantom.affine.copy()
    fine_affine[:3, :3] /= 2
    fine = sample_model(model, frame, scale, Volume(np.zeros((79, 79, 79), np.float32), fine_affine))
    np.testing.assert_allclose(fine.data[::2, ::2, ::2], result.volume.data, rtol=1e-4, atol=1e-4)
