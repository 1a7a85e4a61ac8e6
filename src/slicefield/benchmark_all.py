"""Every method and representation on every task, one table per task (``slicefield benchmark --methods all``).

Truth: the volume downsampled by ``downsample`` (Gaussian, sigma downsample/2 voxels, then every downsample-th
voxel; a 1 mm volume becomes 2 mm by default), negatives clipped, then cropped to the bounding box of the voxels
above zero plus ``box_margin`` voxels (Colin27: 82 x 100 x 83 voxels), so that neural fields are feasible on a CPU.

Task ``stacks x4`` / ``stacks x8``: stacks simulated by :func:`slicefield.acquisition.simulate.simulate` (by default
three orthogonal stacks, Gaussian PSF, Gaussian noise 1 % of the maximum, seed 0) with slice thickness 4x / 8x the
truth's voxel (8 mm / 16 mm at 2 mm); every method reconstructs on the truth's grid:

- ``bspline``, ``srr``: classical (``reconstruct``), no budget;
- ``inr voxel`` / ``planes`` / ``hashgrid`` / ``siren``: ``reconstruct.fit`` with method inr and that
  representation, the defaults (on a CPU: grid mode, the exact SRR objective through the forward operator, srr warm
  start distilled into non-voxel fields) except ``steps`` unlimited and ``time_budget_s`` = the budget;
- ``irem``: method irem (the IREM paper's Fourier-feature MLP and schedule, slice mini-batches, no warm start),
  budget as above;
- ``gaussians``: ``fit_gaussians`` (what ``reconstruct --method gaussians`` calls), budget and device as above;
- ``inr voxel + MNI152 prior``: method inr with ``prior=`` MNI152 2009a (another subject) downsampled the same way
  (default PriorConfig: affine + deformable registration to the srr estimate, local intensity match, automatic
  pull); the registration counts inside the same budget (``fit_field`` starts its clock before it).

The field rows call ``reconstruct.fit`` / ``fit_gaussians`` rather than ``reconstruct`` only to keep the fitted
model for its parameter count; ``reconstruct`` returns ``.volume`` of the same call. The budget is checked after
each optimisation step, so a warm start or the final read-out can run past it: wall s is the real time of a row.

Task ``views``: 72 parallel-beam DRRs (``view_size``^2 pixels, 5 deg about world S) of the truth (written to
``work_dir`` as NIfTI), fitted from every 5th (15 views) by ``slicefield views fit`` (CGLS 10 + FISTA
``view_iterations`` + TV, a voxel grid on the orbit frame), scored on the 57 held-out views (PSNR / SSIM per view,
data range = that true view's max - min, mean over views). The other rows (planes, hashgrid, siren, irem, gaussians)
are :mod:`slicefield.views.field_fit` on the same views and split, budget as the stacks rows: the field read on the
orbit grid (warm start: the voxel fit with min(20, ``view_iterations``) FISTA iterations, distilled in the inr
config's ``warm_steps``), or one Gaussian per voxel rendered by closed-form line integrals. The MNI152-prior row is
:func:`slicefield.views.prior_fit.fit_views_prior`: the same warm voxel fit is the reference that MNI152 is
registered to (:data:`~slicefield.views.prior_fit.VIEW_PRIOR`), then CGLS + FISTA from the matched prior
(:data:`~slicefield.views.prior_fit.PRIOR_ITERATIONS`), within the budget (registration included); without a
prior volume the row is skipped (bspline and srr are slice-stack methods and have no view row).

Columns: PSNR / SSIM brain = ``evaluate(truth, recon, mask=foreground_mask(truth))`` (data range = truth max -
min); wall s = the call's wall time; parameters = ``sum(p.numel())`` of the fitted model (classical / view rows: the
voxels of the grid they solve for); peak MB = peak resident memory of the whole process during the row
(``slicefield.runs.Timer``: psutil RSS sampled every 20 ms), with the increase over the RSS at the row's start in
brackets.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from .acquisition.simulate import SimulationConfig, simulate
from .errors import SlicefieldError
from .metrics import evaluate, foreground_mask
from .reconstruct import ReconstructConfig
from .runs import Timer
from .volume import Stack, Volume

log = logging.getLogger(__name__)

#: The tasks, in run order.
TASKS = ("stacks", "views")
#: Slice thickness as a multiple of the truth's voxel size, one stacks task each.
THICKNESS_FACTORS = (4, 8)
#: Simulated noise std as a fraction of the truth's maximum.
NOISE = 0.01
#: Steps cap for budgeted fits: large, so that the time budget is what stops every fitted representation.
UNLIMITED_STEPS = 10**7
#: Rows without a time budget (classical reconstructions).
CLASSICAL = ("bspline", "srr")
#: The rows of every stacks task, in table order.
ROWS = (
    *CLASSICAL,
    "inr voxel",
    "inr planes",
    "inr hashgrid",
    "inr siren",
    "irem (Fourier MLP)",
    "gaussians",
    "inr voxel + MNI152 prior",
)
#: The views task's orbit: number of views, degrees between them, every how many-th view is a training view.
N_VIEWS, VIEW_STEP_DEG, TRAIN_EVERY = 72, 5.0, 5


@dataclass(frozen=True)
class TableConfig:
    """What ``run_table`` runs; the defaults are the published table's (benchmarks/RESULTS.md)."""

    tasks: tuple[str, ...] = TASKS
    """Tasks, a subset of TASKS: ``stacks`` (one table per thickness factor) and ``views``."""
    thickness_factors: tuple[int, ...] = THICKNESS_FACTORS
    """Slice thickness of the stacks tasks, as multiples of the truth's voxel size."""
    budget_s: float = 45.0
    """Time budget (s) of every fitted representation (the classical rows have none)."""
    downsample: int = 2
    """Downsampling factor of the input volume (1: none); the truth's voxel is this many input voxels."""
    box_margin: int = 3
    """Voxels of background kept around the brain's bounding box when cropping the truth."""
    crop_side: int | None = None
    """Also keep only the central ``crop_side`` voxels along each axis of the truth (None: no such crop)."""
    simulation: SimulationConfig = field(default_factory=lambda: SimulationConfig(noise=NOISE, seed=0))
    """Acquisition of the stacks tasks; its ``thickness`` is replaced by factor x the truth's voxel size."""
    view_size: int = 128
    """Views task: detector width and height in pixels."""
    view_iterations: int = 100
    """Views task: FISTA iterations of the voxel fit."""
    device: str = "auto"
    """inr / irem / gaussians rows: auto (CUDA when available), cpu or cuda (views run on the CPU)."""
    warm_up: bool = True
    """Run one tiny fit of each kind first, so that one-time imports (seconds) are not charged to the first row."""
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    """Per-method options of the rows (their defaults: the published table's); the fitted rows' ``steps``,
    ``time_budget_s`` and ``device`` are replaced by UNLIMITED_STEPS, the budget and ``device``."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise SlicefieldError(
                f"unknown tasks {','.join(unknown) or '(none)'}", fix=f"use some of {','.join(TASKS)}"
            )
        if not self.budget_s > 0:
            raise SlicefieldError(
                f"time budget must be a positive number of seconds, got {self.budget_s:g}", fix="pass e.g. --budget 45"
            )
        if self.downsample < 1 or not self.thickness_factors or min(self.thickness_factors) <= 0:
            raise SlicefieldError("downsample must be >= 1 and thickness factors > 0")


#: A smoke run: the truth at 4x downsampling cropped to 48^3, 5 s budgets, 48^2 views fitted in 10 iterations.
QUICK = TableConfig(budget_s=5.0, downsample=4, crop_side=48, view_size=48, view_iterations=10)


@dataclass
class TableResult:
    """The tables of a run and the truth they were scored against."""

    truth: Volume
    """The downsampled, cropped truth (every method reconstructs on its grid)."""
    crop: tuple[slice, slice, slice]
    """The brain box, in voxels of the downsampled volume."""
    tables: dict[str, list[dict]]
    """Rows per task name (``stacks x4``, ``stacks x8``, ``views``), in run order."""
    budget_s: float
    seconds: float = 0.0
    """Wall time of the whole run."""

    @property
    def voxel_mm(self) -> float:
        return float(np.abs(self.truth.affine[:3, :3]).max())

    def to_json(self) -> dict:
        return {
            "truth_shape": list(self.truth.shape),
            "voxel_mm": self.voxel_mm,
            "crop_voxels_of_downsampled": [[b.start, b.stop] for b in self.crop],
            "budget_s": self.budget_s,
            "total_s": self.seconds,
            "tables": self.tables,
        }


def downsample(volume: Volume, factor: int) -> Volume:
    """Gaussian anti-aliasing (sigma factor/2 voxels), then every factor-th voxel, negatives clipped; affine
    scaled to match."""
    if factor == 1:
        return volume
    data = ndimage.gaussian_filter(volume.data, 0.5 * factor)[::factor, ::factor, ::factor]
    affine = volume.affine.copy()
    affine[:3, :3] *= factor
    return Volume(np.clip(data, 0, None).astype(np.float32), affine)


def _brain_box(volume: Volume, *, margin: int) -> tuple[slice, slice, slice]:
    """Bounding box (voxel slices) of the voxels above zero, grown by ``margin`` voxels (clipped to the volume)."""
    idx = np.argwhere(volume.data > 0)
    if len(idx) == 0:
        raise SlicefieldError("the volume has no voxel above zero", fix="pass a volume with a positive foreground")
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, volume.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ np.array([s.start for s in box]) + volume.affine[:3, 3]
    return Volume(volume.data[box].copy(), affine)


def prepare_truth(volume: Volume, *, config: TableConfig) -> tuple[Volume, tuple[slice, slice, slice]]:
    """The truth of a table (module docstring) and its brain box in voxels of the downsampled volume."""
    truth = downsample(volume, config.downsample)
    box = _brain_box(truth, margin=config.box_margin)
    truth = _crop(truth, box)
    if config.crop_side is not None:
        half = config.crop_side // 2
        truth = _crop(truth, tuple(slice(max(0, n // 2 - half), n // 2 + half) for n in truth.shape))
    return truth, box


def _n_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _warm_up(device: str) -> None:
    """One tiny fit per kind, so that one-time imports (torch's optimiser pulls in torch._dynamo, seconds) are not
    charged to the first timed row."""
    from .fit.engine import FitConfig
    from .reconstruct import ReconstructConfig, fit
    from .representations.gaussians import GaussianFitConfig, fit_gaussians

    truth = Volume(np.zeros((12, 12, 12), np.float32), np.eye(4))
    truth.data[3:9, 3:9, 3:9] = 1.0
    stacks, _ = simulate(truth, SimulationConfig(thickness=2.0, noise=0.0))
    fit(stacks, truth, config=ReconstructConfig(method="inr", inr=FitConfig(steps=2, device=device)))
    fit_gaussians(stacks, truth, config=GaussianFitConfig(steps=2, device=device))


def _stacks_row(
    name: str, stacks: list[Stack], grid: Volume, prior: Volume | None, *, config: TableConfig
) -> tuple[Volume, int, dict]:
    """One row of a stacks task: (reconstruction, parameter count, extra facts)."""
    from .reconstruct import fit, reconstruct
    from .representations.gaussians import fit_gaussians

    base = config.reconstruct
    budgeted = {"steps": UNLIMITED_STEPS, "time_budget_s": config.budget_s, "device": config.device}
    inr = replace(base.inr, **budgeted)
    if name in CLASSICAL:
        return reconstruct(stacks, grid, config=replace(base, method=name)), int(np.prod(grid.shape)), {}
    if name.startswith("inr ") and "prior" not in name:
        r = fit(stacks, grid, config=replace(base, method="inr", inr=replace(inr, representation=name.split()[1])))
    elif name.startswith("irem"):
        r = fit(stacks, grid, config=replace(base, method="irem", irem=replace(base.irem, **budgeted)))
    elif name == "gaussians":
        cfg = replace(base.gaussians, steps=UNLIMITED_STEPS, time_budget_s=config.budget_s, device=config.device)
        g = fit_gaussians(stacks, grid, config=cfg)
        return g.volume, _n_params(g.model), {"steps": g.steps_done, "gaussians": int(g.model.means.shape[0])}
    elif "prior" in name:
        r = fit(stacks, grid, config=replace(base, method="inr", inr=inr), prior=prior, prior_name="MNI152")
    else:
        raise ValueError(f"unknown row {name!r}")
    return r.volume, _n_params(r.model), {"steps": r.steps_done, "stopped_by_budget": r.stopped_by_budget}


def run_stacks(task: str, truth: Volume, *, thickness_mm: float, prior: Volume, config: TableConfig) -> list[dict]:
    """Every row of ROWS on stacks of ``thickness_mm`` simulated from ``truth``, scored on the truth's grid."""
    stacks, _ = simulate(truth, replace(config.simulation, thickness=thickness_mm))
    grid = Volume(np.zeros(truth.shape, np.float32), truth.affine)
    mask = foreground_mask(truth.data)
    rows = []
    for name in ROWS:
        log.info("[%s] %s ...", task, name)
        with Timer() as t:
            rss0 = t.peak_rss_mb
            out, n_params, extra = _stacks_row(name, stacks, grid, prior, config=config)
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
            "budget_s": None if name in CLASSICAL else config.budget_s,
            **extra,
        }
        log.info("  %.2f dB, SSIM %.4f, %.0f s", row["psnr_brain"], row["ssim_brain"], t.seconds)
        rows.append(row)
    return rows


def run_views(truth: Volume, work: Path, *, config: TableConfig, prior: Volume | None = None) -> list[dict]:
    """The views task (module docstring); renders and the fitted field are written under ``work``.

    prior: the prior row's volume (any grid); None: that row is skipped."""
    from .io import load_volume, save_volume
    from .views.cameras import OrbitConfig
    from .views.fit import ViewFitConfig, view_metrics
    from .views.pipeline import fit_folder, render_orbit_folder
    from .views.render import RenderConfig

    path = work / "truth.nii.gz"
    save_volume(truth, path)
    orbit = OrbitConfig(n_views=N_VIEWS, step_deg=VIEW_STEP_DEG, axis="S", size=config.view_size)
    log.info("[views] rendering %d views ...", N_VIEWS)
    with Timer() as t_render:
        views_dir = render_orbit_folder(
            path, work / "views", orbit_config=orbit, render_config=RenderConfig(), gif=False
        )
    log.info("[views] voxel fit ...")
    with Timer() as t:
        rss0 = t.peak_rss_mb
        metrics = fit_folder(
            views_dir, work / "field", ViewFitConfig(train_every=TRAIN_EVERY, iterations=config.view_iterations)
        )
    rows = [
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
            "parameters": int(np.prod(load_volume(work / "field" / "field_orbit.nii.gz").shape)),
            "peak_rss_mb": t.peak_rss_mb,
            "rss_start_mb": rss0,
        }
    ]
    # "inr voxel" is the voxel fit above; the other rows fit slicefield.views.field_fit on the same views and budget
    from .views.field_fit import FieldViewFitConfig, fit_views_field, fit_views_gaussians
    from .views.io import read_views

    views = read_views(views_dir)
    field_cfg = FieldViewFitConfig(
        train_every=TRAIN_EVERY,
        warm=ViewFitConfig(iterations=min(20, config.view_iterations)),
        warm_steps=config.reconstruct.inr.warm_steps,
        batch_voxels=config.reconstruct.inr.batch_voxels,
        time_budget_s=config.budget_s,
        device=config.device,
    )
    for name in ROWS[3:]:
        if "prior" in name and prior is None:
            rows.append({"task": "views", "representation": name, "status": "skipped",
                         "reason": "no prior volume was given"})  # fmt: skip
            continue
        log.info("[views] %s ...", name)
        with Timer() as t:
            rss0 = t.peak_rss_mb
            if "prior" in name:
                from .views.prior_fit import fit_views_prior

                fit, _ = fit_views_prior(views, prior, config=field_cfg, name="MNI152")
                n_params = int(np.prod(fit.grid.shape))
            elif name == "gaussians":
                fit, keep, _ = fit_views_gaussians(views, config=field_cfg)
                n_params = int(keep.sum())
            else:
                rep = "irem" if name.startswith("irem") else name.split()[1]
                fit, model = fit_views_field(views, representation=rep, config=field_cfg)
                n_params = _n_params(model)
        scores = [view_metrics(views.images[k], r) for k, r in zip(fit.held_out, fit.rendered, strict=True)]
        psnrs = [m["psnr"] for m in scores]
        rows.append({
            "task": "views", "representation": name, "status": "ok",
            "psnr_views": float(np.mean(psnrs)), "ssim_views": float(np.mean([m["ssim"] for m in scores])),
            "psnr_views_min": float(np.min(psnrs)), "n_train": len(fit.train), "n_held_out": len(fit.held_out),
            "seconds": t.seconds, "parameters": n_params, "peak_rss_mb": t.peak_rss_mb, "rss_start_mb": rss0,
            "budget_s": config.budget_s,
        })  # fmt: skip
        log.info("  %.2f dB held-out views, %.0f s", rows[-1]["psnr_views"], t.seconds)
    return rows


def run_table(
    volume: Volume,
    *,
    config: TableConfig = TableConfig(),
    prior: Volume | None = None,
    work_dir: str | Path | None = None,
    on_table: Callable[[str, list[dict], TableResult], None] | None = None,
) -> TableResult:
    """Every method and representation on every task of ``config`` (module docstring), scored against the truth
    prepared from ``volume`` (``prepare_truth``).

    prior: the prior of the prior row, on any grid (default: MNI152, downsampled like the volume).
    work_dir: folder for the views task's renders and fit (default: a temporary folder, removed).
    on_table: called after each task with its name, its rows and the result so far (so that a late failure keeps
    the tables so far).
    """
    start = time.perf_counter()
    truth, box = prepare_truth(volume, config=config)
    if prior is None:  # the stacks and the views tasks both have a prior row
        from .data import mni152_t1_path
        from .io import load_volume

        prior = downsample(load_volume(mni152_t1_path()), config.downsample)
    result = TableResult(truth, box, {}, config.budget_s)
    log.info("truth %s at %g mm; prior %s", truth.shape, result.voxel_mm, None if prior is None else prior.shape)

    def done(task: str, rows: list[dict]) -> None:
        result.tables[task] = rows
        result.seconds = time.perf_counter() - start
        if on_table is not None:
            on_table(task, rows, result)

    if "stacks" in config.tasks:
        if config.warm_up:
            _warm_up(config.device)
        for k in config.thickness_factors:
            task = f"stacks x{k}"
            done(task, run_stacks(task, truth, thickness_mm=k * result.voxel_mm, prior=prior, config=config))
    if "views" in config.tasks:
        if work_dir is None:
            with tempfile.TemporaryDirectory(prefix="sf-table-") as tmp:
                done("views", run_views(truth, Path(tmp), config=config, prior=prior))
        else:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            done("views", run_views(truth, Path(work_dir), config=config, prior=prior))
    return result


def _mb(r: dict) -> str:
    return f"{r['peak_rss_mb']:.0f} (+{max(0.0, r['peak_rss_mb'] - r['rss_start_mb']):.0f})"


def format_stacks(rows: list[dict]) -> str:
    """A stacks task's rows as a Markdown table."""
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
    """The views task's rows as a Markdown table."""
    lines = [
        "| representation | PSNR held-out views dB (min) | SSIM held-out views | wall s | parameters | peak MB "
        "(+ over start) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['representation']} | {r['status']} | | | | |")  # reason in the JSON
            continue
        lines.append(
            f"| {r['representation']} | {r['psnr_views']:.2f} ({r['psnr_views_min']:.2f}) | {r['ssim_views']:.4f} | "
            f"{r['seconds']:.0f} | {r['parameters']:,} | {_mb(r)} |"
        )
    return "\n".join(lines)


def format_task(task: str, rows: list[dict]) -> str:
    """One task's table under a Markdown heading (what the script and the CLI print after each task)."""
    return f"\n### {task}\n\n{format_views(rows) if task == 'views' else format_stacks(rows)}"


def report_rows(tables: dict[str, list[dict]]) -> list[dict]:
    """The stacks rows in the keys of :data:`slicefield.benchmark.COLUMNS` (a run report's metrics table), method
    ``"<task>: <representation>"``; the views rows are scored on views, not brain voxels, and are left out."""
    return [
        {
            "method": f"{r['task']}: {r['representation']}",
            "psnr_masked": r["psnr_brain"],
            "ssim_masked": r["ssim_brain"],
            "seconds": r["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
        }
        for rows in tables.values()
        for r in rows
        if "psnr_brain" in r
    ]
