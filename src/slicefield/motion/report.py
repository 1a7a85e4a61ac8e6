"""Motion outputs: per-slice transforms as JSON, and one figure of per-slice motion and excluded slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from ..runs import to_jsonable
from .svr import MotionResult
from .transforms import describe, slice_center


def motion_json(result: MotionResult, path: str | Path) -> Path:
    """Write :meth:`MotionResult.to_json` (frames stated inside) to ``path`` atomically; returns the path."""
    text = json.dumps(to_jsonable(result.to_json()), indent=1, allow_nan=False) + "\n"
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def motion_plot(result: MotionResult, path: str | Path, *, width_in: float = 9.0, dpi: int = 100) -> Path:
    """One PNG, a panel per stack: each slice's estimated motion against slice index.

    Motion of slice ``s`` = its world -> world correction ``T_s`` (corrected pose = ``T_s @`` header pose):
    rotation angle (degrees, left axis) and displacement of the slice centre (mm, right axis). Slices left out of
    the reconstruction (weight 0) are shaded red; flagged slices are circled; slices too empty to register are
    marked with grey ticks along the bottom.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.slices)
    fig = Figure(figsize=(width_in, 0.6 + 2.3 * n), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, m in zip(axes, result.slices, strict=True):
        center = slice_center(m.spacing, m.shape)
        info = [describe(t, h[:3, :3] @ center + h[:3, 3]) for t, h in zip(m.transforms, m.header_poses, strict=True)]
        idx = np.arange(len(info))
        rot = np.array([d["rotation_deg"] for d in info])
        disp = np.array([d["displacement_mm"] for d in info])
        for s in np.flatnonzero(m.weights == 0):
            ax.axvspan(s - 0.5, s + 0.5, color="red", alpha=0.2, lw=0)
        (l1,) = ax.plot(idx, rot, ".-", color="tab:blue", lw=1, ms=3, label="rotation (deg)")
        ax2 = ax.twinx()
        (l2,) = ax2.plot(idx, disp, ".-", color="tab:orange", lw=1, ms=3, label="displacement (mm)")
        if m.flagged:
            ax.plot(m.flagged, rot[m.flagged], "o", mfc="none", mec="red", ms=9, mew=1.5)
        empty = np.flatnonzero(~m.registered)
        if len(empty):
            ax.plot(empty, np.full(len(empty), 0.04), "|", color="grey", ms=10, transform=ax.get_xaxis_transform())
        excluded = int(np.sum(m.weights == 0))
        ax.set_title(f"{m.name}: {len(m.flagged)} flagged, {excluded} excluded", fontsize=9, loc="left")
        ax.set_ylabel("rotation (deg)", fontsize=8)
        ax2.set_ylabel("displacement (mm)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax2.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(handles=[l1, l2], fontsize=7, loc="upper right")
    axes[-1].set_xlabel("slice index", fontsize=8)
    fig.suptitle(
        f"slice motion (mode {result.config.mode}); red: excluded, circles: flagged, grey ticks: not registered",
        fontsize=9,
    )
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
