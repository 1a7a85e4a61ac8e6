"""Generative radiance field across subjects: data, training, single-view reconstruction, saving and loading.

**Subjects** (:func:`find_subjects`): every ``*.nii`` / ``*.nii.gz`` under a folder, or the BraTS layout
(``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair}.nii.gz``: one modality per subject, ``t1`` by default).

**Canonical cube** (:func:`to_cube`, the seed's preprocessing): each subject is resampled (cubic B-spline) onto a
``volume_size``^3 grid of side ``cube_mm`` centred on the centre of its foreground box, axes along world RAS (no
rotation, no scaling: sizes stay in mm), intensities divided by the 99.5th percentile of the foreground (and
histogram-equalised inside it with ``equalize``). ``cube_mm`` is fixed when training starts (the largest
foreground box plus a margin); a subject that does not fit is refused. The canonical frame is world mm RAS with the
origin at that centre; :class:`CubeVolume` keeps the centre so outputs go back to the subject's frame.

**Views**: cameras on the orbit about S (``n_views`` x ``step_deg``, parallel beam, detector side
``cube_mm * sqrt(2)`` so anything in the cube projects inside), rendered by :mod:`slicefield.views.render`
(``drr``: line integrals, divided by ``cube_mm`` so a pixel is the mean intensity along the chord through the cube).
Training sees every ``train_every``-th view; the others are held out.

**Population**: with few real brains, ``augment`` deformed copies of each subject (random affine + elastic +
intensity, :mod:`slicefield.synth.augment`; sampled, then applied) join the training set, and the results say so.

**Training** (GRAF with conditioning): per iteration, ``batch`` subjects, one training view each, one K x K patch
at a random scale s and offset (bilinear samples of the real view at the patch's pixel positions); the encoder's
latent code of the subject conditions the field, which renders the same pixel positions. Discriminator:
non-saturating loss + R1 on real patches. Generator (field + encoder): non-saturating adversarial loss plus the MSE
between rendered and real patches (``reconstruction``), since pose and subject are known.

**Single view** (:func:`reconstruct_single_view`): latent code optimised (optionally the field fine-tuned) so the
rendered view matches one given view (MSE + a small adversarial term on random patches), then all views rendered
and the field read on the cube grid as a volume.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SlicefieldError
from ..geometry import apply_affine
from ..io.atomic import atomic_path
from ..volume import Volume
from .model import (
    PRESETS,
    ConditionalField,
    NerfConfig,
    PatchDiscriminator,
    SliceEncoder,
    composite,
    ray_samples,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
#: Version of model.pt / checkpoint.pt.
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
#: Margin added to the largest foreground box when ``cube_mm`` is chosen (fraction).
CUBE_MARGIN = 0.08
#: Foreground = voxels above this fraction of the 99.5th percentile of the non-zero voxels.
FOREGROUND_FRACTION = 0.05
BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Rays per chunk when rendering whole views (bounds memory).
RAY_CHUNK = 4096


# ------------------------------------------------------------------------------------------------------- data
def find_subjects(folder: str | Path, *, modality: str = "t1") -> list[Path]:
    """Volumes of a subjects folder, sorted: the BraTS layout (one ``modality`` per case) if present, else every
    NIfTI file under it."""
    root = Path(folder)
    if not root.is_dir():
        raise SlicefieldError("is not a folder", path=root, fix="pass a folder of NIfTI volumes (or BraTS cases)")
    if modality not in BRATS_MODALITIES:
        raise SlicefieldError(f"unknown modality {modality!r}", fix=f"use one of {', '.join(BRATS_MODALITIES)}")
    brats = sorted(root.glob(f"*/*_{modality}.nii.gz")) + sorted(root.glob(f"*/*_{modality}.nii"))
    files = brats or sorted(p for p in root.rglob("*") if p.name.endswith((".nii", ".nii.gz")) and p.is_file())
    if not files:
        raise SlicefieldError("holds no NIfTI volumes", path=root, fix="add *.nii.gz files (or BraTS cases)")
    return files


@dataclass(frozen=True)
class CubeVolume:
    """A subject in the canonical cube: ``volume`` (affine: canonical mm RAS, origin at the cube centre) and
    ``canonical_to_subject`` ``(4, 4)``, canonical mm -> the subject's world mm RAS (a shift to the centre of its
    foreground box, composed with the inverse of its rigid registration to the model's reference when registered)."""

    name: str
    volume: Volume
    canonical_to_subject: np.ndarray

    def subject_affine(self) -> np.ndarray:
        """Cube voxel -> the subject's world mm RAS."""
        return self.canonical_to_subject @ self.volume.affine


def foreground_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """World mm RAS ``(lo, hi)`` of the box of the foreground voxels' centres (see FOREGROUND_FRACTION)."""
    nz = volume.data[volume.data > 0]
    if nz.size == 0:
        raise SlicefieldError("is empty (no positive voxels)", fix="pass a brain volume")
    mask = volume.data > FOREGROUND_FRACTION * float(np.percentile(nz, 99.5))
    ijk = np.argwhere(mask).astype(np.float64)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    lo_i, hi_i = ijk.min(axis=0), ijk.max(axis=0)
    world = apply_affine(volume.affine, lo_i + corners * (hi_i - lo_i))
    return world.min(axis=0), world.max(axis=0)


def cube_affine(size: int, cube_mm: float) -> np.ndarray:
    """Voxel -> canonical mm RAS of the ``size``^3 cube of side ``cube_mm`` centred on the origin."""
    h = cube_mm / size
    a = np.diag([h, h, h, 1.0])
    a[:3, 3] = -(size - 1) / 2 * h
    return a


def to_cube(
    volume: Volume,
    *,
    name: str,
    size: int,
    cube_mm: float,
    equalize: bool = False,
    path: str | Path | None = None,
    reference: CubeVolume | None = None,
) -> CubeVolume:
    """Resample ``volume`` into the canonical cube (see the module docstring); refuses a subject that does not fit.
    With ``reference`` (a cube subject of the same model), the subject is also rigidly registered to it
    (SimpleITK, correlation, on the cube grid) and resampled once more through that transform."""
    lo, hi = foreground_box(volume)
    extent = float((hi - lo).max())
    if extent > cube_mm:
        raise SlicefieldError(
            f"foreground spans {extent:.0f} mm, more than the model's {cube_mm:.0f} mm cube",
            path=path,
            fix="crop the volume to the head (or train a model on subjects this size)",
        )
    to_subject = np.eye(4)
    to_subject[:3, 3] = (lo + hi) / 2
    cube = _resample(volume, to_subject, name=name, size=size, cube_mm=cube_mm, equalize=equalize)
    if reference is None:
        return cube
    from ..motion.register import RegistrationConfig, rigid_register

    voxel = cube_mm / size
    config = RegistrationConfig(metric="correlation", shrink_factors=(2, 1), smoothing_mm=(voxel, 0.0), sampling=1.0)
    t, _ = rigid_register(reference.volume, cube.volume, config=config)  # anatomy at p (cube) lies at t p (ref)
    return _resample(volume, to_subject @ np.linalg.inv(t), name=name, size=size, cube_mm=cube_mm, equalize=equalize)


def _resample(
    volume: Volume, to_subject: np.ndarray, *, name: str, size: int, cube_mm: float, equalize: bool
) -> CubeVolume:
    """The cube whose canonical mm map to the subject's world mm by ``to_subject`` (cubic B-spline, normalised)."""
    from scipy import ndimage

    affine = cube_affine(size, cube_mm)
    vox = np.linalg.inv(volume.affine) @ to_subject @ affine  # cube voxel -> subject voxel
    ijk = np.indices((size,) * 3, dtype=np.float64).reshape(3, -1).T
    coords = apply_affine(vox, ijk).T
    data = ndimage.map_coordinates(volume.data.astype(np.float64), coords, order=3, mode="constant", cval=0.0)
    data = np.clip(data.reshape((size,) * 3), 0.0, None)
    fg = data[data > 0]
    top = float(np.percentile(fg, 99.5)) if fg.size else 1.0
    data = data / (top if top > 0 else 1.0)
    if equalize:
        inside = data > FOREGROUND_FRACTION
        ranks = np.argsort(np.argsort(data[inside]))
        data[inside] = (ranks + 1) / len(ranks)
        data[~inside] = 0.0
    return CubeVolume(name, Volume(data.astype(np.float32), affine), to_subject)


def cube_size_mm(volumes: list[Volume]) -> float:
    """The canonical cube's side for a training set: the largest foreground box side plus CUBE_MARGIN."""
    return max(float(np.ptp(np.stack(foreground_box(v)), axis=0).max()) for v in volumes) * (1 + CUBE_MARGIN)


def model_cameras(config: NerfConfig, cube_mm: float):
    """The model's orbit: ``n_views`` parallel cameras about S through the cube centre (canonical mm RAS)."""
    from ..views.cameras import OrbitConfig, orbit

    orbit_config = OrbitConfig(
        n_views=config.n_views, step_deg=config.step_deg, axis="S", size=config.image_size, projection="parallel"
    )
    return orbit(orbit_config, center_mm=np.zeros(3), fov_mm=cube_mm * math.sqrt(2.0))


def true_views(cube: CubeVolume, cameras, *, mode: str, cube_mm: float) -> np.ndarray:
    """``(n_views, S, S)`` float32 views of a cube subject in the model's units (drr divided by ``cube_mm``)."""
    from ..views.render import RenderConfig, render_volume

    images = render_volume(cube.volume, cameras, RenderConfig(mode=mode, scale=1.0 if mode == "emission" else None))
    return images / cube_mm if mode == "drr" else images


def training_views(n_views: int, every: int) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` view indices: every ``every``-th view from 0, and the rest."""
    train = list(range(0, n_views, every))
    return train, [k for k in range(n_views) if k not in train]


def augmented(cubes: list[CubeVolume], *, n: int, seed: int) -> list[CubeVolume]:
    """``n`` deformed copies of each subject (affine + elastic + intensity, sampled then applied), in the cube."""
    from ..synth.augment import deform_image, sample_deformation

    rng = np.random.default_rng(seed)
    out = []
    for cube in cubes:
        for k in range(n):
            d = sample_deformation(rng)
            image = deform_image(cube.volume, d)
            data = np.clip(image.data, 0.0, None)
            out.append(CubeVolume(f"{cube.name}_aug{k:03d}", Volume(data, image.affine), cube.canonical_to_subject))
    return out


# ---------------------------------------------------------------------------------------------- rendering
def pixel_rays(camera, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray origins and unit directions (world mm RAS, ``(..., 3)``) of a parallel camera at continuous pixel
    positions ``(u, v)`` (column, row; integers at pixel centres), as :meth:`Camera.rays` at integer pixels."""
    if camera.projection != "parallel":
        raise ValueError("the generative field uses parallel cameras")
    pose = camera.pose
    cx, cy = camera.principal_point
    x = (np.asarray(u, dtype=np.float64) - cx) * camera.pixel_mm
    y = (np.asarray(v, dtype=np.float64) - cy) * camera.pixel_mm
    pts = np.stack([x, y, np.zeros_like(x)], axis=-1) @ pose[:3, :3].T + pose[:3, 3]
    return pts, np.broadcast_to(pose[:3, 2], pts.shape).copy()


def sample_patch(rng: np.random.Generator, *, size: int, patch: int, min_scale: float) -> tuple[np.ndarray, ...]:
    """A random K x K patch of an image of ``size`` pixels: scale s ~ U(min_scale, 1) (fraction of the image side
    spanned), offset uniform so the patch stays inside. Returns pixel positions ``(u, v)``, each ``(K, K)``."""
    s = rng.uniform(min_scale, 1.0)
    span = s * (size - 1)
    u0, v0 = rng.uniform(0.0, size - 1 - span, 2)
    return patch_positions(u0, v0, span, patch)


def patch_positions(u0: float, v0: float, span: float, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions ``(u, v)`` ``(K, K)`` of a K x K patch from ``(u0, v0)`` spanning ``span`` pixels."""
    t = np.linspace(0.0, span, patch)
    v, u = np.meshgrid(v0 + t, u0 + t, indexing="ij")
    return u, v


def bilinear(images: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``images`` ``(B, H, W)`` at pixel positions ``u, v`` ``(B, K, K)`` -> ``(B, K, K)``."""
    h, w = images.shape[-2:]
    grid = torch.stack([2 * u / (w - 1) - 1, 2 * v / (h - 1) - 1], dim=-1)
    return F.grid_sample(images[:, None], grid, mode="bilinear", align_corners=True)[:, 0]


def render_rays(
    field: ConditionalField,
    z: torch.Tensor,
    origins: torch.Tensor,
    directions: torch.Tensor,
    *,
    cube_mm: float,
    config: NerfConfig,
    jitter: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel values of rays ``(B, R, 3)`` (world mm, canonical) for latents ``z`` ``(B, Z)`` -> ``(B, R)``."""
    points, seg = ray_samples(origins, directions, half_mm=cube_mm / 2, samples=config.samples, jitter=jitter)
    b, r, s, _ = points.shape
    density, value = field(points.reshape(b, r * s, 3), z)
    return composite(density.view(b, r, s), value.view(b, r, s), seg, config.mode)


def render_views(field, z: torch.Tensor, cameras, *, cube_mm: float, config: NerfConfig) -> np.ndarray:
    """Whole views ``(n, S, S)`` float32 of one latent ``z`` ``(1, Z)``."""
    out = []
    with torch.no_grad():
        for cam in cameras:
            o, d = cam.rays()
            o = torch.from_numpy(o.reshape(1, -1, 3).astype(np.float32))
            d = torch.from_numpy(d.reshape(1, -1, 3).astype(np.float32))
            parts = [
                render_rays(field, z, o[:, i : i + RAY_CHUNK], d[:, i : i + RAY_CHUNK], cube_mm=cube_mm, config=config)
                for i in range(0, o.shape[1], RAY_CHUNK)
            ]
            out.append(torch.cat(parts, dim=1).view(cam.height, cam.width).numpy())
    return np.stack(out).astype(np.float32)


def field_volume(field, z: torch.Tensor, *, size: int, cube_mm: float, config: NerfConfig) -> np.ndarray:
    """The field read on the ``size``^3 cube grid: density x value (drr: the attenuation whose line integrals are
    the views, in the training volumes' normalised intensity), ``(size,) * 3`` float32."""
    ijk = np.indices((size,) * 3, dtype=np.float64).reshape(3, -1).T
    x = apply_affine(cube_affine(size, cube_mm), ijk) / (cube_mm / 2)
    pts = torch.from_numpy(x.astype(np.float32))[None]
    out = []
    with torch.no_grad():
        for i in range(0, pts.shape[1], RAY_CHUNK * 8):
            dens, val = field(pts[:, i : i + RAY_CHUNK * 8], z)
            out.append((dens * val)[0])
    return torch.cat(out).view((size,) * 3).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------- training
@dataclass
class GenerativeModel:
    """A trained generative radiance field and what it needs to render (see :func:`save_model`)."""

    config: NerfConfig
    cube_mm: float
    field: ConditionalField
    encoder: SliceEncoder
    discriminator: PatchDiscriminator
    latents: torch.Tensor
    """``(n_subjects, Z)``: the encoder's codes of the training subjects."""
    names: list[str]

    @property
    def cameras(self):
        return model_cameras(self.config, self.cube_mm)


def encoder_input(cubes: list[CubeVolume], size: int) -> torch.Tensor:
    """``(n, 1, E, E, E)``: each cube volume resized to the encoder's grid (trilinear)."""
    vols = torch.from_numpy(np.stack([c.volume.data for c in cubes]).astype(np.float32))[:, None]
    return F.interpolate(vols, size=(size,) * 3, mode="trilinear", align_corners=True)


def build(config: NerfConfig) -> tuple[ConditionalField, SliceEncoder, PatchDiscriminator]:
    torch.manual_seed(config.seed)
    return ConditionalField(config), SliceEncoder(config), PatchDiscriminator(config)


def train(
    cubes: list[CubeVolume],
    views: np.ndarray,
    *,
    config: NerfConfig,
    cube_mm: float,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    time_budget_s: float | None = None,
) -> tuple[GenerativeModel, list[dict]]:
    """Train on ``cubes`` with their true views ``(n_subjects, n_views, S, S)`` (model units; only the training
    views are read). Checkpoints every 50 iterations into ``checkpoint_dir``; ``resume`` continues from there.
    Returns the model and the history (losses every 10 iterations)."""
    field, encoder, disc = build(config)
    opt_g = torch.optim.Adam([*field.parameters(), *encoder.parameters()], lr=config.lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr_d, betas=(0.0, 0.99))
    cameras = model_cameras(config, cube_mm)
    train_idx, _ = training_views(config.n_views, config.train_every)
    enc_in = encoder_input(cubes, config.encoder_size)
    images = torch.from_numpy(views.astype(np.float32))
    rng = np.random.default_rng(config.seed)
    history: list[dict] = []
    start = 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise SlicefieldError("no checkpoint to resume from", path=ckpt, fix="run without --resume first")
        state = torch.load(ckpt, weights_only=True)
        for module, key in ((field, "field"), (encoder, "encoder"), (disc, "discriminator")):
            module.load_state_dict(state[key])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start, history = int(state["iteration"]), json.loads(state["history"])
        rng = np.random.default_rng([config.seed, start])
        torch.manual_seed(config.seed + start)
    t0 = time.perf_counter()
    for it in range(start, config.iterations):
        subj = rng.integers(len(cubes), size=config.batch)
        view = rng.choice(train_idx, size=config.batch)
        uv = [sample_patch(rng, size=config.image_size, patch=config.patch, min_scale=config.min_scale) for _ in subj]
        u = torch.from_numpy(np.stack([p[0] for p in uv]).astype(np.float32))
        v = torch.from_numpy(np.stack([p[1] for p in uv]).astype(np.float32))
        real = bilinear(images[subj, view], u, v)
        rays = [pixel_rays(cameras[k], p[0], p[1]) for k, p in zip(view, uv, strict=True)]
        o = torch.from_numpy(np.stack([r[0].reshape(-1, 3) for r in rays]).astype(np.float32))
        d = torch.from_numpy(np.stack([r[1].reshape(-1, 3) for r in rays]).astype(np.float32))
        jitter = torch.from_numpy(rng.uniform(0, 1, (*o.shape[:2], config.samples)).astype(np.float32))
        z = encoder(enc_in[subj])
        fake = render_rays(field, z, o, d, cube_mm=cube_mm, config=config, jitter=jitter).view_as(real)

        # discriminator: non-saturating + R1 on real patches
        real_req = real.detach().requires_grad_(True)
        d_real = disc(real_req)
        (grad,) = torch.autograd.grad(d_real.sum(), real_req, create_graph=True)
        loss_d = (
            F.softplus(disc(fake.detach())).mean()
            + F.softplus(-d_real).mean()
            + 0.5 * config.r1 * grad.pow(2).flatten(1).sum(1).mean()
        )
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()

        # generator: adversarial + reconstruction of the same pixels
        adv = F.softplus(-disc(fake)).mean()
        mse = F.mse_loss(fake, real)
        loss_g = config.adversarial * adv + config.reconstruction * mse
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()

        done = it + 1
        if done % 10 == 0 or done == config.iterations:
            history.append({"iteration": done, "loss_d": loss_d.item(), "adv": adv.item(), "mse": mse.item()})
        if ckpt is not None and (done % 50 == 0 or done == config.iterations):
            _save_checkpoint(ckpt, field, encoder, disc, opt_g, opt_d, done, history)
        if progress is not None:
            progress(done, config.iterations)
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            log.info("time budget reached after %d iterations", done)
            break
    with torch.no_grad():
        latents = encoder(enc_in)
    model = GenerativeModel(config, cube_mm, field, encoder, disc, latents, [c.name for c in cubes])
    return model, history


def _save_checkpoint(path: Path, field, encoder, disc, opt_g, opt_d, iteration: int, history: list[dict]) -> None:
    state = {
        "format": FORMAT_VERSION,
        "field": field.state_dict(),
        "encoder": encoder.state_dict(),
        "discriminator": disc.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "iteration": iteration,
        "history": json.dumps(history),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_model(model: GenerativeModel, path: str | Path) -> Path:
    """``model.pt``: tensors and plain values only (loads with ``weights_only=True``)."""
    state = {
        "format": FORMAT_VERSION,
        "config": json.dumps(asdict(model.config)),
        "cube_mm": float(model.cube_mm),
        "field": model.field.state_dict(),
        "encoder": model.encoder.state_dict(),
        "discriminator": model.discriminator.state_dict(),
        "latents": model.latents,
        "names": json.dumps(model.names),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_model(path: str | Path) -> GenerativeModel:
    """Read ``model.pt`` (written by :func:`save_model`; never unpickles arbitrary objects)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise SlicefieldError("no generative model here", path=path, fix="train one with slicefield nerf train")
    try:
        state = torch.load(path, weights_only=True)
        if state.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {state.get('format')!r}, expected {FORMAT_VERSION}")
        config = NerfConfig(**json.loads(state["config"]))
        field, encoder, disc = build(config)
        field.load_state_dict(state["field"])
        encoder.load_state_dict(state["encoder"])
        disc.load_state_dict(state["discriminator"])
    except (RuntimeError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise SlicefieldError(
            f"unreadable generative model ({type(e).__name__}: {e})",
            path=path,
            fix="retrain with slicefield nerf train",
        ) from e
    return GenerativeModel(
        config, float(state["cube_mm"]), field, encoder, disc, state["latents"], json.loads(state["names"])
    )


def preset(name: str, **overrides) -> NerfConfig:
    if name not in PRESETS:
        raise SlicefieldError(f"unknown preset {name!r}", fix=f"use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------ single view
@dataclass(frozen=True)
class SingleViewConfig:
    """How a single view is turned into a subject."""

    steps: int = 200
    """Adam steps on the latent code (and the field with fine_tune)."""
    lr: float = 0.03
    """Learning rate of the latent code."""
    fine_tune: bool = False
    """Also fine-tune the field (learning rate lr_field) once the code has settled (second half of the steps)."""
    lr_field: float = 1e-4
    """Learning rate of the field when fine-tuning."""
    adversarial: float = 0.01
    """Weight of the adversarial term (random patches of the rendered view through the discriminator)."""
    latent_prior: float = 1e-5
    """Weight of ``mean(((z - mean) / sd)^2)`` over the code's entries, mean and sd of the training codes: keeps the
    code where the training subjects' codes are, so one view does not pull it off the learnt shapes (without it, 200
    steps on one view of Colin27 lost 0.7 dB on the other views against the mean code; with 1e-5 they gained 0.3,
    benchmarks/RESULTS.md)."""
    seed: int = 0


def reconstruct_single_view(
    model: GenerativeModel,
    image: np.ndarray,
    view_index: int,
    *,
    config: SingleViewConfig = SingleViewConfig(),
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Latent code ``(1, Z)`` whose rendering of view ``view_index`` matches ``image`` ``(S, S)`` (model units).
    Fine-tuning (``config.fine_tune``) changes ``model.field`` in place. Returns the code and the loss history."""
    cfg = model.config
    if image.shape != (cfg.image_size, cfg.image_size):
        raise SlicefieldError(
            f"the view is {image.shape[1]}x{image.shape[0]} pixels, the model renders {cfg.image_size}",
            fix="render the subject's views with slicefield nerf render MODEL_DIR subject.nii.gz",
        )
    cam = model.cameras[view_index]
    o, d = cam.rays()
    o = torch.from_numpy(o.reshape(1, -1, 3).astype(np.float32))
    d = torch.from_numpy(d.reshape(1, -1, 3).astype(np.float32))
    target = torch.from_numpy(image.astype(np.float32)).view(1, -1)
    mean = model.latents.mean(dim=0, keepdim=True)
    sd = model.latents.std(dim=0, keepdim=True).clamp_min(1e-3) if len(model.latents) > 1 else torch.ones_like(mean)
    z = mean.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=config.lr)
    opt_f = torch.optim.Adam(model.field.parameters(), lr=config.lr_field) if config.fine_tune else None
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    history = []
    for step in range(config.steps):
        pred = render_rays(model.field, z, o, d, cube_mm=model.cube_mm, config=cfg)
        mse = F.mse_loss(pred, target)
        loss = mse
        if config.adversarial > 0:
            u, v = sample_patch(rng, size=cfg.image_size, patch=cfg.patch, min_scale=cfg.min_scale)
            patch = bilinear(
                pred.view(1, cfg.image_size, cfg.image_size),
                torch.from_numpy(u[None].astype(np.float32)),
                torch.from_numpy(v[None].astype(np.float32)),
            )
            loss = loss + config.adversarial * F.softplus(-model.discriminator(patch)).mean()
        if config.latent_prior > 0:
            loss = loss + config.latent_prior * ((z - mean) / sd).pow(2).mean()
        tuning = opt_f is not None and step >= config.steps // 2
        opt.zero_grad()
        if tuning:
            opt_f.zero_grad()
        loss.backward()
        opt.step()
        if tuning:
            opt_f.step()
        history.append({"step": step + 1, "mse": mse.item(), "loss": loss.item()})
        if progress is not None:
            progress(step + 1, config.steps)
    model.field.zero_grad(set_to_none=True)
    model.discriminator.zero_grad(set_to_none=True)
    return z.detach(), history


def write_json(path: str | Path, obj) -> Path:
    from ..runs import to_jsonable

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(to_jsonable(obj), indent=1) + "\n", encoding="utf-8")
    return Path(path)
