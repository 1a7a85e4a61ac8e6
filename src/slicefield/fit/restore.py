"""Self-supervised restoration: a small 3D CNN learns, from the stacks alone, to undo what the reconstruction loses.

A reconstruction ``X`` (e.g. ``srr``) of stacks ``y = A x + n`` misses what the thick slices do not sample (in
k-space, the corner where all three frequencies are high, i.e. edges whose normal is oblique to every stack) and
keeps some noise. We re-acquire ``X`` through the **same** operators ``A`` with Gaussian noise of the level
estimated in the stacks, reconstruct that again with the same procedure (``X2``), and train a residual CNN ``f``
so that ``X2 + f(X2) ~ X``: it learns the reconstruction's own loss on this subject's anatomy. Applied to ``X``,
``X + f(X)`` estimates what ``X`` lost (internal learning, as in zero-shot super-resolution; no external data, no
downloaded weights; the network is trained for each reconstruction).

Guard against a network that does not generalise: patches are drawn from the first 80 % (``1 - holdout``) of the
volume along its longest axis; the rest is the validation slab, where the gain of ``X2 + f(X2)`` over ``X2``
against ``X`` is measured every ``validate_every`` steps. The best state is kept; if its gain is below
``min_gain_db``, ``X`` is returned unchanged. Frames: everything here is on the fit grid (voxel index order);
intensities are divided by the 99th percentile of the foreground for the network and restored after.

Training batches are flipped along random voxel axes (``flips``). Measured (``benchmarks/RESULTS.md``,
2026-11-23, 2-core CPU): brain PSNR over ``srr`` +0.55 dB on Colin27 1 mm ×4, +0.64 dB on MNI152 1 mm ×4, +1.17 /
+1.14 dB on MNI152 at 3 mm / 2 mm with oblique 6 mm stacks, +0.67 dB on Colin27 3 mm, +0.95 dB on Colin27 2 mm; on
nibabel's small 33×41×25 T1 the guard declined (validation gain < 0), leaving ``srr``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..metrics import estimate_noise_sigma, foreground_mask
from ..volume import Stack

log = logging.getLogger(__name__)

#: Voxels of context cropped off each side of a patch before the loss (the network's receptive field is 2 * depth
#: + 1 wide; the border of a patch sees zero padding).
PATCH_MARGIN = 4


@dataclass(frozen=True)
class RestoreConfig:
    """How to train the self-supervised restoration network."""

    steps: int = 1000
    """Adam steps (cosine-annealed learning rate)."""
    channels: int = 16
    """Feature channels of each hidden layer."""
    depth: int = 4
    """Convolution layers (3x3x3, ReLU between them)."""
    patch: int = 24
    """Patch side (voxels); smaller on small volumes."""
    batch: int = 4
    """Patches per step."""
    lr: float = 3e-4
    """Adam learning rate at the start. Colin27 3 mm (60x72x60, 6 mm stacks, 0.5 % noise), seeds 0-3: at 1e-3 three
    of four runs learnt nothing (validation gain <= 0.001 dB, result = srr), one gained +0.58 dB; at 3e-4 all four
    gained +0.57 to +0.65 dB (2026-11-23)."""
    holdout: float = 0.2
    """Share of the volume (along its longest axis) kept out of training, for validation."""
    validate_every: int = 100
    """Steps between two validations (the best validated state is kept)."""
    min_gain_db: float = 0.05
    """Below this validation gain (dB), the network is not used and the reconstruction is returned unchanged."""
    seed: int = 0
    """Seed of the re-acquisition noise, the initial weights and the patch draws."""
    flips: bool = True
    """Flip each training batch along a random subset of the voxel axes (data augmentation). With stacks along the
    voxel axes a flip leaves the degradation as it is; an oblique stack's slices are mirrored, which was measured to
    help too. Gain over srr without / with, brain PSNR, 2026-11-23, shared 2-core CPU (``benchmarks/restore_cases.py``
    cases): Colin27 3 mm +0.65 / +0.67, MNI152 3 mm oblique +1.09 / +1.17, Colin27 2 mm +0.92 / +0.95 dB. Averaging
    the network over the 8 flips of its input at inference added another 0.02-0.06 dB there, but costs 8 passes
    (about 45 s on whole Colin27): not done."""


@dataclass
class RestoreResult:
    volume: np.ndarray
    """The restored volume (the input itself when ``used`` is False), float32 on the fit grid."""
    used: bool
    """Whether the network was applied (validation gain >= ``min_gain_db``)."""
    validation_gain_db: float
    """Best gain of the network over its input on the held-out slab of the training pair (dB)."""
    best_step: int
    """Step of that best state (0: the untrained network)."""
    steps_done: int
    seconds: float


def build_network(config: RestoreConfig) -> nn.Sequential:
    """The residual CNN: ``depth`` 3x3x3 convolutions with ReLU, the last one started near zero (identity).

    Its weights are stored channels-last (``torch.channels_last_3d``), which selects faster oneDNN convolutions on
    the CPU: one training step (4 patches of 24^3, forward + backward + Adam, one thread) took 0.10 s against
    0.15-0.22 s contiguous, and one pass over a 181 x 217 x 181 volume 5.2-5.7 s against 8.3-9.8 s (2-core AMD EPYC
    VM, torch 2.13.0+cpu, 2026-12-07, interleaved runs)."""
    layers: list[nn.Module] = [nn.Conv3d(1, config.channels, 3, padding=1), nn.ReLU()]
    for _ in range(config.depth - 2):
        layers += [nn.Conv3d(config.channels, config.channels, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv3d(config.channels, 1, 3, padding=1))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        net[-1].weight.mul_(0.1)
        net[-1].bias.zero_()
    return net.to(memory_format=torch.channels_last_3d)


def reacquire(volume: np.ndarray, stacks: list[Stack], operators: list, *, sigma: float, seed: int) -> list[Stack]:
    """``stacks`` with their data replaced by ``A volume`` + Gaussian noise of std ``sigma`` (same geometry)."""
    rng = np.random.default_rng(seed)
    out = []
    for stack, op in zip(stacks, operators, strict=True):
        values = op.forward(volume) + rng.normal(0.0, sigma, stack.data.shape).astype(np.float32)
        out.append(dataclasses.replace(stack, data=values.astype(np.float32)))
    return out


def restore_reconstruction(
    stacks: list[Stack],
    volume: np.ndarray,
    *,
    reconstruct: Callable[[list[Stack]], np.ndarray],
    operators: list,
    config: RestoreConfig = RestoreConfig(),
    deadline: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreResult:
    """Train the network on (reconstruct(re-acquired volume), volume) and apply it to ``volume`` (see the module).

    stacks, operators: the acquired stacks and their forward operators on the fit grid (as the reconstruction used).
    reconstruct: the reconstruction procedure that made ``volume`` (stacks -> volume on the same grid).
    deadline: a ``time.perf_counter()`` value; training stops before it (the best validated state so far is used).
    """
    t0 = time.perf_counter()
    x = np.asarray(volume, dtype=np.float32)
    sigma = float(np.median([estimate_noise_sigma(s.data) for s in stacks]))
    pair_input = reconstruct(reacquire(x, stacks, operators, sigma=sigma, seed=config.seed))
    fg = foreground_mask(x)
    scale = float(np.percentile(x[fg], 99)) if fg.any() else float(np.abs(x).max() or 1.0)
    inp = torch.from_numpy(np.asarray(pair_input, np.float32) / scale)
    tgt = torch.from_numpy(x / scale)

    axis = int(np.argmax(x.shape))
    cut = int(round(x.shape[axis] * (1.0 - config.holdout)))
    side = min(config.patch, cut, *(x.shape[a] for a in range(3) if a != axis))
    if side < 2 * PATCH_MARGIN + 4 or not fg.any():
        log.info("restoration skipped: volume too small for %d-voxel patches", config.patch)
        return RestoreResult(x, False, 0.0, 0, 0, time.perf_counter() - t0)
    train_fg = fg.copy()
    train_fg[_along(axis, slice(max(cut - side // 2, 0), None))] = False
    centres = np.argwhere(train_fg) if train_fg.any() else np.argwhere(fg)
    hi = np.array(x.shape) - side
    hi[axis] = cut - side
    held = _along(axis, slice(cut, None))
    context = _along(axis, slice(max(cut - PATCH_MARGIN, 0), None))
    held_fg = torch.from_numpy(fg[held])

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = build_network(config)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.steps, 1))

    @torch.no_grad()
    def validation_gain() -> float:
        if not held_fg.any():
            return 0.0
        a = inp[context]
        out = (a + net(a[None, None])[0, 0])[_along(axis, slice(cut - context[axis].start, None))]
        err_in = float(((inp[held] - tgt[held])[held_fg] ** 2).sum())
        err_out = float(((out - tgt[held])[held_fg] ** 2).sum())
        return 10.0 * np.log10(max(err_in, 1e-30) / max(err_out, 1e-30))

    best_gain, best_state, best_step, done = validation_gain(), _copy(net), 0, 0
    m = PATCH_MARGIN
    for step in range(config.steps):
        if deadline is not None and time.perf_counter() > deadline:
            log.info("restoration: time budget reached after %d of %d steps", step, config.steps)
            break
        xs, ys = [], []
        for _ in range(config.batch):
            corner = np.clip(centres[rng.integers(len(centres))] - side // 2, 0, hi)
            sl = tuple(slice(int(c), int(c) + side) for c in corner)
            xs.append(inp[sl])
            ys.append(tgt[sl])
        xb, yb = torch.stack(xs)[:, None], torch.stack(ys)[:, None]
        if config.flips:
            dims = tuple(int(d) + 2 for d in np.flatnonzero(rng.random(3) < 0.5))
            if dims:
                xb, yb = xb.flip(dims), yb.flip(dims)
        loss = ((xb + net(xb) - yb)[..., m:-m, m:-m, m:-m] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % config.validate_every == 0 or done == config.steps:
            gain = validation_gain()
            if gain > best_gain:
                best_gain, best_state, best_step = gain, _copy(net), done
        if progress is not None:
            progress(done, config.steps)
    used = best_gain >= config.min_gain_db
    log.info("restoration: validation gain %.3f dB at step %d of %d (%s)", best_gain, best_step, done,
             "applied" if used else "not applied")  # fmt: skip
    if not used:
        return RestoreResult(x, False, best_gain, best_step, done, time.perf_counter() - t0)
    net.load_state_dict(best_state)
    with torch.no_grad():
        restored = (tgt + net(tgt[None, None])[0, 0]).numpy() * scale
    return RestoreResult(restored.astype(np.float32), True, best_gain, best_step, done, time.perf_counter() - t0)


def _along(axis: int, sl: slice) -> tuple[slice, ...]:
    out = [slice(None)] * 3
    out[axis] = sl
    return tuple(out)


def _copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
