"""Run directories and the HTML report (slicefield.report, the new figures of slicefield.figures).

Phantom: ``conftest.brain_phantom`` (40^3, 1 mm; 28^3 or 24^3 where a whole benchmark runs); stacks are three
orthogonal 3 mm stacks of it, 1 % noise. The module runs in about 20-30 s on a busy 2-core CPU (2026-11, x86_64).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slicefield.acquisition.simulate import SimulationConfig
from slicefield.benchmark import BenchmarkConfig, run_benchmark
from slicefield.cli import main
from slicefield.errors import SlicefieldError
from slicefield.figures import (
    DisplayGrid,
    _plane_pixels,
    crop_grid,
    intensity_profiles,
    loss_curves,
    orthogonal_planes,
)
from slicefield.io import save_stack, save_volume
from slicefield.reconstruct import ReconstructConfig
from slicefield.report import (
    DEFAULT_CAPTION,
    NO_REFERENCE_CAPTION,
    FigureConfig,
    build_report,
    find_volumes,
    make_figures,
    motion_summary,
    save_benchmark,
    write_report,
)
from slicefield.runs import RunDir
from slicefield.volume import Volume

ORTHOGONAL = ("axial", "coronal", "sagittal")
#: inr steps in these tests: enough for a loss curve, a second of CPU.
INR_STEPS = 6


def _images(html: str) -> list[np.ndarray]:
    """Every embedded PNG of a report, decoded to a grey-level array."""
    import io

    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("L"), dtype=np.float64) for b in blobs]


def _assert_self_contained(html: str) -> None:
    """No file or network reference: every src is a data: URL, no stylesheet or script is loaded."""
    assert not re.search(r"<(script|link|iframe)\b", html)
    srcs = re.findall(r"\bsrc=['\"]([^'\"]*)", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "url(" not in html


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-method benchmark (bspline, srr, inr for a few steps) with per-slice motion, written as a run dir,
    on a 28^3 phantom (small, so the module stays quick)."""
    from conftest import brain_phantom

    phantom = brain_phantom(28)
    sim = SimulationConfig(orientations=ORTHOGONAL, thickness=3.0, noise=0.01, seed=0, motion_deg=2.0, motion_mm=1.0)
    recon = ReconstructConfig(inr=replace(ReconstructConfig().inr, steps=INR_STEPS, restore="off"))
    config = BenchmarkConfig(methods=("bspline", "srr", "inr"), simulation=sim, reconstruct=recon)
    run = RunDir.create(tmp_path_factory.mktemp("bench") / "run", config={"kind": "benchmark"}, command=["test"])
    with run:
        result = run_benchmark(phantom, config=config)
        save_benchmark(run, result, reference=phantom)
    return run.path


def test_benchmark_run_directory_has_everything_the_report_reads(bench_run: Path) -> None:
    ref, recons = find_volumes(bench_run)
    assert ref == bench_run / "reference.nii.gz"
    assert list(recons) == ["bspline", "srr", "inr"]  # the table's order
    history = json.loads((bench_run / "history_inr.json").read_text())
    assert [r["step"] for r in history] == list(range(1, INR_STEPS + 1))
    metrics = json.loads((bench_run / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["rows"]}
    assert rows["inr"]["steps"] == INR_STEPS and rows["inr"]["final_loss"] == history[-1]["loss"]
    # srr fits the slices better than bspline: its data residual is smaller
    assert rows["srr"]["residual_rms"] < rows["bspline"]["residual_rms"]
    assert set(metrics["residuals"]) == {"bspline", "srr", "inr"}
    assert set(metrics["motion"]) == {
        s["name"] for s in json.loads((bench_run / "simulation.json").read_text())["stacks"]
    }
    timings = json.loads((bench_run / "timings.json").read_text())
    assert {"simulate", "bspline", "srr", "inr", "residuals"} <= set(timings)


@pytest.fixture(scope="module")
def reported(bench_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the benchmark run directory elsewhere, reported by ``slicefield report RUN_DIR``."""
    copy = tmp_path_factory.mktemp("moved") / "run"
    shutil.copytree(bench_run, copy)
    assert main(["-q", "report", str(copy)]) == 0
    return copy


def test_report_of_a_copied_run_directory(reported: Path) -> None:
    """The report reads only the run directory: a copy elsewhere gives every figure, embedded."""
    out = reported / "report.html"
    html = out.read_text()
    _assert_self_contained(html)
    stems = ("orthogonal_slices", "zoomed_crops", "difference_maps", "intensity_profiles", "loss_curves")
    stems += ("residuals", "motion")
    for stem in stems:
        assert (reported / "figures" / f"{stem}.png").is_file(), stem
        assert f"id='{stem}'" in html, stem
    images = _images(html)
    assert len(images) == len(list((reported / "figures").glob("*.png")))
    assert all(img.std() > 5 for img in images), "a blank figure"
    for method in ("bspline", "srr", "inr"):
        assert f"<td>{method}</td>" in html
    assert DEFAULT_CAPTION in html
    assert out.stat().st_size < 10 * 2**20


def test_cli_report_options(reported: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "run"
    shutil.copytree(reported, copy)
    before = (copy / "figures" / "orthogonal_slices.png").read_bytes()
    capsys.readouterr()
    assert main(["-q", "report", str(copy), "--center", "8,-10,6", "-o", str(tmp_path / "c.html")]) == 0
    assert str((tmp_path / "c.html").resolve()) in capsys.readouterr().out
    # redrawn, through another point than the default centre of mass
    assert (copy / "figures" / "orthogonal_slices.png").read_bytes() != before
    # --no-figures embeds what is there and redraws nothing
    (copy / "figures" / "zoomed_crops.png").unlink()
    assert main(["-q", "report", str(copy), "--no-figures", "-o", str(tmp_path / "r.html")]) == 0
    assert not (copy / "figures" / "zoomed_crops.png").exists()
    html = (tmp_path / "r.html").read_text()
    assert "id='zoomed_crops'" not in html and "id='orthogonal_slices'" in html


def test_cli_report_rejects_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["-q", "report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and str(tmp_path) in err
    with pytest.raises(SlicefieldError, match="no such run directory"):
        build_report(tmp_path / "missing")


def test_reconstruct_run_dir_without_output(phantom: Volume, tmp_path: Path, capsys) -> None:
    """A fitted method (inr, 3 steps) into a run directory only: volume, model, loss history, residuals, report."""
    from slicefield.acquisition.simulate import simulate

    stacks, _ = simulate(phantom, SimulationConfig(orientations=ORTHOGONAL, thickness=3.0, noise=0.01, seed=0))
    paths = [save_stack(s, tmp_path / f"{s.name}.nii.gz") for s in stacks]
    run = tmp_path / "run"
    argv = ["-q", "reconstruct", *map(str, paths), "--method", "inr", "--steps", "3", "--run-dir", str(run)]
    argv += ["--restore", "off"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["kind"] == "reconstruct"
    assert config["config"]["stacks"] == [str(p) for p in paths]
    assert config["config"]["reconstruct"]["inr"]["steps"] == 3
    for name in ("recon_inr.nii.gz", "model.pt", "environment.json", "timings.json"):
        assert (run / name).is_file(), name
    history = json.loads((run / "history_inr.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 3]
    metrics = json.loads((run / "metrics.json").read_text())
    (row,) = metrics["rows"]
    assert row["method"] == "inr" and row["residual_rms"] > 0 and row["seconds"] > 0
    assert row["steps"] == 3 and row["final_loss"] == history[-1]["loss"]
    assert len(metrics["residuals"]["inr"]["stacks"]) == 3
    html = (run / "report.html").read_text()
    _assert_self_contained(html)
    assert NO_REFERENCE_CAPTION in html and "PSNR" not in html  # no reference: no accuracy columns
    assert "id='difference_maps'" not in html
    assert "id='residuals'" in html and "id='loss_curves'" in html
    # what the console shows (here silenced by -q) is kept in the run's log
    log_text = (run / "log.txt").read_text()
    assert "reconstructing 3 stacks" in log_text and "inr: 3/3" in log_text
    # neither -o nor --run-dir: one actionable line, exit 2
    capsys.readouterr()
    assert main(["-q", "reconstruct", str(paths[0])]) == 2
    assert "--run-dir" in capsys.readouterr().err


def test_cli_benchmark_run_dir(tmp_path: Path, capsys) -> None:
    from conftest import brain_phantom

    ref = save_volume(brain_phantom(24), tmp_path / "hr.nii.gz")
    run = tmp_path / "bench"
    argv = ["-q", "benchmark", str(ref), "--methods", "bspline", "--thickness", "3", "--run-dir", str(run)]
    assert main(argv) == 0
    assert "| bspline" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["kind"] == "benchmark" and config["config"]["benchmark"]["methods"] == ["bspline"]
    html = (run / "report.html").read_text()
    assert "id='difference_maps'" in html and "id='motion'" not in html  # no motion simulated: no motion plot
    assert Image.open(run / "figures" / "orthogonal_slices.png").size[0] == FigureConfig().width_in * FigureConfig().dpi


def test_write_report_captions_by_kind(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "val", config={"validate": {}}, command=["slicefield", "validate"])
    run.update_metrics({"rows": [{"method": "srr", "psnr_masked": 30.0, "seconds": 1.0}], "folds": []})
    html = write_report(run.path).read_text()
    assert "Scores of each method's prediction of slices it did not see" in html
    # a column nobody has a value for is left out
    assert "PSNR brain dB" in html and "SSIM brain" not in html


def test_plane_pixels_match_orthogonal_planes() -> None:
    """The crosshair and zoom box are drawn where orthogonal_planes puts the world point they mark."""
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # x runs right-to-left in the array: LAS
    affine[:3, 3] = [10.0, -12.0, -8.0]
    data = np.zeros((20, 24, 10), np.float32)
    ijk = np.array([4, 15, 6])
    data[tuple(ijk)] = 1.0
    vol = Volume(data, affine)
    point = affine[:3, :3] @ ijk + affine[:3, 3]
    grid = DisplayGrid.covering(vol, pixel_mm=1.0)
    for name, plane in zip(("axial", "coronal", "sagittal"), orthogonal_planes(vol, point, grid=grid), strict=True):
        col, row = _plane_pixels(grid, name, point)
        peak = np.unravel_index(np.nanargmax(plane), plane.shape)
        assert abs(peak[1] - col) <= 0.5 and abs(peak[0] - row) <= 0.5, name


def test_crop_grid_is_centred_and_finer(phantom: Volume) -> None:
    centre = np.array([1.0, -2.0, 3.0])
    crop = crop_grid(phantom, centre, side_mm=12.0)
    assert crop.pixel_mm == pytest.approx(0.5)  # half the 1 mm voxel
    assert crop.shape == (24, 24, 24)
    np.testing.assert_allclose(crop.lo + crop.extent_mm / 2, centre)


def test_motion_summary_rotation_and_shift(phantom: Volume) -> None:
    from slicefield.acquisition.simulate import apply_simulation, sample_simulation

    config = SimulationConfig(orientations=("axial",), thickness=3.0, noise=0.0, seed=0)
    record = sample_simulation(phantom, config)
    n = record.stacks[0].shape[0]
    theta = np.radians(7.0)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    shift = np.eye(4)
    shift[:3, 3] = [3.0, 4.0, 0.0]
    motion = [np.eye(4)] * n
    motion[1], motion[2] = rot, shift
    record.stacks[0].motion = [m.tolist() for m in motion]
    stacks = apply_simulation(phantom, record)
    out = motion_summary(stacks, record)[stacks[0].name]
    assert out["rotation_deg"][1] == pytest.approx(7.0) and out["rotation_deg"][0] == pytest.approx(0.0)
    assert out["displacement_mm"][2] == pytest.approx(5.0) and out["displacement_mm"][0] == pytest.approx(0.0)


def test_profiles_and_loss_curves_pngs(phantom: Volume, tmp_path: Path) -> None:
    vols = {"truth": phantom, "dim": phantom.with_data(phantom.data * 0.5)}
    img = np.asarray(Image.open(intensity_profiles(vols, tmp_path / "p.png", reference="truth", dpi=60)).convert("L"))
    assert img.shape[1] == 9 * 60 and img.std() > 5
    hist = {"inr": [{"step": i + 1, "loss": 1.0 / (i + 1), "data": 0.5 / (i + 1), "prior": 0.1} for i in range(20)]}
    assert np.asarray(Image.open(loss_curves(hist, tmp_path / "l.png")).convert("L")).std() > 5
    with pytest.raises(ValueError, match="no loss history"):
        loss_curves({"inr": []}, tmp_path / "none.png")


def test_make_figures_on_an_empty_run_draws_nothing(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", config={}, command=None)
    assert make_figures(run.path) == {}
    html = write_report(run.path).read_text()
    assert "<img" not in html and "config.json" in html
