"""Fit a Representation (a field over world mm) to stacks through the forward model; run control.

Two ways to feed the physics to the field:

``grid`` (default, fast on a CPU): the field is read on the fit grid (the output grid), the exact SRR objective
(:class:`~slicefield.fit.objective.GridObjective`: every slice through the precomputed sparse operator, plus the
Huber prior) gives the gradient with respect to those grid values, and that gradient is back-propagated into the
field's parameters chunk by chunk (``batch_voxels`` voxels at a time): an exact gradient of the SRR objective with
respect to the field's parameters, at the cost of reading the whole field on the grid every step. A voxel field on
the fit grid is its own grid values, so that case costs no more than one SRR iteration.

``slices`` (IREM's formulation): mini-batches of acquired pixels; each prediction is the mean of the field at
``psf_samples`` positions drawn from the pixel's PSF (slice frame -> world mm); mean squared error.

Run control: ``time_budget_s`` (stops gracefully), checkpoints every ``checkpoint_every`` steps into a folder,
resume from it, seeds for identical CPU output, ``device`` auto|cpu|cuda. Checkpoints and models hold only
tensors and plain values and load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..acquisition.psf import INPLANE_FWHM_PER_SPACING
from ..baselines.srr import auto_weight, intensity_scale
from ..errors import SlicefieldError
from ..geometry import FWHM_PER_SIGMA, apply_affine
from ..io.atomic import atomic_path
from ..representations import build_representation, default_config
from ..representations.base import GridFrame
from ..volume import Stack, Volume
from .objective import GridObjective
from .prior import PriorConfig, PriorEmbedding, PriorPull, auto_pull_weight, embed_prior
from .restore import RestoreConfig

log = logging.getLogger(__name__)

#: Points per chunk when reading a field on a grid (bounds memory).
EVAL_CHUNK = 2**18
#: Version of the checkpoint and model files.
FORMAT_VERSION = 1


#: Adam learning rate per representation when ``FitConfig.lr`` is None (others: 1e-2). SIREN diverges at 1e-2: on
#: Colin27 at 4 mm (48³ crop, ×4 stacks, srr start, 100 + 30 steps) brain PSNR 5.7 dB at 1e-2, 27.7 at 1e-3, 25.4 at
#: 1e-4 (2026-11-23); IREM's is its paper's.
DEFAULT_LR: dict[str, float] = {"siren": 1e-3, "irem": 1e-4}


@dataclass(frozen=True)
class FitConfig:
    """How to fit a field to stacks."""

    representation: str = "voxel"
    """Field: voxel, hashgrid, planes, siren or irem."""
    mode: Literal["grid", "slices"] = "grid"
    """grid: exact objective on the fit grid through the precomputed operator; slices: IREM-style mini-batches."""
    steps: int | None = None
    """Optimisation steps (the time budget may stop earlier); None: 0 when the warm start went through the
    restoration (``restore``, applied or declined), else 200 on a CPU (after the srr warm start), 600 on CUDA (after
    the bspline warm start; steps are cheap there)."""
    lr: float | None = None
    """Adam learning rate; None: the representation's (:data:`DEFAULT_LR`)."""
    lr_halve_every: int = 0
    """Halve the learning rate every this many steps (0: never)."""
    batch_voxels: int = 2**16
    """grid mode: voxels per chunk when back-propagating through a non-voxel field (bounds memory)."""
    batch_pixels: int = 2500
    """slices mode: acquired pixels per mini-batch."""
    psf_samples: int = 8
    """slices mode: PSF samples per pixel."""
    prior: Literal["huber", "tgv"] = "huber"
    """grid mode: prior on the grid values: huber (SRR's, first order) or tgv (second-order total generalised
    variation with Huber-smoothed norms; see :mod:`slicefield.fit.objective`)."""
    weight: float | None = None
    """Prior weight (as SRR's); None: from the noise level estimated in the stacks."""
    weight_factor: float = 1.0
    """Multiplies the weight (the automatic one included)."""
    tgv_ratio: float = 1.0
    """tgv: weight of the second-order term relative to the first."""
    huber_delta: float = 0.02
    """Huber threshold, as a fraction of the intensity scale."""
    warm_start: Literal["auto", "srr", "bspline", "none"] = "auto"
    """Start from a classical reconstruction (distilled into the field before fitting); auto: srr on a CPU, bspline
    on CUDA (where srr's CPU solver would take longer than the whole fit)."""
    warm_steps: int = 100
    """Steps of distillation of the warm start into a non-voxel field."""
    restore: Literal["auto", "on", "off"] = "auto"
    """Improve the warm start with the self-supervised restoration network (:mod:`slicefield.fit.restore`) before
    fitting; auto: on for the voxel field with the srr warm start (the CPU default) and no prior volume."""
    restoration: RestoreConfig = field(default_factory=RestoreConfig)
    """How the restoration network is trained (its seed is this config's ``seed``)."""
    time_budget_s: float | None = None
    """Keep the result so far rather than run past this many seconds (warm start and setup included): the warm
    start's distillation and the steps stop early; a step that would end past it is not started. The final
    read-out of the field on the grid comes after."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (when a checkpoint folder is given)."""
    seed: int = 0
    """Seed of every random choice (parameter init, batches, PSF samples)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""


@dataclass
class FitResult:
    model: torch.nn.Module
    frame: GridFrame
    scale: float
    volume: Volume
    history: list[dict] = field(default_factory=list)
    steps_done: int = 0
    stopped_by_budget: bool = False
    restore: dict | None = None
    """What the restoration of the warm start did (see :class:`~slicefield.fit.restore.RestoreResult`), or None."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; errors clearly when CUDA is asked for and missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SlicefieldError("--device cuda asked for but CUDA is not available", fix="use --device auto or cpu")
    if name not in ("cpu", "cuda"):
        raise SlicefieldError(f"unknown device {name!r}", fix="use auto, cpu or cuda")
    return torch.device(name)


def grid_coordinates(grid: Volume, frame: GridFrame) -> torch.Tensor:
    """Normalised coordinates ``(X*Y*Z, 3)`` float32 of every voxel centre of ``grid`` (C order)."""
    ijk = np.indices(grid.shape, dtype=np.float32).reshape(3, -1).T
    return frame.normalise(torch.from_numpy(apply_affine(grid.affine, ijk).astype(np.float32)))


@torch.no_grad()
def evaluate_on(model: torch.nn.Module, u: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The field at normalised coordinates ``u: (N, 3)`` in chunks; ``(N,)`` float32 on CPU."""
    model.eval()
    out = torch.cat([model(u[i : i + EVAL_CHUNK].to(device)).float().cpu() for i in range(0, len(u), EVAL_CHUNK)])
    model.train()
    return out


def _is_voxel_on(model: torch.nn.Module, grid_shape: tuple[int, ...]) -> bool:
    values = getattr(model, "values", None)
    return isinstance(values, torch.nn.Parameter) and tuple(values.shape) == tuple(grid_shape)


def _warm_start(stacks: list[Stack], grid: Volume, kind: str, operators: list | None) -> np.ndarray | None:
    from ..baselines.bspline import bspline_average
    from ..baselines.srr import srr

    if kind == "none":
        return None
    init = bspline_average(stacks, grid)
    return srr(stacks, grid, init=init, operators=operators) if kind == "srr" else init


def _psf_sigmas(stack: Stack) -> np.ndarray:
    """Per-axis spread of the PSF in the slice frame (mm): Gaussian sigma, or box half-width."""
    dx, dy = stack.spacing
    if stack.psf == "gaussian":
        return np.array([INPLANE_FWHM_PER_SPACING * dx, INPLANE_FWHM_PER_SPACING * dy, stack.thickness]) / (
            FWHM_PER_SIGMA
        )
    return np.array([dx, dy, stack.thickness]) / 2.0


class _SliceSampler:
    """slices mode: random acquired pixels and PSF sample positions (world mm)."""

    def __init__(self, stacks: list[Stack], scale: float):
        self.stacks = stacks
        self.values = [torch.from_numpy((s.data / np.float32(scale)).ravel()) for s in stacks]
        sizes = np.array([s.data.size for s in stacks], dtype=np.float64)
        self.p = sizes / sizes.sum()

    def batch(self, rng: np.random.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = rng.multinomial(n, self.p)
        pts, vals = [], []
        for s, c, v in zip(self.stacks, counts, self.values, strict=True):
            if c == 0:
                continue
            idx = rng.integers(0, s.data.size, c)
            sl, i, j = np.unravel_index(idx, s.data.shape)
            spread = _psf_sigmas(s)
            draw = rng.standard_normal((c, k, 3)) if s.psf == "gaussian" else rng.uniform(-1, 1, (c, k, 3))
            local = np.stack([i * s.spacing[0], j * s.spacing[1], np.zeros(c)], axis=-1)[:, None] + draw * spread
            m = s.slice_to_world[sl]  # (c, 4, 4)
            world = np.einsum("cab,ckb->cka", m[:, :3, :3], local) + m[:, None, :3, 3]
            pts.append(world.reshape(-1, 3))
            vals.append(v[idx])
        return torch.from_numpy(np.concatenate(pts).astype(np.float32)), torch.cat(vals)


@torch.no_grad()
def _recalibrate_batchnorm(
    model: torch.nn.Module, u: torch.Tensor, rng: np.random.Generator, device: torch.device, *, batches: int = 20
) -> None:
    """Recompute batch-norm running statistics (cumulative average over random batches of ``u``) before reading.

    IREM's batch norm makes training outputs depend on the batch and its running statistics lag the weights;
    a fresh pass with the final weights makes evaluation mode (used to read the field) match training.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model(u[torch.from_numpy(rng.integers(0, len(u), EVAL_CHUNK // 4))].to(device))
    model.eval()


def _safe_load(path: Path, device: torch.device | str, *, fix: str) -> dict:
    """``torch.load(weights_only=True)`` of a user's file; any failure becomes one SlicefieldError line."""
    try:
        doc = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - the restricted unpickler raises many types on foreign or corrupt files
        raise SlicefieldError(f"cannot read ({type(e).__name__}: {str(e)[:80]})", path=path, fix=fix) from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        raise SlicefieldError("not a slicefield file of this version", path=path, fix=fix)
    return doc


def _save_checkpoint(folder: Path, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "checkpoint.pt") as tmp:
        torch.save(state, tmp)


def _config_key(config: FitConfig) -> str:
    keep = {k: v for k, v in asdict(config).items() if k not in ("time_budget_s", "steps")}
    return json.dumps(keep, sort_keys=True)


def _expected_steps(config: FitConfig, n_steps: int, done_here: int, done: int, elapsed: float, t_loop: float) -> int:
    """Steps the run will make: ``n_steps``, or fewer when the time budget will stop it first (for progress ETAs)."""
    if config.time_budget_s is None or done_here <= 0:
        return n_steps
    per_step = (time.perf_counter() - t_loop) / done_here
    left = max(0.0, config.time_budget_s - elapsed)
    return min(n_steps, done + int(left / max(per_step, 1e-9)))


def fit_field(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: FitConfig = FitConfig(),
    representation_config: object | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    prior: Volume | None = None,
    prior_config: PriorConfig | None = None,
    prior_name: str = "prior",
) -> FitResult:
    """Fit a field to ``stacks`` and read it on ``grid`` (shape + voxel -> world mm RAS affine).

    checkpoint_dir: folder for ``checkpoint.pt`` (written every ``checkpoint_every`` steps and at the end);
    resume: continue from the checkpoint there (same config, else an error).
    prior: a prior volume (own grid and voxel -> world mm RAS affine) embedded by
    :func:`~slicefield.fit.prior.embed_prior` with ``prior_config`` (None: the defaults): the field starts from it
    instead of the warm start, and (grid mode, pull weight > 0) is pulled towards it.
    prior_name: how errors name the prior.
    """
    t0 = time.perf_counter()  # the time budget counts everything: warm start, operators and steps
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    scale = intensity_scale(stacks)
    frame = GridFrame.of_grid(grid.shape, grid.affine)
    rep_config = representation_config or default_config(config.representation)
    if config.representation == "voxel":
        rep_config = replace(rep_config, shape=tuple(grid.shape))
    model = build_representation(config.representation, rep_config).to(device)
    # tgv's auxiliary vector field (voxel units, on the fit grid), optimised with the field
    aux = (
        torch.nn.Parameter(torch.zeros((3, *grid.shape), device=device))
        if config.mode == "grid" and config.prior == "tgv"
        else None
    )
    groups = [{"params": list(model.parameters())}] + ([{"params": [aux]}] if aux is not None else [])
    lr = config.lr if config.lr is not None else DEFAULT_LR.get(config.representation, 1e-2)
    opt = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / "checkpoint.pt"
    start_step, elapsed_before, history = 0, 0.0, []

    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise SlicefieldError(
                "nothing to resume",
                path=ckpt_path or "(no checkpoint folder)",
                fix="run once with --checkpoint DIR first",
            )
        state = _safe_load(ckpt_path, device, fix="start a new checkpoint folder")
        if state.get("config_key") != _config_key(config):
            raise SlicefieldError(
                "checkpoint was made with other options",
                path=ckpt_path,
                fix="resume with the same options, or start a new checkpoint folder",
            )
        model.load_state_dict(state["model"])
        if aux is not None:
            aux.data.copy_(state["aux"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        start_step, elapsed_before = int(state["step"]), float(state["elapsed_s"])
        history = json.loads(state["history"])
        log.info("resumed from %s at step %d", ckpt_path, start_step)

    u_grid = grid_coordinates(grid, frame)
    voxel_field = _is_voxel_on(model, grid.shape)
    operators = None
    warm = config.warm_start if config.warm_start != "auto" else ("srr" if device.type == "cpu" else "bspline")
    n_steps = config.steps if config.steps is not None else (200 if device.type == "cpu" else 600)
    if config.mode == "grid" or warm == "srr" or prior is not None:
        from ..acquisition.operator import StackOperator

        operators = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
    embedding: PriorEmbedding | None = None
    if prior is not None:
        prior_config = prior_config or PriorConfig()
        embedding = embed_prior(prior, stacks, grid, config=prior_config, operators=operators, name=prior_name)
    restore_info = None
    if not resume and (warm != "none" or embedding is not None):
        if embedding is not None:
            start = embedding.values
        else:
            t_warm = time.perf_counter()
            start = _warm_start(stacks, grid, warm, operators)
            if _restores(config, warm):
                start, restore_info = _restore(stacks, grid, start, warm, operators, config, t0, elapsed_before,
                                               time.perf_counter() - t_warm, progress)  # fmt: skip
        init = start / scale
        if config.steps is None and restore_info is not None and "skipped" not in restore_info:
            # none by default: Huber steps after a restoration undo its gain (-1.9 to -2.8 dB measured), and where it
            # declined they are no dependable gain over srr either (-1.8 to +0.4 dB on six cases, RESULTS.md)
            n_steps = 0
        if voxel_field:
            with torch.no_grad():
                model.values.copy_(torch.from_numpy(init.astype(np.float32)))
        else:
            target = torch.from_numpy(init.astype(np.float32).ravel())
            for k in range(config.warm_steps):
                if k and _over_budget(config, elapsed_before + time.perf_counter() - t0):
                    log.info("time budget reached during the warm start's distillation (%d of %d steps)", k, k)
                    break
                idx = torch.from_numpy(rng.integers(0, len(u_grid), config.batch_voxels))
                loss = torch.mean((model(u_grid[idx].to(device)) - target[idx].to(device)) ** 2)
                opt.zero_grad()
                loss.backward()
                opt.step()

    objective = None
    sampler = None
    if config.mode == "grid":
        objective = GridObjective(
            stacks,
            grid,
            scale=scale,
            weight=(auto_weight(stacks) if config.weight is None else config.weight) * config.weight_factor,
            delta=config.huber_delta,
            device=device,
            prior=config.prior,
            tgv_ratio=config.tgv_ratio,
            operators=operators,
        )
        if aux is not None and not resume:  # start w at the image gradient of the starting field
            with torch.no_grad():
                x0 = model.values if voxel_field else evaluate_on(model, u_grid, device).reshape(grid.shape)
                aux.copy_(objective.initial_w(x0.to(device)))
    elif config.mode == "slices":
        sampler = _SliceSampler(stacks, scale)
    else:
        raise SlicefieldError(f"unknown fit mode {config.mode!r}", fix="use grid or slices")
    pull = None
    if embedding is not None and objective is not None:
        pull_weight = auto_pull_weight(embedding) if prior_config.pull_weight is None else prior_config.pull_weight
        log.info("prior pull weight %.4g", pull_weight)
        if pull_weight > 0:
            anchor = torch.from_numpy(embedding.values / np.float32(scale)).to(device)
            pull = PriorPull(anchor, weight=pull_weight, n=objective.n, delta=prior_config.pull_delta)

    def save(done: int, elapsed: float) -> None:
        _save_checkpoint(
            ckpt_path.parent,
            {
                "format": FORMAT_VERSION,
                "step": done,
                "model": model.state_dict(),
                **({"aux": aux.detach().cpu()} if aux is not None else {}),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "elapsed_s": elapsed,
                "history": json.dumps(history),
                "config_key": _config_key(config),
            },
        )

    step = start_step
    stopped = False
    t_loop = time.perf_counter()
    n_vox = len(u_grid)
    for step in range(start_step, n_steps):
        # stop before a step that would end past the budget (its length: the mean of this run's steps so far)
        now = elapsed_before + time.perf_counter() - t0
        per_step = (time.perf_counter() - t_loop) / (step - start_step) if step > start_step else 0.0
        if _over_budget(config, now + per_step):
            stopped = True
            log.info("time budget of %.0f s reached after %d steps", config.time_budget_s, step)
            if ckpt_path is not None and step > start_step:
                save(step, now)  # a later --resume (with a larger budget) continues from here
            if progress is not None:
                progress(step, step)
            step -= 1  # the steps made
            break
        if config.lr_halve_every:
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 ** (step // config.lr_halve_every)
        if config.mode == "grid":
            opt.zero_grad()
            w = None if aux is None else aux.detach()
            if voxel_field:
                data, reg, g, gw = objective.value_and_grad(model.values.detach(), w)
                if pull is not None:
                    pull_value, pull_grad = pull.value_and_grad(model.values.detach())
                    reg, g = reg + pull_value, g + pull_grad
                model.values.grad = g.to(model.values.dtype)
            else:
                x = evaluate_on(model, u_grid, device).reshape(grid.shape).to(device)
                data, reg, g, gw = objective.value_and_grad(x, w)
                if pull is not None:
                    pull_value, pull_grad = pull.value_and_grad(x)
                    reg, g = reg + pull_value, g + pull_grad
                g = g.reshape(-1)
                for i in range(0, n_vox, config.batch_voxels):  # exact gradient, back-propagated chunk by chunk
                    f = model(u_grid[i : i + config.batch_voxels].to(device))
                    (f * g[i : i + config.batch_voxels]).sum().backward()
            if aux is not None:
                aux.grad = gw
            loss = data + reg
        else:
            pts, vals = sampler.batch(rng, config.batch_pixels, config.psf_samples)
            pred = model(frame.normalise(pts).to(device)).reshape(config.batch_pixels, config.psf_samples).mean(1)
            loss_t = torch.mean((pred - vals.to(device)) ** 2)
            opt.zero_grad()
            loss_t.backward()
            loss = data = float(loss_t.detach())
            reg = 0.0
        opt.step()
        history.append({"step": step + 1, "loss": loss, "data": data, "prior": reg})
        elapsed = elapsed_before + time.perf_counter() - t0
        if progress is not None:
            progress(step + 1, _expected_steps(config, n_steps, step + 1 - start_step, step + 1, elapsed, t_loop))
        last = step + 1 == n_steps
        if ckpt_path is not None and ((step + 1) % config.checkpoint_every == 0 or last):
            save(step + 1, elapsed)
    _recalibrate_batchnorm(model, u_grid, rng, device)
    values = model.values.detach().cpu() if voxel_field else evaluate_on(model, u_grid, device).reshape(grid.shape)
    volume = Volume(values.numpy().astype(np.float32) * np.float32(scale), grid.affine.copy())
    return FitResult(model, frame, scale, volume, history, min(step + 1, n_steps), stopped, restore_info)


def _restores(config: FitConfig, warm: str) -> bool:
    # auto: only where the restored volume is the answer (a voxel field); a neural field needs its budget for the
    # distillation and its steps (with the restoration first, planes/hashgrid/siren at a 45 s budget were left at
    # 5 dB on Colin27 2 mm, 2026-11-23)
    auto = config.restore == "auto" and warm == "srr" and config.representation == "voxel"
    return config.restore == "on" or auto


def _restore(
    stacks: list[Stack], grid: Volume, start: np.ndarray, warm: str, operators: list | None, config: FitConfig,
    t0: float, elapsed_before: float, warm_seconds: float, progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, dict]:  # fmt: skip
    """The warm start through the restoration network, unless the time budget cannot hold it."""
    from ..acquisition.operator import StackOperator
    from .restore import restore_reconstruction

    deadline = None
    if config.time_budget_s is not None:
        left = config.time_budget_s - elapsed_before - (time.perf_counter() - t0)
        if left < 1.5 * warm_seconds + 10.0:  # the re-acquired stacks' reconstruction alone would not fit
            log.info("restoration skipped: %.0f s of the time budget left", left)
            return start, {"used": False, "skipped": "time budget"}
        deadline = time.perf_counter() + left - 0.1 * warm_seconds
    if operators is None:
        operators = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
    result = restore_reconstruction(
        stacks, start, reconstruct=lambda s: _warm_start(s, grid, warm, operators), operators=operators,
        config=replace(config.restoration, seed=config.seed), deadline=deadline, progress=progress,
    )  # fmt: skip
    info = {"used": result.used, "validation_gain_db": float(result.validation_gain_db),
            "best_step": result.best_step, "steps": result.steps_done, "seconds": result.seconds}  # fmt: skip
    return result.volume, info


def _over_budget(config: FitConfig, elapsed_s: float) -> bool:
    return config.time_budget_s is not None and elapsed_s > config.time_budget_s


def model_document(result: FitResult, *, representation: str, representation_config: object) -> dict:
    """Everything needed to rebuild and query a fitted field (tensors and plain values only)."""
    return {
        "format": FORMAT_VERSION,
        "representation": representation,
        "representation_config": json.dumps(asdict(representation_config)),
        "state_dict": result.model.state_dict(),
        "world_to_u": list(result.frame.world_to_u),
        "scale": result.scale,
    }


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, GridFrame, float]:
    """Load a model file written by ``reconstruct --method inr`` (``weights_only=True``): field, frame, scale."""
    from ..representations import config_class

    path = Path(path)
    doc = _safe_load(path, device, fix="pass a model.pt written by slicefield reconstruct --method inr")
    name = doc["representation"]
    cfg = config_class(name)(**_tuples(json.loads(doc["representation_config"])))
    model = build_representation(name, cfg).to(device)
    model.load_state_dict(doc["state_dict"])
    return model, GridFrame(tuple(doc["world_to_u"])), float(doc["scale"])


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def sample_model(
    model: torch.nn.Module, frame: GridFrame, scale: float, grid: Volume, *, device: str = "cpu"
) -> Volume:
    """Read a fitted field on any grid (shape + voxel -> world mm RAS affine)."""
    dev = resolve_device(device)
    values = evaluate_on(model.to(dev), grid_coordinates(grid, frame), dev).reshape(grid.shape)
    return Volume(values.numpy() * np.float32(scale), grid.affine.copy())
