"""Leave-one-out validation through the acquisition model, and per-slice residuals (slicefield.validate).

Phantom: ``conftest.brain_phantom`` (40^3, 1 mm); three orthogonal stacks of 3 mm slices, 1 mm in-plane, noise 1 %
of the maximum. Margins below were measured on it (2026, x86_64 2-core CPU, numpy 2 / scipy 1.17, by running these
tests' bodies): truth vs blurred truth (sigma 2 mm) predicts the axial stack at 40.1 vs 24.1 dB PSNR brain; the
corrupted slice's robust z-score is about 67 (B-spline) against at most 3.1 for any clean slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

import slicefield.validate as validate_mod
from slicefield.acquisition.operator import StackOperator
from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.cli import main
from slicefield.io import save_stack
from slicefield.reconstruct import ReconstructConfig, reconstruct
from slicefield.validate import (
    ValidateConfig,
    default_grid,
    format_table,
    leave_one_out,
    make_folds,
    robust_z,
    score_prediction,
    slice_residuals,
)
from slicefield.volume import Volume

ORTHOGONAL = ("axial", "coronal", "sagittal")
THICKNESS_MM = 3.0
#: The slice replaced by noise in the residual tests.
BAD_SLICE = 5


@pytest.fixture(scope="module")
def stacks(phantom: Volume):
    out, _ = simulate(phantom, SimulationConfig(orientations=ORTHOGONAL, thickness=THICKNESS_MM, noise=0.01, seed=0))
    return out


@pytest.fixture(scope="module")
def grid(stacks):
    return default_grid(stacks)


def _predict(stack, volume: Volume) -> np.ndarray:
    return StackOperator(stack, volume.shape, volume.affine).forward(volume.data)


def test_scorer_prefers_the_truth_over_a_blurred_truth(stacks, phantom: Volume) -> None:
    stack = stacks[0]
    truth = score_prediction(stack.data, _predict(stack, phantom))
    blurred = score_prediction(stack.data, _predict(stack, phantom.with_data(ndimage.gaussian_filter(phantom.data, 2))))
    assert truth["psnr_masked"] > blurred["psnr_masked"] + 6.0, (truth, blurred)
    assert truth["ssim_masked"] > blurred["ssim_masked"]
    assert truth["nrmse_masked"] < blurred["nrmse_masked"]
    assert truth["data_range"] == pytest.approx(float(np.ptp(stack.data)))


def test_one_fold_per_stack_and_held_out_stack_never_seen(stacks, grid, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list, Volume]] = []

    def spy(train, g, *, config, progress=None):
        out = reconstruct(train, g, config=config, progress=progress)
        calls.append((list(train), out))
        return out

    monkeypatch.setattr(validate_mod, "reconstruct", spy)
    config = ValidateConfig(residuals=False)
    result = leave_one_out(stacks, methods=["bspline"], grid=grid, config=config)
    assert result.mode == "stacks" and len(result.folds) == len(stacks) == len(result.scores)
    for fold, (train, _) in zip(result.folds, calls, strict=True):
        assert all(t is not fold.held_out for t in train)
        assert fold.held_out.name not in [t.name for t in train] and len(train) == len(stacks) - 1

    # Corrupting the held-out stack leaves its fold's reconstruction unchanged (it is never an input).
    corrupted = list(stacks)
    corrupted[0] = stacks[0].with_data(np.random.default_rng(1).uniform(0, 1, stacks[0].data.shape))
    calls.clear()
    leave_one_out(corrupted, methods=["bspline"], grid=grid, config=config)
    np.testing.assert_array_equal(
        calls[0][1].data, reconstruct(stacks[1:], grid, config=ReconstructConfig("bspline")).data
    )


def test_leave_one_slice_group_out_with_two_stacks(stacks) -> None:
    k = 2
    folds = make_folds(stacks[:2], slice_groups=k)
    assert len(folds) == 2 * k
    for s, stack in enumerate(stacks[:2]):
        mine = [f for f in folds if f.stack_index == s]
        assert len(mine) == k
        sets = [set(f.slices.tolist()) for f in mine]
        assert set().union(*sets) == set(range(stack.n_slices)) and sum(map(len, sets)) == stack.n_slices
        for f in mine:
            np.testing.assert_array_equal(f.held_out.data, stack.data[f.slices])
            np.testing.assert_array_equal(f.held_out.slice_to_world, stack.slice_to_world[f.slices])
            # The training set holds the other stack whole and none of the held-out slices.
            seen = [t for t in f.train if t.meta.get("slices_of") == stack.name]
            assert all(not set(t.meta["slices"]) & set(f.slices.tolist()) for t in seen)
            assert any(t is stacks[1 - s] for t in f.train)


def test_slice_group_validation_scores_every_fold(stacks, grid) -> None:
    result = leave_one_out(stacks[:2], methods=["bspline"], grid=grid, config=ValidateConfig(residuals=False))
    assert result.mode == "slices" and len(result.scores) == 4
    assert all(np.isfinite(r["psnr_masked"]) for r in result.scores)


def _corrupt(stack, rng_seed: int = 0):
    data = stack.data.copy()
    rng = np.random.default_rng(rng_seed)
    data[BAD_SLICE] = rng.normal(data[BAD_SLICE].mean(), data[BAD_SLICE].std(), data[BAD_SLICE].shape)
    return stack.with_data(data)


def test_residuals_flag_the_noise_slice_only(stacks, grid) -> None:
    bad = [stacks[0], _corrupt(stacks[1]), stacks[2]]
    recon = reconstruct(bad, grid, config=ReconstructConfig("bspline"))
    report = slice_residuals(bad, recon)
    assert report.flagged == [(stacks[1].name, BAD_SLICE)]
    r = report.stacks[1]
    np.testing.assert_allclose(r.residual, _predict(bad[1], recon) - bad[1].data, atol=1e-6)
    assert r.to_volume().shape == (*bad[1].data.shape[1:], bad[1].n_slices)
    json.dumps(report.to_json())


def test_residuals_srr_spills_into_overlapping_neighbours(stacks, grid) -> None:
    """SRR fits the corrupted slice too, so the neighbours whose PSF overlaps it (3 mm Gaussian, 3 mm apart) also
    disagree with the reconstruction; the worst slice is still the corrupted one and no other stack is flagged."""
    bad = [stacks[0], _corrupt(stacks[1]), stacks[2]]
    report = slice_residuals(bad, reconstruct(bad, grid, config=ReconstructConfig("srr")))
    assert int(np.argmax(report.stacks[1].z)) == BAD_SLICE
    assert {i for _, i in report.flagged} <= {BAD_SLICE - 1, BAD_SLICE, BAD_SLICE + 1}
    assert {n for n, _ in report.flagged} == {stacks[1].name}


def test_robust_z_ignores_noise_level_jitter() -> None:
    rms = np.array([1.0, 1.01, 0.99, 1.0, 1.02, 1.1, 0.98])
    assert robust_z(rms).max() < 3.5  # 10 % above the median is not far out of line
    rms[3] = 3.0
    assert np.flatnonzero(robust_z(rms) > 3.5).tolist() == [3]


def test_cli_validate_writes_run_dir_and_prints_table(
    stacks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = [save_stack(s, tmp_path / f"{s.name}.nii.gz") for s in stacks]
    run = tmp_path / "val"
    capsys.readouterr()
    rc = main(["-q", "validate", *map(str, paths), "--methods", "bspline,srr", "--run-dir", str(run)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for name in ("config.json", "environment.json", "metrics.json", "timings.json", "report.html"):
        assert (run / name).is_file(), name
    assert (run / "figures" / "residuals.png").is_file()
    for method in ("bspline", "srr"):
        for s in stacks:
            assert (run / "residuals" / method / f"{s.name}.nii.gz").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["scores"]) == 2 * len(stacks) and metrics["ranking"][0] == "srr"
    assert {r["method"] for r in metrics["rows"]} == {"bspline", "srr"}
    assert "flagged" in metrics["residuals"]["srr"]
    assert set(json.loads((run / "timings.json").read_text())) == {"validate/bspline", "validate/srr"}
    assert "| 1 | srr |" in out and "| 2 | bspline |" in out


def test_cli_validate_one_stack_leave_one_out_is_one_line_exit_2(
    stacks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save_stack(stacks[0], tmp_path / "only.nii.gz")
    capsys.readouterr()
    rc = main(["validate", str(path), "--mode", "stacks", "--run-dir", str(tmp_path / "val")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slicefield: error:") and "at least 2 stacks" in lines[0]
    assert "--mode slices" in lines[0]
    assert not (tmp_path / "val").exists()


def test_one_stack_holds_out_slice_groups_and_ranks_the_truth_first(
    stacks, phantom: Volume, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A single thick stack: each fold keeps every other slice and predicts the ones in between.
    axial = stacks[0]
    folds = make_folds([axial], mode="auto", slice_groups=2)
    assert len(folds) == 2
    for fold in folds:
        kept = np.concatenate([t.meta["slices"] for t in fold.train])
        assert np.intersect1d(kept, fold.slices).size == 0
        assert np.union1d(kept, fold.slices).size == axial.n_slices
    # "srr" answers with the truth, "bspline" with a blurred truth: the ranking must follow.
    blurred = phantom.with_data(ndimage.gaussian_filter(phantom.data, 2.0))

    def oracle(train, g, *, config, progress=None):
        assert all(t.meta.get("slices_of") == axial.name for t in train)
        return phantom if config.method == "srr" else blurred

    monkeypatch.setattr(validate_mod, "reconstruct", oracle)
    grid = phantom.with_data(np.zeros(phantom.shape, np.float32))
    result = leave_one_out([axial], methods=["bspline", "srr"], grid=grid, config=ValidateConfig(residuals=False))
    assert result.mode == "slices" and len(result.scores) == 4
    assert [r["method"] for r in result.summary] == ["srr", "bspline"]


def test_format_table_ranks_methods(stacks, grid) -> None:
    result = leave_one_out(stacks, methods=["bspline"], grid=grid, config=ValidateConfig(residuals=False))
    text = format_table(result)
    assert "| 1 | bspline |" in text and "±" in text and "3 folds" in text


def test_leads_below_the_threshold_or_not_won_everywhere_are_ties() -> None:
    # Per-fold held-out PSNR brain of three methods over three folds: a beats b clearly, b beats c by 0.1 dB.
    psnr = {"a": [30.0, 31.0, 30.5], "b": [29.0, 29.5, 29.0], "c": [28.9, 29.4, 28.9]}
    scores = [
        {"method": m, "fold": f, **{k: v for k in validate_mod.SUMMARY_METRICS}}
        for m, values in psnr.items()
        for f, v in enumerate(values)
    ]
    rows = validate_mod._summarise(list(psnr), scores, {}, {})
    by = {r["method"]: r for r in rows}
    assert [r["method"] for r in rows] == ["a", "b", "c"]
    assert by["a"]["lead_db"] == pytest.approx(1.333, abs=1e-3) and by["a"]["lead_folds"] == 3
    assert by["a"]["tie"] is False and by["b"]["tie"] is True and by["c"]["tie"] is None
    # A 0.5 dB mean lead that loses two folds of three is a tie too.
    psnr["b"] = [34.5, 29.5, 29.0]
    scores = [
        {"method": m, "fold": f, **{k: v for k in validate_mod.SUMMARY_METRICS}}
        for m, values in psnr.items()
        for f, v in enumerate(values)
    ]
    rows = validate_mod._summarise(list(psnr), scores, {}, {})
    assert rows[0]["method"] == "b" and rows[0]["tie"] is True and rows[0]["lead_folds"] == 1
