"""Tests for ``slicefield benchmark --methods all`` (slicefield.benchmark_all): every method and representation on
every task, through the command line, on a tiny phantom; and the one-line errors of bad options.

Speed: the table's fitted rows have fixed costs that do not shrink with the volume (the warm start's distillation
into a non-voxel field draws ``warm_steps`` x ``batch_voxels`` points; IREM's batch-norm recalibration before the
read-out draws 20 x EVAL_CHUNK / 4 points), so the run uses a shrunk preset (``QUICK`` patched: one stacks task,
x8, no warm-up fits, 2 distillation steps of 2048 points, 256-pixel IREM batches, 16^2 views) and a small EVAL_CHUNK.
The views task fits every field row too (views.field_fit, same distillation settings and 0.2 s budget), and the
MNI152 prior row (views.prior_fit).
CPU only, about 15 s (20 s on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import brain_phantom
from slicefield import benchmark_all
from slicefield.benchmark_all import ROWS, TableConfig
from slicefield.cli import main
from slicefield.errors import SlicefieldError
from slicefield.io import save_volume
from slicefield.reconstruct import ReconstructConfig

#: Side (voxels, 1 mm) of the phantom; downsampled by 2, the truth is about 32^3 at 2 mm (x8: 16 mm slices, 4 a stack).
SIDE = 64


def _tiny_preset() -> TableConfig:
    base = ReconstructConfig()
    return TableConfig(
        thickness_factors=(8,),
        budget_s=0.2,
        downsample=2,
        warm_up=False,
        view_size=16,
        view_iterations=3,
        reconstruct=replace(
            base,
            inr=replace(base.inr, warm_steps=2, batch_voxels=2048),
            irem=replace(base.irem, batch_pixels=256, psf_samples=2),
        ),
    )


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench_all") / "phantom.nii.gz"
    save_volume(brain_phantom(SIDE), path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _table(out: str, task: str) -> dict[str, list[str]]:
    """The rows (cells by representation) of the Markdown table under ``### task`` in the printed output."""
    lines = out.split(f"### {task}\n", 1)[1].strip().split("\n\n", 1)[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {c[0]: c[1:] for c in cells}


def test_all_methods_on_stacks_and_views(
    volume: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import slicefield.fit.engine as engine

    monkeypatch.setattr(benchmark_all, "QUICK", _tiny_preset())
    monkeypatch.setattr(engine, "EVAL_CHUNK", 1024)
    doc_path, run_dir = tmp_path / "table.json", tmp_path / "run"
    argv = ["benchmark", str(volume), "--methods", "all", "--tasks", "stacks,views", "--quick", "--budget", "0.2"]
    rc, out, err = _run([*argv, "--json", str(doc_path), "--run-dir", str(run_dir)], capsys)
    assert rc == 0, err

    doc = json.loads(doc_path.read_text())
    assert list(doc["tables"]) == ["stacks x8", "views"]
    assert doc["budget_s"] == 0.2 and doc["voxel_mm"] == 2.0
    rows = doc["tables"]["stacks x8"]
    assert [r["representation"] for r in rows] == list(ROWS)
    assert all(math.isfinite(r["psnr_brain"]) and math.isfinite(r["ssim_brain"]) for r in rows), rows
    assert all(r["parameters"] > 0 and r["seconds"] > 0 for r in rows)
    printed = _table(out, "stacks x8")
    assert list(printed) == list(ROWS) and all(math.isfinite(float(cells[0])) for cells in printed.values())
    views = doc["tables"]["views"]
    assert views[0]["status"] == "ok" and math.isfinite(views[0]["psnr_views"]) and views[0]["psnr_views"] > 20
    assert [r["representation"] for r in views[1:]] == list(ROWS[3:])
    fitted = [r for r in views[1:] if "prior" not in r["representation"]]
    assert len(fitted) == 5 and all(r["status"] == "ok" for r in fitted), views
    assert all(math.isfinite(r["psnr_views"]) and r["parameters"] > 0 and r["seconds"] > 0 for r in fitted)
    # the gaussians start from the voxel fit's own warm start (same views, budget 0.2 s): close to the voxel row
    gauss = next(r for r in fitted if r["representation"] == "gaussians")
    assert gauss["psnr_views"] > 20
    # the prior row: MNI152 registered to the phantom's voxel fit (meaningless anatomy, but the path runs end to end)
    prior_row = views[-1]
    assert "prior" in prior_row["representation"] and prior_row["status"] == "ok", prior_row
    assert math.isfinite(prior_row["psnr_views"]) and prior_row["parameters"] > 0
    printed_views = _table(out, "views")
    assert list(printed_views)[0] == "voxel (CGLS + FISTA + TV)"
    assert all(math.isfinite(float(printed_views[r["representation"]][0].split()[0])) for r in fitted)

    # the run directory: every stacks row in the report's metrics, the tables, the views' renders and fit
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["rows"]) == len(ROWS) and metrics["tables"] == doc["tables"]
    assert (run_dir / "report.html").is_file() and (run_dir / "views" / "field" / "field.nii.gz").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--methods", "all", "--tasks", "stacks,wiews"], "unknown --tasks 'wiews'; use some of stacks,views"),
        (["--methods", "bspline,nerf"], "unknown --methods 'nerf'; use some of"),
        (["--methods", "bspline", "--tasks", "views"], "--tasks views and --quick apply to --methods all only"),
        (["--methods", "all", "--steps", "10"], "--steps does not apply to --methods all"),
        (["--methods", "all", "--budget", "0"], "time budget must be a positive number of seconds"),
    ],
)
def test_bad_options_give_one_line(
    volume: Path, options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run(["benchmark", str(volume), *options], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and out == ""


def test_unknown_method_error_offers_all(volume: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = _run(["benchmark", str(volume), "--methods", "nerf"], capsys)
    assert err.strip().endswith("or all (every method and representation)")


def test_config_rejects_unknown_task() -> None:
    with pytest.raises(SlicefieldError, match="unknown tasks stack"):
        TableConfig(tasks=("stack",))
