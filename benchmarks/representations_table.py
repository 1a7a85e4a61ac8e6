"""Every representation on every task, one table per task (issue 7), produced by one command in one run.

Usage (about 25 minutes on the shared 2-core CPU)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/representations_table.py ../shared/data/ch2bet.nii.gz \
        --json benchmarks/results/representations_table.json

``--budget S`` sets the time budget of every fitted representation (default 45 s, chosen so that the whole run
fits in about 25 minutes); ``--tasks stacks`` or ``--tasks views`` runs one task; ``--quick`` is a smoke run (a
48^3 crop at 4 mm, 5 s budgets, small view renders).

Truth: the volume (Colin27 skull-stripped, 1 mm) downsampled to 2 mm (Gaussian, sigma 1 voxel, then every 2nd
voxel; as ``benchmarks/validate_ranking.py``), negatives clipped, then cropped to the bounding box of the
voxels above zero plus 3 voxels (Colin27: 82 x 100 x 83 voxels), so that neural fields are feasible on a CPU.

Task ``stacks x4`` / ``stacks x8``: three orthogonal stacks (axial, coronal, sagittal) simulated by
:func:`slicefield.acquisition.simulate.simulate` with slice thickness 4x / 8x the 2 mm voxel (8 mm / 16 mm),
Gaussian PSF, Gaussian noise 1 % of the maximum, seed 0; every method reconstructs on the truth's 2 mm grid:

- ``bspline``, ``srr``: classical (``reconstruct``), no budget;
- ``inr voxel`` / ``planes`` / ``hashgrid`` / ``siren``: ``reconstruct.fit`` with method inr and that
  representation, the CPU defaults (grid mode: exact SRR objective through the forward operator, srr warm start
  distilled into non-voxel fields) except ``steps`` unlimited and ``time_budget_s`` = the budget;
- ``irem``: method irem (the IREM paper's Fourier-feature MLP and schedule, slice mini-batches, no warm start),
  budget as above;
- ``gaussians``: ``fit_gaussians`` (what ``reconstruct --method gaussians`` calls), budget as above;
- ``inr voxel + MNI152 prior``: method inr with ``prior=`` MNI152 2009a (another subject) downsampled the same way
  (default PriorConfig: affine + deformable registration to the srr estimate, local intensity match, automatic
  pull); the registration counts inside the same budget (``fit_field`` starts its clock before it).

The field rows call ``reconstruct.fit`` / ``fit_gaussians`` rather than ``reconstruct`` only to keep the fitted
model for its parameter count; ``reconstruct`` returns ``.volume`` of the same call.

Task ``views``: 72 parallel-beam DRRs (128^2, 5 deg about world S) of the 2 mm truth (written to a temporary
NIfTI), fitted from every 5th (15 views) by ``slicefield views fit`` (CGLS 10 + FISTA 100 + TV, a voxel grid on
the orbit frame), scored on the 57 held-out views (PSNR / SSIM per view, data range = that true view's max - min,
mean over views). Only the voxel fit has a view path; the field rows say "not implemented" (bspline and srr are
slice-stack methods and have no view row).

Columns: PSNR / SSIM brain = ``evaluate(truth, recon, mask=foreground_mask(truth))`` (data range = truth max -
min); wall s = the call's wall time (for field methods: warm start, operators, steps and the final read-out);
parameters = ``sum(p.numel())`` of the fitted model (classical / view rows: the voxels of the grid they solve for);
peak MB = peak resident memory of the whole process during the row (``slicefield.runs.Timer``: psutil RSS sampled
every 20 ms), with the increase over the RSS at the row's start in brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.data import mni152_t1_path
from slicefield.fit.engine import FitConfig
from slicefield.io import load_volume, save_volume
from slicefield.metrics import evaluate, foreground_mask
from slicefield.reconstruct import IREM_FIT, ReconstructConfig, fit, reconstruct
from slicefield.representations.gaussians import GaussianFitConfig, fit_gaussians
from slicefield.runs import Timer, to_jsonable
from slicefield.views.cameras import OrbitConfig
from slicefield.views.fit import ViewFitConfig
from slicefield.views.pipeline import fit_folder, render_orbit_folder
from slicefield.views.render import RenderConfig
from slicefield.volume import Volume

ORTHOGONAL = ("axial", "coronal", "sagittal")
#: Slice thickness as a multiple of the truth's voxel size, per stacks task.
THICKNESS_FACTORS = (4, 8)
#: Downsampling of the 1 mm volume (Gaussian sigma factor/2 voxels, then every factor-th voxel).
DOWNSAMPLE = 2
NOISE = 0.01
#: Voxels of background kept around the brain's bounding box when cropping the truth.
BOX_MARGIN = 3
#: Steps cap for budgeted fits: large, so that the time budget is what stops every fitted representation.
UNLIMITED_STEPS = 10**7
#: The rows of every task, in table order.
ROWS = (
    "bspline",
    "srr",
    "inr voxel",
    "inr planes",
    "inr hashgrid",
    "inr siren",
    "irem (Fourier MLP)",
    "gaussians",
    "inr voxel + MNI152 prior",
)


def downsample(volume: Volume, factor: int) -> Volume:
    """Gaussian anti-aliasing (sigma factor/2 voxels), then every factor-th voxel; affine scaled to match."""
    if factor == 1:
        return volume
    data = ndimage.gaussian_filter(volume.data, 0.5 * factor)[::factor, ::factor, ::factor]
    affine = volume.affine.copy()
    affine[:3, :3] *= factor
    return Volume(np.clip(data, 0, None).astype(np.float32), affine)


def _brain_box(volume: Volume, *, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box (voxel slices) of the voxels above zero, grown by ``margin`` voxels (clipped to the volume)."""
    idx = np.argwhere(volume.data > 0)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, volume.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([s.start for s in box]) + volume.affine[:3, 3]
    return Volume(volume.data[box].copy(), affine)


def _n_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _warm_up() -> None:
    """One tiny fit per kind, so that one-time imports (torch's optimiser pulls in torch._dynamo, seconds) are not
    charged to the first timed row."""
    truth = Volume(np.zeros((12, 12, 12), np.float32), np.eye(4))
    truth.data[3:9, 3:9, 3:9] = 1.0
    stacks, _ = simulate(truth, SimulationConfig(orientations=ORTHOGONAL, thickness=2.0, noise=0.0))
    fit(stacks, truth, config=ReconstructConfig(method="inr", inr=FitConfig(steps=2)))
    fit_gaussians(stacks, truth, config=GaussianFitConfig(steps=2))


def _run_stacks_row(name: str, stacks: list, grid: Volume, prior: Volume, budget: float) -> tuple[Volume, int, dict]:
    """One row of a stacks task: (reconstruction, parameter count, extra facts)."""
    inr = FitConfig(steps=UNLIMITED_STEPS, time_budget_s=budget)
    if name in ("bspline", "srr"):
        return reconstruct(stacks, grid, config=ReconstructConfig(method=name)), int(np.prod(grid.shape)), {}
    if name.startswith("inr ") and "prior" not in name:
        cfg = ReconstructConfig(method="inr", inr=replace(inr, representation=name.split()[1]))
        r = fit(stacks, grid, config=cfg)
    elif name.startswith("irem"):
        cfg = ReconstructConfig(method="irem", irem=replace(IREM_FIT, steps=UNLIMITED_STEPS, time_budget_s=budget))
        r = fit(stacks, grid, config=cfg)
    elif name == "gaussians":
        g = fit_gaussians(stacks, grid, config=GaussianFitConfig(steps=UNLIMITED_STEPS, time_budget_s=budget))
        return g.volume, _n_params(g.model), {"steps": g.steps_done, "gaussians": int(g.model.means.shape[0])}
    elif "prior" in name:
        r = fit(stacks, grid, config=ReconstructConfig(method="inr", inr=inr), prior=prior, prior_name="MNI152")
    else:
        raise ValueError(name)
    return r.volume, _n_params(r.model), {"steps": r.steps_done, "stopped_by_budget": r.stopped_by_budget}


def run_stacks(task: str, truth: Volume, thickness: float, prior: Volume, budget: float) -> list[dict]:
    sim = SimulationConfig(orientations=ORTHOGONAL, thickness=thickness, noise=NOISE, seed=0)
    stacks, _ = simulate(truth, sim)
    grid = Volume(np.zeros(truth.shape, np.float32), truth.affine)
    mask = foreground_mask(truth.data)
    rows = []
    for name in ROWS:
        print(f"[{task}] {name} ...", file=sys.stderr, flush=True)
        with Timer() as t:
            rss0 = t.peak_rss_mb
            out, n_params, extra = _run_stacks_row(name, stacks, grid, prior, budget)
        m = evaluate(truth.data, out.data, mask=mask)
        row = {
            "task": task,
            "representation": name,
            "psnr_brain": m["psnr_masked"],
            "ssim_brain": m["ssim_masked"],
            "seconds": t.seconds,
            "parameters": n_params,
            "peak_rss_mb": t.peak_rss_mb,
            "rss_start_mb": rss0,
            "budget_s": None if name in ("bspline", "srr") else budget,
            **extra,
        }
        print(f"  {row['psnr_brain']:.2f} dB, SSIM {row['ssim_brain']:.4f}, {t.seconds:.0f} s", file=sys.stderr)
        rows.append(row)
    return rows


def run_views(truth: Volume, work: Path, *, size: int, iterations: int) -> list[dict]:
    path = work / "truth_2mm.nii.gz"
    save_volume(truth, path)
    orbit = OrbitConfig(n_views=72, step_deg=5.0, axis="S", size=size)
    fit_cfg = ViewFitConfig(train_every=5, iterations=iterations)
    print("[views] rendering 72 views ...", file=sys.stderr, flush=True)
    with Timer() as t_render:
        views_dir = render_orbit_folder(
            path, work / "views", orbit_config=orbit, render_config=RenderConfig(), gif=False
        )
    rows = []
    for name in ("voxel",) + ROWS[3:]:
        if name != "voxel":
            rows.append({"task": "views", "representation": name, "status": "not implemented"})
            continue
        print("[views] voxel fit ...", file=sys.stderr, flush=True)
        with Timer() as t:
            rss0 = t.peak_rss_mb
            metrics = fit_folder(views_dir, work / "field", fit_cfg)
        n_vox = int(np.prod(load_volume(work / "field" / "field_orbit.nii.gz").shape))
        rows.append(
            {
                "task": "views",
                "representation": "voxel (CGLS + FISTA + TV)",
                "status": "ok",
                "psnr_views": metrics["psnr_mean"],
                "ssim_views": metrics["ssim_mean"],
                "psnr_views_min": metrics["psnr_min"],
                "n_train": metrics["n_train"],
                "n_held_out": metrics["n_held_out"],
                "seconds": t.seconds,
                "render_s": t_render.seconds,
                "parameters": n_vox,
                "peak_rss_mb": t.peak_rss_mb,
                "rss_start_mb": rss0,
            }
        )
    return rows


def _mb(r: dict) -> str:
    return f"{r['peak_rss_mb']:.0f} (+{max(0.0, r['peak_rss_mb'] - r['rss_start_mb']):.0f})"


def format_stacks(rows: list[dict]) -> str:
    lines = [
        "| representation | PSNR brain dB | SSIM brain | wall s | parameters | peak MB (+ over start) | steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        steps = r.get("steps", "")
        lines.append(
            f"| {r['representation']} | {r['psnr_brain']:.2f} | {r['ssim_brain']:.4f} | {r['seconds']:.0f} | "
            f"{r['parameters']:,} | {_mb(r)} | {steps} |"
        )
    return "\n".join(lines)


def format_views(rows: list[dict]) -> str:
    lines = [
        "| representation | PSNR held-out views dB (min) | SSIM held-out views | wall s | parameters | peak MB "
        "(+ over start) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['representation']} | not implemented | | | | |")
            continue
        lines.append(
            f"| {r['representation']} | {r['psnr_views']:.2f} ({r['psnr_views_min']:.2f}) | {r['ssim_views']:.4f} | "
            f"{r['seconds']:.0f} | {r['parameters']:,} | {_mb(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume", help="the truth (1 mm NIfTI), e.g. ../shared/data/ch2bet.nii.gz")
    ap.add_argument("--budget", type=float, default=45.0, help="time budget of every fitted representation, s")
    ap.add_argument("--quick", action="store_true", help="smoke run: 48^3 crop at 4 mm, 5 s budgets, small views")
    ap.add_argument("--json", help="write rows, machine and command here (after every task)")
    ap.add_argument("--tasks", default="stacks,views", help="comma-separated subset of stacks,views")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    factor = 2 * DOWNSAMPLE if args.quick else DOWNSAMPLE
    budget = 5.0 if args.quick else args.budget
    truth = downsample(load_volume(args.volume), factor)
    prior = downsample(load_volume(mni152_t1_path()), factor)
    crop = _brain_box(truth, margin=BOX_MARGIN)
    truth = _crop(truth, crop)
    if args.quick:
        truth = _crop(truth, tuple(slice(max(0, n // 2 - 24), n // 2 + 24) for n in truth.shape))
    voxel_mm = float(np.abs(truth.affine[:3, :3]).max())
    print(f"truth {truth.shape} at {voxel_mm:g} mm; prior {prior.shape}", file=sys.stderr, flush=True)
    _warm_up()
    tables: dict[str, list[dict]] = {}
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }

    def record() -> None:  # after every task, so that a late failure keeps the tables so far
        print(f"\n### {task}\n\n{format_views(rows) if task == 'views' else format_stacks(rows)}", flush=True)
        if args.json:
            doc = {
                "command": sys.argv,
                "truth_shape": list(truth.shape),
                "voxel_mm": voxel_mm,
                "crop_voxels_of_downsampled": [[b.start, b.stop] for b in crop],
                "budget_s": budget,
                "total_s": time.perf_counter() - start,
                "tables": tables,
                "environment": {
                    **env,
                    "load_avg": os.getloadavg(),
                    "utc": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            }
            Path(args.json).write_text(json.dumps(to_jsonable(doc), indent=1) + "\n")

    if "stacks" in args.tasks:
        _warm_up()
        for k in THICKNESS_FACTORS:
            task = f"stacks x{k}"
            tables[task] = rows = run_stacks(task, truth, k * voxel_mm, prior, budget)
            record()
    if "views" in args.tasks:
        with tempfile.TemporaryDirectory(prefix="sf-reptable-") as tmp:
            task = "views"
            size, its = (48, 10) if args.quick else (128, 100)
            tables[task] = rows = run_views(truth, Path(tmp), size=size, iterations=its)
            record()
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
