"""Fit an attenuation volume to sparse views, render the held-out views, export the volume on the subject's grid.

The unknown is a grid of intensities ``x`` on the orbit-aligned grid (:func:`orbit_frame_grid`: one voxel per
detector pixel at the isocentre, one plane per detector row). With ``A`` the DRR operator of the training cameras
(:mod:`.projector`, intensity -> intensity x mm) and ``b`` their views, the fit works on the scaled unknown
``z = x / x_scale`` (``x_scale = b_scale k``, ``b_scale = max |b|``, ``k = 1 / (n pixel_mm)``, so ``z`` is O(1))
and minimises::

    1/2 ||k A z - b / b_scale||^2  +  tv_weight n^2 sum(sqrt(|grad z|^2 + TV_EPS^2))

over ``z >= 0`` with ``z = 0`` on voxels crossed by an empty (zero) ray (space carving): a few CGLS (or SIRT)
iterations on ``A x = b`` as the fast start, then FISTA (accelerated projected gradient with restarts).
The smoothed TV is stiff (its gradient's Lipschitz constant grows as 1 / TV_EPS, shortening the FISTA step), so its
weight is small: on Colin27 DRRs, 1e-9 gave the best held-out views (benchmarks/results/views_section.md); on
noise-free DRRs most of the gain over CGLS comes from non-negativity and carving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import SlicefieldError
from ..metrics import psnr, ssim
from ..volume import Volume
from .cameras import Camera
from .io import Views
from .projector import OrbitGrid, OrbitProjector, TorchRayProjector, orbit_grid

log = logging.getLogger(__name__)

#: Smoothing of the TV penalty, in units of z (the scaled intensity, O(1)).
TV_EPS = 1e-2
#: Lipschitz constant of the gradient of sum(sqrt(|grad z|^2 + eps^2)) times eps (forward differences in 3D).
TV_LIPSCHITZ = 12.0
#: Power iterations for the operator norm (the FISTA step), and the safety factor on the estimate (power
#: iteration approaches the norm from below; FISTA diverges if the step is too long).
POWER_ITERATIONS = 8
POWER_SAFETY = 1.05
#: A ray whose value is at most this fraction of the largest counts as empty (space carving).
EMPTY_RAY_FRACTION = 1e-6

Start = Literal["cgls", "sirt", "zero"]
ProjectorKind = Literal["auto", "sparse", "torch"]


@dataclass(frozen=True)
class ViewFitConfig:
    """How a volume is fitted to the training views."""

    train_every: int = 5
    """Views 0, k, 2k, ... are the training set; the rest are held out."""
    start: Start = "cgls"
    """Fast start: cgls or sirt iterations on A x = b (no bound, no TV), or zero."""
    start_iterations: int = 10
    """Iterations of the fast start."""
    tv_weight: float = 1e-9
    """Weight of the smoothed total variation of the scaled volume z (module docstring); 0: none."""
    iterations: int = 100
    """FISTA iterations (non-negativity, carved support, TV) after the start; 0: keep the start."""
    time_budget_s: float | None = None
    """Stop the iterations after this many seconds (the result so far is kept)."""
    projector: ProjectorKind = "auto"
    """sparse (parallel orbit, scipy.sparse), torch (any cameras, matrix-free), auto: sparse when it applies."""

    def __post_init__(self) -> None:
        if self.train_every < 2:
            raise ValueError(f"train_every must be >= 2 (some views must be held out), got {self.train_every}")
        if self.start not in ("cgls", "sirt", "zero") or self.projector not in ("auto", "sparse", "torch"):
            raise ValueError("start must be cgls, sirt or zero; projector auto, sparse or torch")
        if self.tv_weight < 0 or self.iterations < 0 or self.start_iterations < 0:
            raise ValueError("tv_weight, iterations and start_iterations must be >= 0")


@dataclass
class ViewFit:
    """The fitted grid and what it predicts."""

    grid_values: np.ndarray
    """``(n, n, planes)`` float32 intensities on ``grid``."""
    grid: OrbitGrid
    train: list[int]
    held_out: list[int]
    rendered: np.ndarray
    """``(len(held_out), H, W)`` float32: the fitted volume's DRRs of the held-out cameras."""
    history: list[dict]
    seconds: float


def orbit_frame_grid(cameras: list[Camera]) -> OrbitGrid:
    """The reconstruction grid in view 0's frame: ``W x W x H`` voxels of the isocentre pixel size, centred on the
    isocentre (for a parallel orbit, exactly :func:`orbit_grid`)."""
    grid = orbit_grid(cameras)
    if grid is not None:
        return grid
    c0 = cameras[0]
    p = c0.pose
    return OrbitGrid(
        center_mm=tuple(c0.isocenter_mm),
        e1=tuple(p[:3, 0]),
        e2=tuple(p[:3, 2]),
        down=tuple(p[:3, 1]),
        n=c0.width,
        planes=c0.height,
        pixel_mm=c0.pixel_mm,
    )


def make_projector(cameras: list[Camera], grid: OrbitGrid, kind: ProjectorKind = "auto"):
    """The sparse orbit projector when the cameras are a parallel orbit (or ``kind="sparse"``), else the torch one."""
    if kind == "torch" or (kind == "auto" and orbit_grid(cameras) is None):
        return TorchRayProjector(cameras, grid.shape, grid.affine)
    return OrbitProjector(cameras, grid)


def split(n_views: int, train_every: int) -> tuple[list[int], list[int]]:
    """Training views ``0, k, 2k, ...`` and the held-out rest."""
    train = list(range(0, n_views, train_every))
    return train, [k for k in range(n_views) if k % train_every]


def split_with_held_out(n_views: int, train_every: int) -> tuple[list[int], list[int]]:
    """:func:`split`, with a one-line error when no view is left to hold out."""
    train, held = split(n_views, train_every)
    if not held:
        raise SlicefieldError(
            f"{n_views} views with --train-every {train_every} leave none held out",
            fix="render more views or lower --train-every",
        )
    return train, held


def _tv(z: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of sqrt(|forward differences|^2 + eps^2) (replicated border) and its gradient."""
    d = [np.diff(z, axis=a, append=np.take(z, [-1], axis=a)) for a in range(3)]
    mag = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2 + TV_EPS**2)
    grad = np.zeros_like(z)
    for a in range(3):
        q = d[a] / mag
        grad -= q
        # The adjoint of the forward difference: q shifted by one along the axis, added back.
        sl = [slice(None)] * 3
        sl[a] = slice(1, None)
        src = [slice(None)] * 3
        src[a] = slice(0, -1)
        grad[tuple(sl)] += q[tuple(src)]
    return float(mag.sum()), grad


def _cgls(forward, adjoint, b: np.ndarray, x0: np.ndarray, iterations: int) -> np.ndarray:
    x = x0.copy()
    r = b - forward(x)
    s = adjoint(r)
    p = s.copy()
    gamma = float(np.vdot(s, s))
    for _ in range(iterations):
        q = forward(p)
        qq = float(np.vdot(q, q))
        if qq == 0 or gamma == 0:
            break
        alpha = gamma / qq
        x += alpha * p
        r -= alpha * q
        s = adjoint(r)
        new = float(np.vdot(s, s))
        p = s + (new / gamma) * p
        gamma = new
    return x


def _sirt(forward, adjoint, b: np.ndarray, x0: np.ndarray, iterations: int) -> np.ndarray:
    row = forward(np.ones_like(x0))
    col = adjoint(np.ones_like(b))
    rinv = np.where(row > 0, 1.0 / np.where(row > 0, row, 1.0), 0.0)
    cinv = np.where(col > 0, 1.0 / np.where(col > 0, col, 1.0), 0.0)
    x = x0.copy()
    for _ in range(iterations):
        x += cinv * adjoint(rinv * (b - forward(x)))
    return x


def _power_norm(forward, adjoint, shape, iterations: int = POWER_ITERATIONS) -> float:
    """Largest eigenvalue of ``adjoint(forward(.))`` (the squared operator norm) by power iteration."""
    x = np.random.default_rng(0).random(shape)
    lam = 1.0
    for _ in range(iterations):
        y = adjoint(forward(x))
        lam = float(np.linalg.norm(y))
        x = y / lam
    return lam


def support_mask(adjoint, b: np.ndarray) -> np.ndarray:
    """Voxels crossed by no ray whose value is 0 (space carving): outside it the object must be 0 when ``x >= 0``."""
    empty = (np.abs(b) <= EMPTY_RAY_FRACTION * np.abs(b).max()).astype(np.float64)
    return adjoint(empty) <= 0


def solve(
    projector, b: np.ndarray, config: ViewFitConfig, *, progress: Callable[[int, int], None] | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Minimise the module docstring's objective for views ``b`` ``(n_views, H, W)``; returns ``x`` (grid shape,
    intensities) and a history of ``{iteration, seconds, data, tv}``."""
    grid_shape = projector.shape
    b_scale = float(np.abs(b).max()) or 1.0
    n_px = float(np.prod(grid_shape)) ** (1.0 / 3.0)
    bs = b / b_scale
    # A z / (n pixel_mm) is O(b / b_scale) when z = x / x_scale, x_scale = b_scale / (n pixel_mm) (A is in mm).
    pixel_mm = getattr(getattr(projector, "grid", None), "pixel_mm", None)
    if pixel_mm is None:
        from ..geometry import voxel_spacing

        pixel_mm = float(voxel_spacing(projector.affine).min())
    k = 1.0 / (n_px * pixel_mm)

    def fwd(z: np.ndarray) -> np.ndarray:
        return k * projector.forward(z)

    def adj(y: np.ndarray) -> np.ndarray:
        return k * projector.adjoint(y)

    t0 = time.perf_counter()
    z = np.zeros(grid_shape)
    if config.start == "cgls" and config.start_iterations:
        z = _cgls(fwd, adj, bs, z, config.start_iterations)
    elif config.start == "sirt" and config.start_iterations:
        z = _sirt(fwd, adj, bs, z, config.start_iterations)
    history: list[dict] = [{"iteration": 0, "seconds": time.perf_counter() - t0, "stage": config.start}]
    if config.iterations:
        z = _fista(fwd, adj, bs, z, config, history=history, t0=t0, progress=progress)
    return (z * b_scale * k).astype(np.float32), history


def _fista(
    fwd,
    adj,
    bs,
    z0,
    config: ViewFitConfig,
    *,
    history: list[dict],
    t0: float,
    progress,
    support=None,
    penalty: Callable[[np.ndarray], tuple[float, np.ndarray]] | None = None,
    penalty_lipschitz: float = 0.0,
) -> np.ndarray:
    """Accelerated projected gradient (FISTA with gradient restart) on ``1/2 ||A z - b||^2 + tv_weight TV(z)``
    (``+ penalty(z)``: a callable returning its value and gradient, the gradient's Lipschitz constant being
    ``penalty_lipschitz``) over ``z >= 0`` and ``z = 0`` outside ``support`` (default: the carved support of
    ``adj``)."""
    n_vox = z0.size
    lam = config.tv_weight * n_vox ** (2.0 / 3.0)  # TV sums over n^3 voxels; keep the weight per unit area
    lip_data = POWER_SAFETY * _power_norm(fwd, adj, z0.shape)
    lip = lip_data + lam * TV_LIPSCHITZ / TV_EPS + penalty_lipschitz
    log.debug("FISTA: data Lipschitz %.3g, TV %.3g", lip_data, lam * TV_LIPSCHITZ / TV_EPS)
    tau = 1.0 / lip
    if support is None:
        support = support_mask(adj, bs)
    z = np.where(support, np.maximum(z0, 0.0), 0.0)
    y = z.copy()
    t = 1.0
    for it in range(1, config.iterations + 1):
        r = fwd(y) - bs
        grad = adj(r)
        tv = 0.0
        if lam:
            tv, g = _tv(y)
            grad += lam * g
        extra = {}
        if penalty is not None:
            value, g = penalty(y)
            grad += g
            extra["penalty"] = value
        z_new = np.where(support, np.maximum(y - tau * grad, 0.0), 0.0)
        # Restart the momentum when it points uphill (O'Donoghue and Candes 2015).
        if float(np.vdot(grad, z_new - z)) > 0:
            t = 1.0
        t_new = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = z_new + ((t - 1.0) / t_new) * (z_new - z)
        z, t = z_new, t_new
        data = 0.5 * float(np.vdot(r, r))
        history.append({"iteration": it, "seconds": time.perf_counter() - t0, "data": data, "tv": lam * tv, **extra})
        if progress is not None:
            progress(it, config.iterations)
        if config.time_budget_s is not None and time.perf_counter() - t0 > config.time_budget_s:
            break
    return z


def fit_views(
    views: Views, config: ViewFitConfig = ViewFitConfig(), *, progress: Callable[[int, int], None] | None = None
) -> ViewFit:
    """Fit the training views of ``views``, then render its held-out cameras from the fitted grid."""
    train, held = split_with_held_out(len(views.cameras), config.train_every)
    grid = orbit_frame_grid(views.cameras)
    t0 = time.perf_counter()
    projector = make_projector([views.cameras[k] for k in train], grid, config.projector)
    x, history = solve(projector, views.images[train].astype(np.float64), config, progress=progress)
    seconds = time.perf_counter() - t0
    held_projector = make_projector([views.cameras[k] for k in held], grid, config.projector)
    rendered = held_projector.forward(x.astype(np.float64)).astype(np.float32)
    return ViewFit(x, grid, train, held, rendered, history, seconds)


def view_metrics(reference: np.ndarray, rendered: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of one rendered view against the true one, data range = the true view's max - min."""
    rng = float(reference.max() - reference.min()) or 1.0
    return {
        "psnr": psnr(reference, rendered, data_range=rng),
        "ssim": ssim(reference, rendered, data_range=rng),
        "data_range": rng,
    }


def to_subject_grid(values: np.ndarray, grid_affine: np.ndarray, shape, affine: np.ndarray) -> Volume:
    """Resample grid values (voxel -> world ``grid_affine``) onto a subject grid (``shape``, ``affine``) by
    trilinear interpolation; 0 outside the fitted grid."""
    from scipy import ndimage

    from ..geometry import apply_affine

    m = np.linalg.inv(grid_affine) @ affine
    out = np.empty(tuple(shape), dtype=np.float32)
    ijk = np.indices(tuple(shape)[1:], dtype=np.float64).reshape(2, -1).T
    for i in range(shape[0]):
        pts = apply_affine(m, np.column_stack([np.full(len(ijk), i, dtype=np.float64), ijk]))
        out[i] = ndimage.map_coordinates(values, pts.T, order=1, mode="constant", cval=0.0).reshape(shape[1:])
    return Volume(out, np.asarray(affine, dtype=np.float64))
