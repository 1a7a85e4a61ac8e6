"""Folder-level steps of the generative radiance field, as the CLI runs them.

``train_folder``: subjects folder -> model folder::

    gan/
      model.pt          field, encoder, discriminator, training latents (weights_only=True)
      config.json       NerfConfig, cube size, subjects, augmentation, timings
      history.json      losses every 10 iterations
      metrics.json      held-out views of the training subjects: PSNR / SSIM per subject, mean and sd
      checkpoint.pt     for --resume
      reference.nii.gz  the first subject in the canonical cube (the others are registered to it)
      views/<subject>/  the real subjects' true views in the model's protocol (a views folder)

``render_subject``: a new subject's true views in the model's protocol (what ``reconstruct_folder`` takes).
``reconstruct_folder``: one view (PNG of such a views folder) -> all views, a volume, metrics where the truth is known.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import SlicefieldError
from ..io import load_volume, save_volume
from ..volume import Volume
from .model import NerfConfig
from .train import (
    MODEL_FILE,
    CubeVolume,
    GenerativeModel,
    ProgressFn,
    SingleViewConfig,
    augmented,
    cube_affine,
    cube_size_mm,
    field_volume,
    find_subjects,
    load_model,
    model_cameras,
    reconstruct_single_view,
    render_views,
    save_model,
    to_cube,
    train,
    training_views,
    true_views,
    write_json,
)

#: The first training subject in the canonical cube: what later subjects are registered to.
REFERENCE_FILE = "reference.nii.gz"
UNITS = {
    "drr": "mean intensity along the ray's chord through the model's cube (line integral / cube side), in units "
    "of the subject's 99.5th percentile foreground intensity",
    "emission": "emission-absorption value (dimensionless)",
}


def _name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def write_subject_views(out_dir: Path, cube: CubeVolume, images: np.ndarray, *, config: NerfConfig, cube_mm: float):
    """A views folder (``slicefield.views.io``) of a cube subject in the model's protocol."""
    from ..views.io import write_views

    cameras = model_cameras(config, cube_mm)
    return write_views(
        out_dir,
        images,
        cameras,
        angles_deg=[k * config.step_deg for k in range(config.n_views)],
        meta={
            "subject": {"shape": list(cube.volume.shape), "affine": cube.subject_affine().tolist()},
            "units": UNITS[config.mode],
            "render": {"mode": config.mode},
            "nerf": {
                "cube_mm": cube_mm,
                "canonical_to_subject": cube.canonical_to_subject.tolist(),
                "image_size": config.image_size,
                "subject": cube.name,
            },
        },
        gif=True,
    )


def held_out_metrics(model: GenerativeModel, z: torch.Tensor, truth: np.ndarray, views: list[int]) -> dict:
    """Mean PSNR / SSIM over ``views`` of the rendering of latent ``z`` against ``truth`` ``(n_views, S, S)``."""
    from ..views.fit import view_metrics

    cameras = [model.cameras[k] for k in views]
    rendered = render_views(model.field, z, cameras, cube_mm=model.cube_mm, config=model.config)
    rows = [view_metrics(truth[k], r) for k, r in zip(views, rendered, strict=True)]
    return {
        "psnr": float(np.mean([r["psnr"] for r in rows])),
        "ssim": float(np.mean([r["ssim"] for r in rows])),
        "views": len(rows),
    }


def train_folder(
    subjects_dir: str | Path,
    out_dir: str | Path,
    *,
    config: NerfConfig,
    augment: int = 0,
    equalize: bool = False,
    modality: str = "t1",
    register: bool = True,
    resume: bool = False,
    time_budget_s: float | None = None,
    progress: ProgressFn | None = None,
    info=print,
) -> dict:
    """Train a generative radiance field on every subject of a folder (plus ``augment`` deformed copies of each)
    and write the model folder (module docstring). With ``register``, every subject after the first is rigidly
    registered to the first (the reference, kept as ``reference.nii.gz`` for ``render_subject``). Returns the
    metrics."""
    t0 = time.perf_counter()
    files = find_subjects(subjects_dir, modality=modality)
    volumes = [load_volume(f) for f in files]  # bad input stops here, before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cube_mm = cube_size_mm(volumes)
    real: list[CubeVolume] = []
    for f, v in zip(files, volumes, strict=True):
        reference = real[0] if register and real else None
        real.append(
            to_cube(
                v,
                name=_name(f),
                size=config.volume_size,
                cube_mm=cube_mm,
                equalize=equalize,
                path=f,
                reference=reference,
            )
        )
    save_volume(real[0].volume, out / REFERENCE_FILE)
    cubes = real + (augmented(real, n=augment, seed=config.seed) if augment else [])
    info(
        f"nerf train: {len(real)} subject(s) + {len(cubes) - len(real)} augmented copies, cube {cube_mm:.0f} mm "
        f"at {config.volume_size}^3, {config.n_views} views of {config.image_size}^2 (training on every "
        f"{config.train_every}th), {config.iterations} iterations"
    )
    cameras = model_cameras(config, cube_mm)
    views = np.stack([true_views(c, cameras, mode=config.mode, cube_mm=cube_mm) for c in cubes])
    for c, img in zip(real, views, strict=False):
        write_subject_views(out / "views" / c.name, c, img, config=config, cube_mm=cube_mm)
    prep_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model, history = train(
        cubes,
        views,
        config=config,
        cube_mm=cube_mm,
        checkpoint_dir=out,
        resume=resume,
        progress=progress,
        time_budget_s=time_budget_s,
    )
    train_s = time.perf_counter() - t1
    save_model(model, out / MODEL_FILE)
    _, held = training_views(config.n_views, config.train_every)
    per_subject = {
        c.name: held_out_metrics(model, model.latents[k : k + 1], views[k], held) for k, c in enumerate(real)
    }
    metrics = {
        "held_out_views": {
            "psnr_mean": float(np.mean([m["psnr"] for m in per_subject.values()])),
            "psnr_sd": float(np.std([m["psnr"] for m in per_subject.values()])),
            "ssim_mean": float(np.mean([m["ssim"] for m in per_subject.values()])),
            "ssim_sd": float(np.std([m["ssim"] for m in per_subject.values()])),
            "per_subject": per_subject,
        },
        "final_mse": history[-1]["mse"] if history else None,
    }
    write_json(out / "history.json", history)
    write_json(out / "metrics.json", metrics)
    write_json(
        out / "config.json",
        {
            "nerf": asdict(config),
            "cube_mm": cube_mm,
            "subjects": [str(f) for f in files],
            "augment_per_subject": augment,
            "augmentation": "random affine + elastic + intensity (slicefield.synth.augment), sampled then applied"
            if augment
            else None,
            "equalize": equalize,
            "modality": modality,
            "register": register,
            "seconds": {"prepare": prep_s, "train": train_s},
        },
    )
    return metrics


def render_subject(model_dir: str | Path, volume_path: str | Path, out_dir: str | Path, *, equalize: bool = False):
    """A subject's true views in the model's protocol (cube, orbit, units; registered to the model's reference
    when the model was trained with registration), as a views folder."""
    model = load_model(model_dir)
    path = Path(volume_path)
    settings = json.loads((Path(model_dir) / "config.json").read_text()) if Path(model_dir).is_dir() else {}
    ref_path = Path(model_dir) / REFERENCE_FILE
    reference = None
    if settings.get("register") and ref_path.is_file():
        reference = CubeVolume("reference", load_volume(ref_path), np.eye(4))
    cube = to_cube(
        load_volume(path),
        name=_name(path),
        size=model.config.volume_size,
        cube_mm=model.cube_mm,
        equalize=equalize,
        path=path,
        reference=reference,
    )
    images = true_views(cube, model.cameras, mode=model.config.mode, cube_mm=model.cube_mm)
    return write_subject_views(Path(out_dir), cube, images, config=model.config, cube_mm=model.cube_mm)


def read_single_view(png: str | Path, *, model: GenerativeModel) -> tuple[np.ndarray, int, dict]:
    """One PNG of a views folder in the model's protocol -> ``(image in model units, view index, cameras.json)``."""
    from PIL import Image

    png = Path(png)
    cam_file = png.parent / "cameras.json"
    if not png.is_file():
        raise SlicefieldError("no such view", path=png, fix="pass a view_NNN.png of a views folder")
    if not cam_file.is_file():
        raise SlicefieldError(
            "has no cameras.json beside it (its pose and intensity scale are unknown)",
            path=png,
            fix="render the subject with slicefield nerf render MODEL_DIR subject.nii.gz --out-dir views/",
        )
    doc = json.loads(cam_file.read_text(encoding="utf-8"))
    nerf = doc.get("nerf")
    if not nerf or abs(float(nerf["cube_mm"]) - model.cube_mm) > 1e-3 * model.cube_mm:
        raise SlicefieldError(
            "was not rendered in this model's protocol (cube, orbit)",
            path=png,
            fix="render the subject with slicefield nerf render MODEL_DIR subject.nii.gz --out-dir views/",
        )
    (entry,) = [v for v in doc["views"] if v["image"] == png.name] or [None]
    if entry is None:
        raise SlicefieldError("is not listed in its cameras.json", path=png, fix="re-render the views")
    raw = np.asarray(Image.open(png), dtype=np.float64)
    info = doc["png"]
    value = info["png_min"] + raw / (2 ** int(info["bits"]) - 1) * (info["png_max"] - info["png_min"])
    return value.astype(np.float32), int(entry["index"]), doc


def reconstruct_folder(
    model_dir: str | Path,
    png: str | Path,
    out_dir: str | Path,
    *,
    config: SingleViewConfig | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Single-view reconstruction into ``out_dir``: ``views/`` (all views rendered), ``volume.nii.gz`` (the field on
    the cube grid, in the subject's world mm RAS when the view's folder records it), ``metrics.json`` (PSNR / SSIM
    of the other views when the view's folder holds them all), ``history.json``."""
    model = load_model(model_dir)
    image, index, doc = read_single_view(png, model=model)
    t0 = time.perf_counter()
    z, history = reconstruct_single_view(model, image, index, config=config or SingleViewConfig(), progress=progress)
    seconds = time.perf_counter() - t0
    out = Path(out_dir)
    cfg = model.config
    rendered = render_views(model.field, z, model.cameras, cube_mm=model.cube_mm, config=cfg)
    to_subject = np.asarray(doc["nerf"].get("canonical_to_subject", np.eye(4)), dtype=np.float64)
    cube = CubeVolume(
        doc["nerf"].get("subject", "subject"),
        Volume(np.zeros((cfg.volume_size,) * 3, np.float32), cube_affine(cfg.volume_size, model.cube_mm)),
        to_subject,
    )
    write_subject_views(out / "views", cube, rendered, config=cfg, cube_mm=model.cube_mm)
    data = field_volume(model.field, z, size=cfg.volume_size, cube_mm=model.cube_mm, config=cfg)
    save_volume(Volume(data, cube.subject_affine()), out / "volume.nii.gz")
    metrics: dict = {"view_index": index, "seconds": seconds, "final_mse": history[-1]["mse"]}
    npy = Path(png).parent / doc.get("views_npy", "views.npy")
    if npy.is_file():
        truth = np.load(npy, allow_pickle=False)
        if truth.shape == rendered.shape:
            others = [k for k in range(cfg.n_views) if k != index]
            metrics["other_views"] = held_out_metrics(model, z, truth, others)
            metrics["given_view"] = held_out_metrics(model, z, truth, [index])
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    return metrics
