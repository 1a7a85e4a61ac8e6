"""Simulate -> reconstruct with every method -> evaluate, in one process, as one table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .acquisition.simulate import SimulationConfig, SimulationRecord, apply_simulation, sample_simulation
from .metrics import evaluate, foreground_mask
from .reconstruct import FIELD_METHODS, METHODS, ReconstructConfig, fit, reconstruct
from .runs import Timer
from .volume import Stack, Volume

log = logging.getLogger(__name__)

#: Columns of the benchmark table: (key, header, format).
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "{}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("psnr_masked", "PSNR brain dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("ssim_masked", "SSIM brain", "{:.4f}"),
    ("nrmse_masked", "NRMSE brain", "{:.4f}"),
    ("seconds", "wall s", "{:.1f}"),
    ("peak_rss_mb", "peak RAM MB", "{:.0f}"),
)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run in a benchmark."""

    methods: tuple[str, ...] = METHODS
    """Reconstruction methods, side by side."""
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    """How the stacks are acquired from the reference volume."""
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    """Per-method options (its ``method`` field is overridden for each row)."""


@dataclass
class BenchmarkResult:
    rows: list[dict]
    stacks: list[Stack]
    record: SimulationRecord
    outputs: dict[str, Volume]
    mask: np.ndarray
    simulate_seconds: float
    histories: dict[str, list[dict]] = field(default_factory=dict)
    """Field methods: the fit's loss per step (``FitResult.history``)."""


def run_benchmark(
    reference: Volume,
    *,
    config: BenchmarkConfig = BenchmarkConfig(),
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
) -> BenchmarkResult:
    """Simulate stacks from ``reference``, reconstruct them with each method on the reference grid, score each.

    progress: called with a step name; returns a ``(done, total)`` callback for that step (or None).
    Metrics use data range = reference max - min and the brain mask ``foreground_mask(reference)``
    unless the reference carries a mask.
    """
    with Timer() as sim_timer:
        record = sample_simulation(reference, config.simulation)
        cb = progress("simulate") if progress is not None else None
        n = len(record.stacks)
        stacks = apply_simulation(reference, record, progress=None if cb is None else lambda k: cb(k + 1, n))
    mask = reference.mask if reference.mask is not None else foreground_mask(reference.data)
    grid = Volume(np.zeros(reference.shape, np.float32), reference.affine)
    rows, outputs, histories = [], {}, {}
    for method in config.methods:
        cfg = replace(config.reconstruct, method=method)
        cb = progress(method) if progress is not None else None
        with Timer() as timer:
            if method in FIELD_METHODS:
                fitted = fit(stacks, grid, config=cfg, progress=cb)
                out, histories[method] = fitted.volume, list(fitted.history)
            else:
                out = reconstruct(stacks, grid, config=cfg, progress=cb)
        metrics = evaluate(reference.data, out.data, mask=mask)
        row = {"method": method, **metrics, "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb}
        log.debug("%s: %s", method, row)
        rows.append(row)
        outputs[method] = out
    return BenchmarkResult(rows, stacks, record, outputs, mask, sim_timer.seconds, histories)


def format_table(rows: list[dict]) -> str:
    """The benchmark rows as a Markdown table (one line per method)."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _, _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = ["-" if r.get(k) is None else f.format(r[k]) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
