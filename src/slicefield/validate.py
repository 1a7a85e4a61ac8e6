"""Evidence without ground truth: cross-validation through the acquisition model, and per-slice residuals.

**Leave one stack out** (3 or more stacks): for each method and each stack ``k``, reconstruct from every other
stack with exactly the call ``slicefield reconstruct`` makes (:func:`~slicefield.reconstruct.reconstruct`), then
predict stack ``k`` through its own acquisition model (same pose, PSF and thickness:
``StackOperator(stack_k, grid.shape, grid.affine).forward(recon)``) and score the prediction against the
measured slices. A method that predicts slices it never saw explains the anatomy rather than the noise.

**Leave one slice group out** (1 or 2 stacks, or asked for): fold ``(s, g)`` holds out the slices ``i`` of
stack ``s`` with ``i % k == g`` and reconstructs from every other stack plus the remaining slice groups of stack
``s`` (each kept as its own regular sub-stack, so grid-based methods such as B-spline still apply). With a single
stack this checks through-plane interpolation: the held-out slices lie between the slices the fold keeps, so the
fold's data are sparser (k times the slice spacing) than the product's reconstruction sees.

Scores are taken on the held-out slice values ``(n, ni, nj)``: PSNR and NRMSE (euclidean) over all pixels and
over the held-out values' automatic foreground (:func:`~slicefield.metrics.foreground_mask`), SSIM per slice in
2D (Gaussian window) averaged over the same pixels; data range = the held-out values' max - min.

**Ties**: the ranking says how clearly each method beats the next one (mean paired difference of held-out PSNR
over folds); a lead below :data:`TIE_DB` or not won in every fold is reported as a tie, because such small leads
were not reliable on simulated cases where the truth is known.

**Residuals** (:func:`slice_residuals`): ``forward(volume) - stack.data`` for every input slice, its RMS per
slice and a robust z-score of that RMS within each stack (median / MAD, Iglewicz & Hoaglin); slices above
``outlier_z`` are flagged as far out of line (motion, artefact, wrong geometry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .acquisition.operator import StackOperator
from .baselines.grid import joint_grid
from .errors import SlicefieldError
from .metrics import foreground_mask, nrmse, psnr, ssim_map, ssim_window_size
from .reconstruct import ALL_METHODS, ReconstructConfig, reconstruct
from .runs import Timer
from .volume import Stack, Volume

log = logging.getLogger(__name__)

ValidationMode = Literal["auto", "stacks", "slices"]
#: ``step(name)`` -> a ``(done, total)`` callback for that step, or None (as in ``run_benchmark``).
StepsFn = Callable[[str], Callable[[int, int], None] | None]

#: Fewest stacks for leave-one-stack-out under ``mode="auto"``; with fewer, slice groups are held out instead.
MIN_STACKS_LEAVE_ONE_OUT = 3
#: Fewest stacks for any validation: one stack is validated by holding out slice groups.
MIN_STACKS = 1
#: Fewest stacks for leave-one-stack-out asked for explicitly (one stack is predicted from the others).
MIN_STACKS_STACKS_MODE = 2
#: Phi^-1(0.75): scales the median absolute deviation to a standard deviation for Gaussian data (the 0.6745 of
#: Iglewicz & Hoaglin's modified z-score, ``z = 0.6745 (x - median) / MAD``).
MAD_TO_SIGMA = 0.6745
#: sqrt(pi / 2): mean absolute deviation -> standard deviation for Gaussian data (used when the MAD is 0).
MEANAD_TO_SIGMA = 1.2533
#: Modified z-score above which a slice's RMS residual is flagged (Iglewicz & Hoaglin's recommended cut).
OUTLIER_Z = 3.5
#: Floor of the z-score's scale, as a fraction of the median: residuals dominated by noise have a tiny MAD, and a
#: slice within 3.5 x 5 % = 17.5 % of its stack's median RMS is not "far out of line".
RELATIVE_SCALE_FLOOR = 0.05
#: Fewest slices in a stack for a robust z-score; smaller stacks get z = 0 and no flags.
MIN_SLICES_FOR_Z = 3

#: Leads (mean paired held-out PSNR difference to the next-ranked method) below this are reported as ties: on five
#: simulated cases (``benchmarks/VALIDATION.md``) srr and inr were within 0.23 dB on held-out slices while their
#: true gap ran from +0.36 to -1.78 dB, both ways (thick held-out slices do not see detail finer than their profile,
#: and the slice noise hides the rest); every lead that mattered there (over bspline) was 2 dB or more.
TIE_DB = 0.25

#: Columns of the ranked table: (key of a summary row, header).
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("rank", "rank"),
    ("method", "method"),
    ("psnr_masked", "held-out PSNR brain dB"),
    ("ssim_masked", "SSIM brain"),
    ("nrmse_masked", "NRMSE brain"),
    ("wins", "folds won"),
    ("lead_db", "lead over next dB"),
    ("seconds", "wall s"),
)


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ResidualConfig:
    """How per-slice residuals are summarised."""

    outlier_z: float = OUTLIER_Z
    """Flag a slice when the robust z-score of its RMS residual (within its stack) exceeds this."""


@dataclass(frozen=True)
class ValidateConfig:
    """Options of :func:`leave_one_out`."""

    mode: ValidationMode = "auto"
    """auto: leave one stack out with 3 or more stacks, else leave one slice group out; stacks; slices."""
    slice_groups: int = 2
    """slices mode: k; fold (s, g) holds out the slices i of stack s with i % k == g (k folds per stack)."""
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    """Options of every reconstruction, as ``slicefield reconstruct`` builds them (``method`` is set per method).
    On a CPU, e.g. ``replace(ReconstructConfig().inr, steps=50)`` keeps the inr method's folds short."""
    tie_db: float = TIE_DB
    """A method's lead over the next-ranked one is called a tie when its mean paired held-out PSNR difference is
    below this many dB, or when it does not win every fold."""
    residuals: bool = True
    """Also reconstruct from all stacks with each method and compute its per-slice residuals."""
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    """How residuals are summarised and flagged."""


# ----------------------------------------------------------------------------------------------- folds
@dataclass
class Fold:
    """One held-out set: the slices ``slices`` of input stack ``stack_index``, predicted from ``train``."""

    index: int
    name: str
    held_out: Stack
    """The held-out slices as a stack (same poses, PSF, thickness as in the input)."""
    stack_index: int
    slices: np.ndarray
    """``(m,)`` indices of the held-out slices in input stack ``stack_index``."""
    train: list[Stack]
    """What the fold's reconstruction sees: never a held-out slice."""

    def describe(self) -> dict[str, Any]:
        return {
            "fold": self.index,
            "name": self.name,
            "stack": self.stack_index,
            "slices": [int(s) for s in self.slices],
            "train": [s.name for s in self.train],
        }


def select_slices(stack: Stack, indices: Sequence[int] | np.ndarray, *, name: str | None = None) -> Stack:
    """The slices ``indices`` of ``stack`` as a stack of their own (data, poses and mask subset; same PSF)."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        raise SlicefieldError(f"no slices selected from stack {stack.name!r}", fix="select at least one slice")
    return replace(
        stack,
        data=stack.data[idx],
        slice_to_world=stack.slice_to_world[idx],
        mask=None if stack.mask is None else stack.mask[idx],
        name=stack.name if name is None else name,
        meta={**stack.meta, "slices_of": stack.name, "slices": idx.tolist()},
    )


def resolve_mode(n_stacks: int, mode: ValidationMode) -> Literal["stacks", "slices"]:
    """The validation scheme for ``n_stacks`` stacks; raises SlicefieldError when it cannot be validated."""
    if n_stacks < MIN_STACKS:
        raise SlicefieldError("validation needs at least one stack, got none", fix="pass the stacks of one subject")
    if mode == "auto":
        return "stacks" if n_stacks >= MIN_STACKS_LEAVE_ONE_OUT else "slices"
    if mode not in ("stacks", "slices"):
        raise SlicefieldError(f"unknown validation mode {mode!r}", fix="use auto, stacks or slices")
    if mode == "stacks" and n_stacks < MIN_STACKS_STACKS_MODE:
        raise SlicefieldError(
            f"leave one stack out needs at least {MIN_STACKS_STACKS_MODE} stacks, got {n_stacks}: the held-out "
            "stack is predicted from the others",
            fix="pass more stacks, or use --mode slices (hold out every k-th slice)",
        )
    return mode


def make_folds(stacks: list[Stack], *, mode: ValidationMode = "auto", slice_groups: int = 2) -> list[Fold]:
    """The folds of leave-one-stack-out (one per stack) or leave-one-slice-group-out (``slice_groups`` per stack)."""
    scheme = resolve_mode(len(stacks), mode)
    if scheme == "stacks":
        return [
            Fold(k, s.name, s, k, np.arange(s.n_slices), [t for j, t in enumerate(stacks) if j != k])
            for k, s in enumerate(stacks)
        ]
    k = int(slice_groups)
    if k < 2:
        raise SlicefieldError(f"slice groups must be at least 2, got {k}", fix="pass e.g. --slice-groups 2")
    folds: list[Fold] = []
    for s, stack in enumerate(stacks):
        if stack.n_slices < k:
            raise SlicefieldError(
                f"stack {stack.name!r} has {stack.n_slices} slices, fewer than {k} slice groups",
                fix="pass fewer --slice-groups",
            )
        for g in range(k):
            held = np.arange(g, stack.n_slices, k)
            rest = [
                select_slices(stack, np.arange(r, stack.n_slices, k), name=f"{stack.name}[{r}::{k}]") for r in range(k)
            ]
            train = [t for j, t in enumerate(stacks) if j != s] + [sub for r, sub in enumerate(rest) if r != g]
            name = f"{stack.name}[{g}::{k}]"
            folds.append(Fold(len(folds), name, select_slices(stack, held, name=name), s, held, train))
    return folds


# ----------------------------------------------------------------------------------------------- scoring
def score_prediction(measured: np.ndarray, predicted: np.ndarray, *, mask: np.ndarray | None = None) -> dict:
    """Scores of predicted slice values against measured ones, both ``(n, ni, nj)`` in the stack's units.

    mask: bool ``(n, ni, nj)`` pixels to score for the ``*_masked`` keys; default ``foreground_mask(measured)``.
    Data range = ``measured.max() - measured.min()``. SSIM is computed per slice in 2D (slices are too far apart
    for a 3D window) and averaged over the in-plane interior (``ssim``) or the mask (``ssim_masked``); it is None
    when a slice is smaller than the SSIM window. Keys: psnr, psnr_masked (dB), ssim, ssim_masked, nrmse,
    nrmse_masked (euclidean), data_range, masked_pixels.
    """
    measured = np.asarray(measured, dtype=np.float32)
    predicted = np.asarray(predicted, dtype=np.float32)
    if measured.shape != predicted.shape or measured.ndim != 3:
        raise ValueError(f"need two (n, ni, nj) arrays of one shape, got {measured.shape} and {predicted.shape}")
    data_range = float(measured.max()) - float(measured.min())
    if not data_range > 0:
        raise SlicefieldError("held-out slices are constant: nothing to score", fix="check the stack's values")
    if mask is None:
        mask = foreground_mask(measured)
    mask = np.asarray(mask, dtype=bool)
    out: dict[str, Any] = {
        "psnr": psnr(measured, predicted, data_range=data_range),
        "ssim": None,
        "nrmse": nrmse(measured, predicted),
        "psnr_masked": None,
        "ssim_masked": None,
        "nrmse_masked": None,
        "data_range": data_range,
        "masked_pixels": int(mask.sum()),
    }
    win = ssim_window_size()
    if min(measured.shape[1:]) >= win:
        smap = np.stack([ssim_map(m, p, data_range=data_range) for m, p in zip(measured, predicted, strict=True)])
        pad = (win - 1) // 2
        out["ssim"] = float(smap[:, pad:-pad, pad:-pad].mean(dtype=np.float64))
        if mask.any():
            out["ssim_masked"] = float(smap[mask].mean(dtype=np.float64))
    if mask.any():
        out["psnr_masked"] = psnr(measured, predicted, data_range=data_range, mask=mask)
        out["nrmse_masked"] = nrmse(measured, predicted, mask=mask)
    return out


# ----------------------------------------------------------------------------------------------- residuals
def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores ``(x - median) / scale`` of ``(n,)`` non-negative values (Iglewicz & Hoaglin 1993).

    scale = ``max(MAD / 0.6745, RELATIVE_SCALE_FLOOR * median)``; when the MAD is 0 the scaled mean absolute
    deviation stands in for it. Every score is 0 when the scale is 0 or there are fewer than MIN_SLICES_FOR_Z values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < MIN_SLICES_FOR_Z:
        return np.zeros_like(x)
    med = float(np.median(x))
    dev = x - med
    mad = float(np.median(np.abs(dev)))
    spread = mad / MAD_TO_SIGMA if mad > 0 else MEANAD_TO_SIGMA * float(np.mean(np.abs(dev)))
    scale = max(spread, RELATIVE_SCALE_FLOOR * abs(med))
    return dev / scale if scale > 0 else np.zeros_like(x)


@dataclass
class StackResiduals:
    """Data-consistency error of a volume against one stack's slices."""

    name: str
    residual: np.ndarray
    """``(n, ni, nj)`` float32: predicted minus measured slice values (stack units)."""
    rms: np.ndarray
    """``(n,)`` RMS of the residual per slice (over the stack's mask when it has one)."""
    z: np.ndarray
    """``(n,)`` robust z-score of ``rms`` within this stack."""
    flagged: list[int]
    """Slices with ``z > outlier_z``, far out of line with the rest of the stack."""
    affine: np.ndarray | None
    """The stack's nominal ``(i, j, slice)`` -> world mm RAS affine, None if its slices are not a regular grid."""

    def to_volume(self) -> Volume:
        """The residual as a Volume with axes ``(i, j, slice)`` on the stack's own nominal grid."""
        if self.affine is None:
            raise SlicefieldError(
                f"stack {self.name!r} is not a regular grid of slices: its residual has no single affine",
                fix="use the per-slice values (residual array) instead",
            )
        return Volume(np.moveaxis(self.residual, 0, -1), self.affine)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rms": self.rms.tolist(),
            "z": self.z.tolist(),
            "flagged": self.flagged,
            "median_rms": float(np.median(self.rms)),
        }


@dataclass
class ResidualReport:
    """Per-slice residuals of one volume against every input stack."""

    stacks: list[StackResiduals]
    outlier_z: float

    @property
    def flagged(self) -> list[tuple[str, int]]:
        """``(stack name, slice index)`` of every flagged slice."""
        return [(s.name, i) for s in self.stacks for i in s.flagged]

    def to_json(self) -> dict[str, Any]:
        return {
            "outlier_z": self.outlier_z,
            "flagged": [{"stack": n, "slice": i} for n, i in self.flagged],
            "stacks": [s.to_json() for s in self.stacks],
        }


def slice_residuals(
    stacks: list[Stack],
    volume: Volume,
    *,
    config: ResidualConfig = ResidualConfig(),
    operators: Sequence[StackOperator] | None = None,
) -> ResidualReport:
    """``forward(volume) - stack.data`` for every slice of every stack, with per-slice RMS and outlier flags.

    volume: a reconstruction (any grid; voxel -> world mm RAS). operators: optional prebuilt
    ``StackOperator(stack, volume.shape, volume.affine)`` per stack (built here otherwise).
    The robust z-score is taken within each stack, so a stack whose every slice fits worse than another stack's
    is not flagged; one slice out of line with its own stack is.
    """
    if operators is not None and len(operators) != len(stacks):
        raise ValueError(f"{len(operators)} operators for {len(stacks)} stacks")
    out = []
    for k, stack in enumerate(stacks):
        op = operators[k] if operators is not None else StackOperator(stack, volume.shape, volume.affine)
        residual = op.forward(volume.data) - stack.data
        sq = residual.astype(np.float64) ** 2
        if stack.mask is not None:
            m = stack.mask.astype(bool)
            rms = np.sqrt((sq * m).sum(axis=(1, 2)) / np.maximum(m.sum(axis=(1, 2)), 1))
        else:
            rms = np.sqrt(sq.mean(axis=(1, 2)))
        z = robust_z(rms)
        try:
            affine: np.ndarray | None = stack.nominal_affine()
        except SlicefieldError:
            affine = None
        flagged = [int(i) for i in np.flatnonzero(z > config.outlier_z)]
        out.append(StackResiduals(stack.name, residual.astype(np.float32), rms, z, flagged, affine))
    return ResidualReport(out, config.outlier_z)


# ----------------------------------------------------------------------------------------------- validation
@dataclass
class ValidationResult:
    """What :func:`leave_one_out` measured."""

    mode: Literal["stacks", "slices"]
    folds: list[Fold]
    scores: list[dict[str, Any]]
    """One row per (method, fold): method, fold, held_out, plus the keys of :func:`score_prediction`."""
    summary: list[dict[str, Any]]
    """One row per method, best first: rank, method, ``<metric>`` means and ``<metric>_sd`` spreads over folds,
    wins (folds where its held-out PSNR brain is the best), lead_db / lead_db_sd / lead_folds (paired per-fold
    held-out PSNR brain difference to the next-ranked method: mean, sd, folds it is ahead), tie (the lead is below
    ``ValidateConfig.tie_db`` or not won in every fold; None for the last), seconds, peak_rss_mb."""
    grid: Volume
    residuals: dict[str, ResidualReport] = field(default_factory=dict)
    """Per method: residuals of its reconstruction from all stacks (when ``config.residuals``)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per method: wall seconds of its folds (+ its residual reconstruction)."""

    def to_json(self) -> dict[str, Any]:
        """Everything but arrays: mode, folds, per-fold scores, ranked summary, residual flags, grid."""
        return {
            "mode": self.mode,
            "folds": [f.describe() for f in self.folds],
            "scores": self.scores,
            "summary": self.summary,
            "ranking": [r["method"] for r in self.summary],
            "residuals": {m: r.to_json() for m, r in self.residuals.items()},
            "grid": {"shape": list(self.grid.shape), "affine": self.grid.affine.tolist()},
        }


SUMMARY_METRICS = ("psnr_masked", "ssim_masked", "nrmse_masked", "psnr", "ssim", "nrmse")


def _summarise(
    methods: Sequence[str], scores: list[dict], seconds: dict, rss: dict, *, tie_db: float = TIE_DB
) -> list[dict]:
    by_fold: dict[int, dict[str, float]] = {}
    for r in scores:
        if r["psnr_masked"] is not None:
            by_fold.setdefault(r["fold"], {})[r["method"]] = r["psnr_masked"]
    rows = []
    for m in methods:
        mine = [r for r in scores if r["method"] == m]
        row: dict[str, Any] = {"method": m, "folds": len(mine)}
        for key in SUMMARY_METRICS:
            vals = np.array([r[key] for r in mine if r[key] is not None], dtype=np.float64)
            row[key] = float(vals.mean()) if vals.size else None
            row[f"{key}_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else (0.0 if vals.size else None)
        row["wins"] = sum(1 for f in by_fold.values() if m in f and f[m] == max(f.values()))
        row["seconds"] = seconds.get(m)
        row["peak_rss_mb"] = rss.get(m)
        rows.append(row)
    rows.sort(key=lambda r: -np.inf if r["psnr_masked"] is None else r["psnr_masked"], reverse=True)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
        r.update(_lead(r["method"], rows[i + 1]["method"] if i + 1 < len(rows) else None, by_fold, tie_db))
    return rows


def _lead(method: str, runner_up: str | None, by_fold: dict[int, dict[str, float]], tie_db: float) -> dict:
    """How clearly ``method`` beats the next-ranked one: paired per-fold held-out PSNR brain differences (dB)."""
    pairs = (
        []
        if runner_up is None
        else [(f[method], f[runner_up]) for f in by_fold.values() if method in f and runner_up in f]
    )
    if not pairs:
        return {"lead_db": None, "lead_db_sd": None, "lead_folds": None, "tie": None}
    d = np.array([a - b for a, b in pairs])
    lead = float(d.mean())
    return {
        "lead_db": lead,
        "lead_db_sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
        "lead_folds": int(np.sum(d > 0)),
        "tie": bool(lead < tie_db or np.any(d <= 0)),
    }


def default_grid(stacks: list[Stack]) -> Volume:
    """``joint_grid`` of the stacks at their smallest in-plane spacing (what ``slicefield reconstruct`` uses)."""
    return joint_grid(stacks, resolution=min(min(s.spacing) for s in stacks))


def leave_one_out(
    stacks: list[Stack],
    *,
    methods: Sequence[str],
    grid: Volume | None = None,
    config: ValidateConfig = ValidateConfig(),
    progress: StepsFn | None = None,
) -> ValidationResult:
    """Cross-validate reconstruction ``methods`` on ``stacks`` through the acquisition model; see module docstring.

    grid: the reconstruction grid (shape and voxel -> world mm RAS affine), one for every fold; default
    :func:`default_grid`. progress: ``step(name)`` -> ``(done, total)`` callback, one step per method.
    Raises SlicefieldError for fewer than 2 stacks, an unknown method, or a bad ``config``.
    """
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise SlicefieldError("no methods to validate", fix=f"pass some of {', '.join(ALL_METHODS)}")
    for m in methods:
        if m not in ALL_METHODS:
            raise SlicefieldError(f"unknown method {m!r}", fix=f"use some of {', '.join(ALL_METHODS)}")
    scheme = resolve_mode(len(stacks), config.mode)
    folds = make_folds(stacks, mode=scheme, slice_groups=config.slice_groups)
    if len(stacks) == 1:
        log.warning(
            "one stack: each fold predicts held-out slices from slices %d times as far apart as the stack's, so the "
            "ranking measures filling wide gaps, not the reconstruction from all slices (on three simulated cases it "
            "put bspline first or tied first while srr was 3.4-4.1 dB better; benchmarks/VALIDATION.md); add a "
            "stack in another orientation for a ranking to trust",
            config.slice_groups,
        )
    grid = default_grid(stacks) if grid is None else grid
    operators: dict[int, StackOperator] = {}  # per fold, shared by the methods
    full_ops: list[StackOperator] | None = None
    scores: list[dict[str, Any]] = []
    residuals: dict[str, ResidualReport] = {}
    seconds: dict[str, float] = {}
    rss: dict[str, float] = {}
    for method in methods:
        rcfg = replace(config.reconstruct, method=method)
        cb = progress(method) if progress is not None else None
        total = len(folds) + int(config.residuals)
        with Timer() as timer:
            for fold in folds:
                recon = reconstruct(fold.train, grid, config=rcfg)
                if fold.index not in operators:
                    operators[fold.index] = StackOperator(fold.held_out, grid.shape, grid.affine)
                predicted = operators[fold.index].forward(recon.data)
                row = {"method": method, "fold": fold.index, "held_out": fold.name}
                row.update(score_prediction(fold.held_out.data, predicted, mask=_score_mask(fold.held_out)))
                log.debug("%s fold %d (%s): %s", method, fold.index, fold.name, row)
                scores.append(row)
                if cb is not None:
                    cb(fold.index + 1, total)
            if config.residuals:
                full = reconstruct(stacks, grid, config=rcfg)
                if full_ops is None:
                    full_ops = [StackOperator(s, grid.shape, grid.affine) for s in stacks]
                residuals[method] = slice_residuals(stacks, full, config=config.residual, operators=full_ops)
                if cb is not None:
                    cb(total, total)
        seconds[method] = timer.seconds
        rss[method] = timer.peak_rss_mb
    return ValidationResult(
        mode=scheme,
        folds=folds,
        scores=scores,
        summary=_summarise(methods, scores, seconds, rss, tie_db=config.tie_db),
        grid=Volume(np.zeros(grid.shape, np.float32), grid.affine),
        residuals=residuals,
        seconds=seconds,
    )


def _score_mask(stack: Stack) -> np.ndarray:
    """Pixels scored as foreground: the automatic mask of the values, within the stack's own mask if any."""
    m = foreground_mask(stack.data)
    return m if stack.mask is None else m & stack.mask.astype(bool)


# ----------------------------------------------------------------------------------------------- outputs
def _pm(mean: float | None, sd: float | None, fmt: str) -> str:
    if mean is None:
        return "-"
    return f"{mean:{fmt}} ± {sd:{fmt}}" if sd is not None else f"{mean:{fmt}}"


def _lead_cell(row: dict) -> str:
    if row.get("lead_db") is None:
        return "-"
    cell = f"{row['lead_db']:+.2f} ({row['lead_folds']}/{row['folds']} folds)"
    return f"{cell}, tie" if row["tie"] else cell


def format_table(result: ValidationResult) -> str:
    """The ranked summary as a Markdown table: mean ± sample standard deviation over folds."""
    what = "leave one stack out" if result.mode == "stacks" else "leave one slice group out"
    head = "| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _ in TABLE_COLUMNS) + "|"
    lines = [head, sep]
    for r in result.summary:
        cells = [
            str(r["rank"]),
            r["method"],
            _pm(r["psnr_masked"], r["psnr_masked_sd"], ".2f"),
            _pm(r["ssim_masked"], r["ssim_masked_sd"], ".4f"),
            _pm(r["nrmse_masked"], r["nrmse_masked_sd"], ".4f"),
            f"{r['wins']}/{r['folds']}",
            _lead_cell(r),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n{what}, {len(result.folds)} folds; mean ± sd over folds; brain = held-out foreground; lead = mean paired "
        "difference to the next method over folds (tie: below the tie threshold or not won in every fold)"
    )
    return "\n".join(lines)


def report_rows(result: ValidationResult) -> list[dict[str, Any]]:
    """Summary rows in the benchmark table's keys (for :func:`slicefield.report.write_report`): held-out means."""
    keys = ("psnr", "psnr_masked", "ssim", "ssim_masked", "nrmse_masked", "lead_db", "tie", "seconds", "peak_rss_mb")
    yes_no = {True: "yes", False: "no", None: None}
    return [{"method": r["method"], **{k: r.get(k) for k in keys}, "tie": yes_no[r.get("tie")]} for r in result.summary]


#: Caption of the report's table (HTML) for a validation run.
VALIDATION_CAPTION = (
    "Scores of each method's prediction of slices it did not see (mean over folds, ranked by held-out PSNR brain): "
    "PSNR/SSIM/NRMSE of the predicted against the measured held-out slices; <em>brain</em> = the automatic "
    "foreground of the held-out slice values; data range = their max - min; SSIM per 2D slice. Wall seconds "
    "(all folds and the residual reconstruction) and peak resident memory per method. Per-fold scores and "
    "flagged slices are in metrics.json."
)


def save_validation(result: ValidationResult, run: Any) -> dict[str, Path]:
    """Write a validation into a :class:`~slicefield.runs.RunDir`: metrics.json (per-fold scores, ranked
    summary, ``rows`` for the report, residual flags), timings.json, ``residuals/<method>/<stack>.nii.gz`` and
    ``figures/residuals.png``. Returns the written paths by name."""
    from .figures import slice_residual_plot
    from .io import save_volume

    written: dict[str, Path] = {}
    run.update_metrics({**result.to_json(), "rows": report_rows(result)})
    written["metrics"] = run.path / "metrics.json"
    for method, sec in result.seconds.items():
        run.record_timing(f"validate/{method}", sec)
    written["timings"] = run.path / "timings.json"
    for method, rep in result.residuals.items():
        for s in rep.stacks:
            if s.affine is None:
                log.warning("residual of %s not written: its slices are not a regular grid", s.name)
                continue
            path = run.path / "residuals" / method / f"{_safe(s.name)}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            written[f"residuals/{method}/{s.name}"] = save_volume(s.to_volume(), path)
    if result.residuals:
        series = {m: {s.name: s.rms for s in rep.stacks} for m, rep in result.residuals.items()}
        flags = {m: {s.name: s.flagged for s in rep.stacks} for m, rep in result.residuals.items()}
        written["figure"] = slice_residual_plot(
            series, run.figures / "residuals.png", flagged=flags, title="RMS residual per slice (all stacks)"
        )
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
