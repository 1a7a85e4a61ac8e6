"""Training, generation, saving and loading of a synthesis model (per-plane SPADE generators + 3D fusion CNN).

Pipeline (issue 6):

1. For each plane (axial, coronal, sagittal), a 2D SPADE generator is trained on that plane's slices of the pairs:
   hinge GAN loss against a multi-scale PatchGAN, discriminator feature matching and an L1 term to the real slice
   (the L1 term stands in for SPADE's VGG perceptual loss, which needs downloaded weights), Adam with SPADE's
   TTUR (generator ``lr / 2``, discriminator ``2 lr``, betas (0, 0.9)).
2. Each generator synthesises every training label map slice by slice in its plane -> one volume per plane.
3. The 3D fusion CNN learns, on 32³ patches of the plane volumes (50 % overlap grid), to predict the real volume
   (MSE, Adam).

Planes and array axes: a plane's slices are taken across the array axis closest to the plane's world normal
(axial: world z (S), coronal: y (A), sagittal: x (R)), read off the label map's affine, so any voxel axis order works.

A model folder holds ``config.json`` (the :class:`SynthConfig`, label classes, voxel size, planes) and one
``generator_<plane>.pt`` per plane + ``fusion.pt``: ``torch.save`` of state dicts, read back with
``torch.load(weights_only=True)``; every file written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SlicefieldError
from ..geometry import direction_cosines
from ..io.atomic import atomic_path
from ..volume import Volume
from .fusion import FusionCNN, FusionConfig, pad_for_patches, predict_patches, training_corners
from .labels import n_classes, normalise_intensity
from .spade import (
    DiscriminatorConfig,
    GeneratorConfig,
    MultiScaleDiscriminator,
    SpadeGenerator,
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    one_hot,
    pad_to_multiple,
)

log = logging.getLogger(__name__)

#: Plane name -> world axis of its normal (0 = x / R, 1 = y / A, 2 = z / S).
PLANE_NORMALS = {"axial": 2, "coronal": 1, "sagittal": 0}
PLANES = tuple(PLANE_NORMALS)
#: A training slice must hold at least this fraction of non-background labels.
MIN_SLICE_FOREGROUND = 0.02
#: Largest relative difference between the model's and a label map's voxel size before a warning.
VOXEL_SIZE_TOLERANCE = 0.05

#: progress(stage) -> (done, total) callback, like ``Reporter.steps``' ``step(name)``.
ProgressFactory = Callable[[str], Callable[[int, int], None]]


@dataclass(frozen=True)
class GanConfig:
    """Training of each per-plane generator."""

    steps: int = 300
    """Generator (and discriminator) updates per plane."""
    batch_size: int = 8
    """Slices per step."""
    lr: float = 2e-4
    """Base Adam learning rate (SPADE's 2e-4)."""
    ttur: bool = True
    """Two time-scale update rule as in SPADE: generator lr / 2, discriminator lr * 2, betas (0, 0.9)."""
    fm_weight: float = 10.0
    """Weight of discriminator feature matching (SPADE: 10)."""
    l1_weight: float = 10.0
    """Weight of the L1 distance to the real slice (in place of the VGG perceptual loss)."""


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a synthesis model and its training."""

    planes: tuple[str, ...] = PLANES
    """Planes with a generator (any of axial, coronal, sagittal)."""
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """Size of each 2D SPADE generator."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """Size of each multi-scale PatchGAN."""
    gan: GanConfig = field(default_factory=GanConfig)
    """Training of the generators."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """The 3D fusion CNN and its training."""
    fusion_holdout: int = 0
    """Training pairs kept from the generators and used only to train the fusion CNN, so that it learns from plane
    volumes with the errors of unseen label maps (0: every pair trains both stages)."""
    seed: int = 0
    """Seed of torch and numpy (same seed, same model on CPU)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SynthConfig:
        return cls(
            planes=tuple(doc["planes"]),
            generator=GeneratorConfig(**doc["generator"]),
            discriminator=DiscriminatorConfig(**doc["discriminator"]),
            gan=GanConfig(**doc["gan"]),
            fusion=FusionConfig(**doc["fusion"]),
            fusion_holdout=int(doc.get("fusion_holdout", 0)),
            seed=int(doc["seed"]),
            device=str(doc["device"]),
        )


#: ``tiny``: trains end-to-end on a laptop CPU in minutes (2 mm brains); its base lr is 1e-3 (TTUR: generator 5e-4,
#: discriminator 2e-3), which lowered the held-out error after 200 steps (axial MAE 0.076 vs 0.080 with 2e-4 on 2 mm
#: MNI152 deformations, 2026-11-23). ``paper``: SPADE's lr 2e-4 and the issue's sizes (fusion batch 50), for GPUs.
PRESETS: dict[str, SynthConfig] = {
    "tiny": SynthConfig(
        generator=GeneratorConfig(channels=8, n_up=3, spade_hidden=16),
        discriminator=DiscriminatorConfig(channels=16, n_layers=2, n_scales=2),
        gan=GanConfig(steps=200, batch_size=4, lr=1e-3),
        fusion=FusionConfig(channels=8, depth=3, steps=300, batch_size=4),
    ),
    "paper": SynthConfig(
        generator=GeneratorConfig(channels=64, n_up=5, spade_hidden=128),
        discriminator=DiscriminatorConfig(channels=64, n_layers=4, n_scales=2),
        gan=GanConfig(steps=50_000, batch_size=16),
        fusion=FusionConfig(channels=32, depth=6, steps=20_000, batch_size=50),
    ),
}


def preset(name: str, **overrides: Any) -> SynthConfig:
    """A preset config with top-level fields replaced (e.g. ``planes=("axial",)``, ``seed=1``)."""
    if name not in PRESETS:
        raise SlicefieldError(f"unknown preset {name!r}", fix=f"use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def check_planes(planes: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(p.strip() for p in planes if p.strip()))
    bad = [p for p in out if p not in PLANE_NORMALS]
    if not out or bad:
        raise SlicefieldError(f"unknown planes {','.join(bad) or '(none)'}", fix=f"use some of {', '.join(PLANES)}")
    return out


def plane_axis(affine: np.ndarray, plane: str) -> int:
    """Array axis across the slices of ``plane``: the voxel axis whose world direction is closest to the plane's
    normal (world x for sagittal, y for coronal, z for axial)."""
    d = np.abs(direction_cosines(affine))
    return int(np.argmax(d[PLANE_NORMALS[plane]]))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlicefieldError("--device cuda but CUDA is not available", fix="pass --device cpu")
    return device


@dataclass
class SynthModel:
    """Trained generators (one per plane), the fusion CNN and what generation needs to know.

    label_nc: one-hot channels (largest label + 1). spacing_mm: the training grids' voxel size ``(3,)``, sorted
    along (x, y, z) world axes. history: loss values recorded during training.
    """

    config: SynthConfig
    label_nc: int
    generators: dict[str, SpadeGenerator]
    fusion: FusionCNN
    spacing_mm: tuple[float, float, float]
    history: dict[str, list[float]] = field(default_factory=dict)

    def to(self, device: str) -> SynthModel:
        for g in self.generators.values():
            g.to(device)
        self.fusion.to(device)
        return self


def new_model(config: SynthConfig, label_nc: int, spacing_mm: Sequence[float]) -> SynthModel:
    """Freshly initialised networks (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    gens = {p: SpadeGenerator(config.generator, label_nc) for p in config.planes}
    return SynthModel(
        config=config,
        label_nc=label_nc,
        generators=gens,
        fusion=FusionCNN(config.fusion, n_planes=len(config.planes)),
        spacing_mm=tuple(float(s) for s in spacing_mm),  # type: ignore[arg-type]
    )


def _world_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along world x, y, z (via each world axis' closest array axis)."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    return np.array([spacing[plane_axis(affine, p)] for p in ("sagittal", "coronal", "axial")])


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """``(n, H, W)`` slices across ``axis`` (the other two axes in increasing order)."""
    return np.moveaxis(volume, axis, 0)


@dataclass
class _PlaneData:
    labels: torch.Tensor  # (N, H, W) float32 integer labels, padded
    images: torch.Tensor  # (N, 1, H, W) in [-1, 1], padded with -1


def _plane_data(pairs: Sequence[tuple[Volume, np.ndarray]], plane: str, multiple: int) -> _PlaneData:
    """All slices with enough foreground of ``plane`` from (labels, normalised image) pairs, padded to the largest
    slice size (a multiple of ``multiple``)."""
    labs, imgs = [], []
    for labels, image in pairs:
        axis = plane_axis(labels.affine, plane)
        ls, is_ = _slices(labels.data, axis), _slices(image, axis)
        keep = (ls > 0).mean(axis=(1, 2)) >= MIN_SLICE_FOREGROUND
        labs.append(ls[keep])
        imgs.append(is_[keep])
    h = max(a.shape[1] for a in labs)
    w = max(a.shape[2] for a in labs)
    h, w = h + (-h) % multiple, w + (-w) % multiple

    def pad(a: np.ndarray, value: float) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, h - a.shape[1]), (0, w - a.shape[2])), constant_values=value)

    labels = torch.from_numpy(np.concatenate([pad(a, 0.0) for a in labs]).astype(np.float32))
    images = torch.from_numpy(np.concatenate([pad(2 * a - 1, -1.0) for a in imgs]).astype(np.float32))[:, None]
    if labels.shape[0] == 0:
        raise SlicefieldError(f"no {plane} slice holds any labelled tissue", fix="check the label maps")
    return _PlaneData(labels, images)


def train_generator(
    generator: SpadeGenerator,
    data: _PlaneData,
    *,
    config: SynthConfig,
    label_nc: int,
    device: str,
    progress: Callable[[int, int], None] | None = None,
    start: dict[str, Any] | None = None,
    checkpoint: StageCheckpoint | None = None,
) -> list[float]:
    """Train one per-plane generator in place (GAN + feature matching + L1); returns the per-step L1 loss.

    ``start``: the stage state of a checkpoint (see :func:`train`) to continue from; ``checkpoint(done, final,
    state)`` is called after every step with a function returning this stage's state."""
    gan = config.gan
    disc = MultiScaleDiscriminator(config.discriminator, label_nc).to(device)
    generator.to(device).train()
    if gan.ttur:
        g_lr, d_lr, betas = gan.lr / 2, gan.lr * 2, (0.0, 0.9)
    else:
        g_lr, d_lr, betas = gan.lr, gan.lr, (0.5, 0.999)
    opt_g = torch.optim.Adam(generator.parameters(), lr=g_lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=d_lr, betas=betas)
    gen = torch.Generator().manual_seed(config.seed)
    n = data.labels.shape[0]
    rank, world = _world()
    g_net, d_net = _data_parallel(generator, device), _data_parallel(disc, device)
    batch = min(gan.batch_size, n)
    history: list[float] = []
    first = 0
    if start is not None:
        disc.load_state_dict(start["disc"])
        opt_g.load_state_dict(start["opt_g"])
        opt_d.load_state_dict(start["opt_d"])
        gen.set_state(start["batch_rng"])
        torch.set_rng_state(start["torch_rng"])  # as it was after this plane's discriminator was initialised
        history, first = list(start["history"]), int(start["step"])

    def state() -> dict[str, Any]:
        return {
            "disc": disc.state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "batch_rng": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": history,
            "step": len(history),
        }

    for step in range(first, gan.steps):
        # every rank draws the whole batch of all ranks and takes its share (one random stream for all)
        idx = torch.randint(0, n, (world * batch,), generator=gen)[rank * batch : (rank + 1) * batch]
        seg = one_hot(data.labels[idx], label_nc).to(device)
        real = data.images[idx].to(device)
        # discriminator
        with torch.no_grad():
            fake = g_net(seg)
        loss_d = hinge_d_loss(d_net(seg, real), d_net(seg, fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator
        fake = g_net(seg)
        pred_fake = d_net(seg, fake)
        with torch.no_grad():
            pred_real = d_net(seg, real)
        l1 = F.l1_loss(fake, real)
        loss_g = hinge_g_loss(pred_fake) + gan.fm_weight * feature_matching_loss(pred_real, pred_fake)
        loss_g = loss_g + gan.l1_weight * l1
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        history.append(float(l1.detach()))
        if checkpoint is not None:
            checkpoint(step + 1, step + 1 == gan.steps, state)
        if progress is not None:
            progress(step + 1, gan.steps)
    generator.eval()
    return history


def generate_plane(
    generator: SpadeGenerator,
    labels: Volume,
    plane: str,
    *,
    label_nc: int,
    device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Synthesise ``labels`` slice by slice in ``plane``; returns ``(X, Y, Z)`` float32 in [0, 1] on the label
    grid. Slices without any label are background (0) without running the generator."""
    axis = plane_axis(labels.affine, plane)
    slices = _slices(labels.data, axis)
    out = np.zeros(slices.shape, dtype=np.float32)
    todo = np.flatnonzero((slices > 0).any(axis=(1, 2)))
    generator.eval().to(device)
    for b in range(0, todo.size, batch_size):
        idx = todo[b : b + batch_size]
        lab, (h, w) = pad_to_multiple(torch.from_numpy(np.ascontiguousarray(slices[idx])), generator.multiple)
        with torch.no_grad():
            y = generator(one_hot(lab, label_nc).to(device))[:, 0, :h, :w].cpu().numpy()
        out[idx] = (y + 1) / 2
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def train_fusion(
    fusion: FusionCNN,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    config: SynthConfig,
    device: str,
    progress: Callable[[int, int], None] | None = None,
    start: dict[str, Any] | None = None,
    checkpoint: StageCheckpoint | None = None,
) -> list[float]:
    """Train the fusion CNN in place on random patches from the 50 %-overlap grid of each volume.

    inputs: per volume ``(P, X, Y, Z)`` plane volumes; targets: ``(X, Y, Z)`` real volumes; masks: brain masks
    (patches with < 5 % brain are skipped). MSE, Adam. Returns the per-step MSE. ``start`` / ``checkpoint``: as in
    :func:`train_generator`."""
    fc = config.fusion
    padded_in = [pad_for_patches(v, patch=fc.patch, overlap=fc.overlap) for v in inputs]
    padded_t = [pad_for_patches(t[None], patch=fc.patch, overlap=fc.overlap)[0] for t in targets]
    corners = [(v, c) for v, m in enumerate(masks) for c in training_corners(m, patch=fc.patch, overlap=fc.overlap)]
    rng = np.random.default_rng(config.seed)
    fusion.to(device).train()
    opt = torch.optim.Adam(fusion.parameters(), lr=fc.lr)
    rank, world = _world()
    net = _data_parallel(fusion, device)
    p = fc.patch
    history: list[float] = []
    first = 0
    if start is not None:
        opt.load_state_dict(start["opt"])
        rng.bit_generator.state = json.loads(start["patch_rng"])
        history, first = list(start["history"]), int(start["step"])

    def state() -> dict[str, Any]:
        rng_state = json.dumps(rng.bit_generator.state)
        return {"opt": opt.state_dict(), "patch_rng": rng_state, "history": history, "step": len(history)}

    for step in range(first, fc.steps):
        pick = rng.integers(0, len(corners), world * fc.batch_size)[rank * fc.batch_size : (rank + 1) * fc.batch_size]
        xs, ys = [], []
        for k in pick:
            v, (i, j, c) = corners[k]
            xs.append(padded_in[v][:, i : i + p, j : j + p, c : c + p])
            ys.append(padded_t[v][None, i : i + p, j : j + p, c : c + p])
        x = torch.from_numpy(np.stack(xs).astype(np.float32)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.float32)).to(device)
        loss = F.mse_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if checkpoint is not None:
            checkpoint(step + 1, step + 1 == fc.steps, state)
        if progress is not None:
            progress(step + 1, fc.steps)
    fusion.eval()
    return history


def fuse(
    model: SynthModel,
    planes: dict[str, np.ndarray],
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Fused volume ``(X, Y, Z)`` from the plane volumes (``model.config.planes`` order) by blended patches."""
    fc = model.config.fusion
    stack = np.stack([planes[p] for p in model.config.planes])
    model.fusion.eval().to(device)
    return predict_patches(model.fusion, stack, patch=fc.patch, overlap=fc.overlap, device=device, progress=progress)


def train(
    pairs: Sequence[tuple[Volume, Volume]],
    config: SynthConfig,
    *,
    progress: ProgressFactory | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_interval_s: float = 60.0,
    resume: bool = False,
    world_size: int | None = None,
) -> SynthModel:
    """Train a :class:`SynthModel` on (label map, T1) pairs (each pair on one grid; all grids with the same voxel
    size). Images are normalised per pair (:func:`slicefield.synth.labels.normalise_intensity` in the label
    map's foreground). ``progress(stage)`` returns a ``(done, total)`` callback per stage.

    ``checkpoint_dir``: write ``checkpoint.pt`` there at most every ``checkpoint_interval_s`` seconds of training and
    at the end of every stage (a killed run loses at most that much); ``resume``: continue from it. On the CPU a
    resumed run ends with exactly the weights of an uninterrupted one (every random stream is in the checkpoint).
    The checkpoint stays after training; remove it once the model is saved.

    ``world_size``: processes training together with PyTorch DistributedDataParallel, one per GPU (``cuda:0`` ..),
    each on its share of every batch (the batch size is per process); ``None``: every visible GPU when the device
    is CUDA and several are present, else one process. On the CPU, several processes use the gloo backend."""
    if not pairs:
        raise SlicefieldError("no training pairs", fix="pass a folder of *_labels / *_t1 pairs")
    planes = check_planes(config.planes)
    device = resolve_device(config.device)
    if world_size is None:
        world_size = torch.cuda.device_count() if device.startswith("cuda") and not _world()[1] > 1 else 1
    if world_size > 1 and not torch.distributed.is_initialized():
        return _train_distributed(
            pairs,
            config,
            world_size=world_size,
            progress=progress,
            checkpoint_dir=checkpoint_dir,
            checkpoint_interval_s=checkpoint_interval_s,
            resume=resume,
        )
    torch.manual_seed(config.seed)
    label_nc = max(n_classes(lab.data) for lab, _ in pairs)
    spacings = np.array([_world_spacing(lab.affine) for lab, _ in pairs])
    if np.ptp(spacings, axis=0).max() > VOXEL_SIZE_TOLERANCE * spacings.min():
        raise SlicefieldError(
            "the training pairs have different voxel sizes", fix="resample all pairs onto grids of one voxel size"
        )
    model = new_model(replace(config, planes=planes), label_nc, spacings[0])
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    saved = _load_checkpoint(ckpt, model) if resume else None
    normed = [(lab, normalise_intensity(img.data, lab.data > 0)) for lab, img in pairs]
    if not 0 <= config.fusion_holdout < len(normed):
        raise SlicefieldError(
            f"fusion_holdout {config.fusion_holdout} must leave at least one of {len(normed)} pairs to the generators",
            fix="use fewer held-out pairs or more training pairs",
        )
    gen_pairs = normed[: len(normed) - config.fusion_holdout]
    fusion_pairs = normed[len(normed) - config.fusion_holdout :] if config.fusion_holdout else normed

    def stage(name: str) -> Callable[[int, int], None] | None:
        return progress(name) if progress is not None else None

    order = [*planes, "fusion"]
    done_stages = order[: order.index(saved["stage"])] if saved is not None else []
    last_save = [time.perf_counter()]

    def saver(name: str) -> StageCheckpoint | None:
        if ckpt is None or _world()[0] != 0:
            return None

        def save(done: int, final: bool, state: Callable[[], dict[str, Any]]) -> None:
            if final or time.perf_counter() - last_save[0] >= checkpoint_interval_s:
                _save_checkpoint(ckpt, model, stage=name, stage_state=state())
                last_save[0] = time.perf_counter()

        return save

    def start(name: str) -> dict[str, Any] | None:
        return saved["state"] if saved is not None and saved["stage"] == name else None

    for plane in planes:
        if plane in done_stages:
            continue
        t0 = time.perf_counter()
        data = _plane_data(gen_pairs, plane, model.generators[plane].multiple)
        model.history[f"l1_{plane}"] = train_generator(
            model.generators[plane],
            data,
            config=config,
            label_nc=label_nc,
            device=device,
            progress=stage(plane),
            start=start(plane),
            checkpoint=saver(plane),
        )
        log.info("%s generator: %d slices, %.0f s", plane, data.labels.shape[0], time.perf_counter() - t0)
    inputs = []
    cb = stage("synthesise")
    for k, (lab, _) in enumerate(fusion_pairs):
        vols = {p: generate_plane(model.generators[p], lab, p, label_nc=label_nc, device=device) for p in planes}
        inputs.append(np.stack([vols[p] for p in planes]))
        if cb is not None:
            cb(k + 1, len(fusion_pairs))
    model.history["mse_fusion"] = train_fusion(
        model.fusion,
        inputs,
        [img for _, img in fusion_pairs],
        [lab.data > 0 for lab, _ in fusion_pairs],
        config=config,
        device=device,
        progress=stage("fusion"),
        start=start("fusion"),
        checkpoint=saver("fusion"),
    )
    return model.to("cpu")


# ------------------------------------------------------------------------------- several processes (DDP)
def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _data_parallel(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel inside a process group of several processes, else itself."""
    if _world()[1] == 1:
        return module
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _ddp_worker(rank: int, world: int, init_file: str, pairs, config: SynthConfig, kwargs: dict, out: str, queue):
    """One process of :func:`_train_distributed`: joins the group, trains on its GPU (or the CPU), and reports
    progress and a checksum of its weights through ``queue``; rank 0 writes the model to ``out``."""
    cuda = resolve_device(config.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    backend = "nccl" if cuda else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:

        def progress(name: str) -> Callable[[int, int], None]:
            return lambda done, total: queue.put(("progress", name, done, total))

        local = replace(config, device=f"cuda:{rank}" if cuda else "cpu")
        model = train(pairs, local, progress=progress if rank == 0 else None, world_size=world, **kwargs)
        params = [*model.fusion.parameters(), *(q for g in model.generators.values() for q in g.parameters())]
        queue.put(("checksum", rank, float(sum(float(q.double().sum()) for q in params))))
        if rank == 0:
            save_model(model, out, extra={"history": model.history})
    finally:
        torch.distributed.destroy_process_group()


def _train_distributed(
    pairs: Sequence[tuple[Volume, Volume]],
    config: SynthConfig,
    *,
    world_size: int,
    progress: ProgressFactory | None,
    **kwargs: Any,
) -> SynthModel:
    """:func:`train` in ``world_size`` spawned processes (DDP); returns rank 0's model, after checking that every
    rank ended with the same weights."""
    import tempfile

    import torch.multiprocessing as mp

    if kwargs.get("resume") and not (Path(kwargs["checkpoint_dir"] or "") / CHECKPOINT_FILE).is_file():
        raise SlicefieldError("no checkpoint to resume from", path=kwargs["checkpoint_dir"], fix="run without --resume")
    if resolve_device(config.device).startswith("cuda") and torch.cuda.device_count() < world_size:
        raise SlicefieldError(
            f"{world_size} training processes need {world_size} GPUs, {torch.cuda.device_count()} are visible",
            fix="use fewer processes (--gpus)",
        )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    callbacks: dict[str, Callable[[int, int], None]] = {}
    checksums: dict[int, float] = {}

    def drain() -> None:
        while not queue.empty():
            kind, *msg = queue.get()
            if kind == "checksum":
                checksums[int(msg[0])] = float(msg[1])
            elif progress is not None:
                name, done, total = msg
                callbacks.setdefault(name, progress(name))(done, total)

    with tempfile.TemporaryDirectory(prefix="slicefield-ddp-") as tmp:
        args = (world_size, f"{tmp}/init", list(pairs), config, kwargs, f"{tmp}/model", queue)
        procs = mp.start_processes(_ddp_worker, args=args, nprocs=world_size, join=False, start_method="spawn")
        while not procs.join(timeout=0.2):
            drain()
        drain()
        model = load_model(f"{tmp}/model")
        model.history = json.loads((Path(tmp) / "model" / CONFIG_FILE).read_text(encoding="utf-8"))["history"]
    if len(set(checksums.values())) != 1 or len(checksums) != world_size:
        raise RuntimeError(f"the DDP processes ended with different weights: {checksums}")
    model.config = replace(model.config, device=config.device)
    return model


#: ``checkpoint(done, final, state)``: called by a training stage after each step.
StageCheckpoint = Callable[[int, bool, Callable[[], dict[str, Any]]], None]
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "slicefield-synth-checkpoint-1"


def _config_key(config: SynthConfig) -> str:
    """What must match for a checkpoint to continue a run (everything but the device)."""
    return json.dumps({k: v for k, v in config.to_json().items() if k != "device"}, sort_keys=True)


def _save_checkpoint(path: Path, model: SynthModel, *, stage: str, stage_state: dict[str, Any]) -> None:
    """Every generator and the fusion CNN, the running stage's state (optimisers, random streams, its losses) and the
    finished stages' losses: tensors and plain values only (``torch.load(weights_only=True)``)."""
    doc = {
        "format": CHECKPOINT_FORMAT,
        "config": _config_key(model.config),
        "label_nc": model.label_nc,
        "stage": stage,
        "state": stage_state,
        "generators": {p: g.state_dict() for p, g in model.generators.items()},
        "fusion": model.fusion.state_dict(),
        "history": json.dumps(model.history),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)


def _load_checkpoint(path: Path | None, model: SynthModel) -> dict[str, Any]:
    """Load ``path`` into ``model`` (weights, history); returns ``{"stage", "state"}`` of the running stage."""
    fix = "run without --resume to start again"
    if path is None or not path.is_file():
        raise SlicefieldError("no checkpoint to resume from", path=path, fix=fix)
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the restricted unpickler raises many types on foreign or corrupt files
        raise SlicefieldError(f"cannot read the checkpoint ({type(e).__name__})", path=path, fix=fix) from e
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise SlicefieldError("not a synthesis checkpoint of this version", path=path, fix=fix)
    if doc["config"] != _config_key(model.config) or int(doc["label_nc"]) != model.label_nc:
        raise SlicefieldError(
            "the checkpoint was written with other training options or label classes",
            path=path,
            fix="resume with the options of the interrupted run, or run without --resume",
        )
    for plane, g in model.generators.items():
        g.load_state_dict(doc["generators"][plane])
    model.fusion.load_state_dict(doc["fusion"])
    model.history = json.loads(doc["history"])
    log.info("resuming at %s, step %d", doc["stage"], int(doc["state"]["step"]))
    return {"stage": doc["stage"], "state": doc["state"]}


@dataclass
class Synthesis:
    """Output of :func:`generate`: the fused volume and each plane's, all on the label grid, intensities in [0, 1]."""

    fused: Volume
    planes: dict[str, Volume]


def generate(
    model: SynthModel,
    labels: Volume,
    *,
    device: str = "cpu",
    progress: ProgressFactory | None = None,
) -> Synthesis:
    """Synthesise a T1-like volume for a label map: each plane's generator slice by slice, then the fusion CNN.
    All outputs carry the label map's affine. Background (label 0) is set to 0 in the fused volume."""
    device = resolve_device(device)
    nc = n_classes(labels.data)
    if nc > model.label_nc:
        raise SlicefieldError(
            f"the label map has labels up to {nc - 1}, the model knows 0..{model.label_nc - 1}",
            fix="relabel it or train a model on label maps with these classes",
        )
    spacing = _world_spacing(labels.affine)
    if np.abs(spacing - np.asarray(model.spacing_mm)).max() > VOXEL_SIZE_TOLERANCE * min(model.spacing_mm):
        log.warning(
            "label map voxel size %s mm differs from the model's training voxel size %s mm; results may be poor",
            np.round(spacing, 3).tolist(),
            list(model.spacing_mm),
        )
    vols = {}
    for k, plane in enumerate(model.config.planes):
        vols[plane] = generate_plane(model.generators[plane], labels, plane, label_nc=model.label_nc, device=device)
        if progress is not None:
            progress("planes")(k + 1, len(model.config.planes))
    fused = fuse(model, vols, device=device, progress=progress("fusion") if progress is not None else None)
    fused = np.where(labels.data > 0, np.clip(fused, 0.0, 1.0), 0.0).astype(np.float32)
    return Synthesis(
        fused=Volume(fused, labels.affine.copy()),
        planes={p: Volume(v, labels.affine.copy()) for p, v in vols.items()},
    )


# ------------------------------------------------------------------------------------------------ files
CONFIG_FILE = "config.json"
FUSION_FILE = "fusion.pt"


def generator_file(plane: str) -> str:
    return f"generator_{plane}.pt"


def save_model(model: SynthModel, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write the model folder (see the module docstring); ``extra`` goes into config.json too. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for plane, g in model.generators.items():
        with atomic_path(folder / generator_file(plane)) as tmp:
            torch.save(g.state_dict(), tmp)
    with atomic_path(folder / FUSION_FILE) as tmp:
        torch.save(model.fusion.state_dict(), tmp)
    doc = {
        "format": "slicefield-synth-1",
        "config": model.config.to_json(),
        "label_nc": model.label_nc,
        "spacing_mm": list(model.spacing_mm),
        **(extra or {}),
    }
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return folder


def load_model(folder: str | Path) -> SynthModel:
    """Read a model folder written by :func:`save_model` (state dicts loaded with ``weights_only=True``)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise SlicefieldError(
            f"no {CONFIG_FILE}: not a synthesis model folder", path=folder, fix="pass the --out-dir of synth train"
        )
    try:
        doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        config = SynthConfig.from_json(doc["config"])
        model = new_model(config, int(doc["label_nc"]), doc["spacing_mm"])
    except (ValueError, KeyError, TypeError) as e:
        raise SlicefieldError(f"cannot read the model config ({e})", path=cfg_path, fix="re-run synth train") from e
    files = {**{p: folder / generator_file(p) for p in config.planes}, "fusion": folder / FUSION_FILE}
    for name, path in files.items():
        module = model.fusion if name == "fusion" else model.generators[name]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except (OSError, RuntimeError, EOFError, ValueError) as e:
            raise SlicefieldError(
                f"cannot load {path.name} ({str(e).splitlines()[0]})", path=folder, fix="re-run synth train"
            ) from e
        module.eval()
    return model
