"""Figures for run directories: orthogonal planes through one world point (full and zoomed), difference maps,
intensity profiles along lines, loss curves, per-slice residual and motion plots.

Display convention (every figure): **neurological**, stated in each panel's lower corners.

- axial (plane z = const): patient left on image left, right on image right; anterior up.
- coronal (y = const): left on image left, right on image right; superior up.
- sagittal (x = const): posterior on image left, anterior on image right; superior up.

Each volume is sampled (linear interpolation, in world mm RAS) onto one RAS-aligned display grid covering the
reference volume, so the result does not depend on the volume's array axis order or on its affine's
flips, and every panel has the same scale in pixels per mm. Points outside a volume are NaN (drawn black in
slices, grey in difference maps).

matplotlib is imported inside the plotting functions (Agg canvas, no pyplot state), so importing this module
stays light. All PNGs are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .geometry import voxel_spacing, world_to_voxel
from .io.atomic import atomic_write
from .volume import Volume

PLANES = ("axial", "coronal", "sagittal")
#: Default intensity window: these percentiles of the reference's voxel values.
WINDOW_PERCENTILES = (1.0, 99.5)
#: Default colour-scale top of difference maps: this percentile of the displayed differences.
DIFF_PERCENTILE = 99.5
#: Most display pixels along one world axis; the default pixel size grows to respect it.
MAX_DISPLAY_PIXELS = 384
#: Zoomed crops: side of the cube as a fraction of the reference's largest world extent.
CROP_FRACTION = 0.3
#: Zoomed crops: display pixels per smallest voxel side (finer than the full view, so single voxels show).
CROP_UPSAMPLING = 2
#: (left, right, bottom-corner letters) of each plane, neurological convention.
_CORNER_LETTERS = {"axial": ("L", "R"), "coronal": ("L", "R"), "sagittal": ("P", "A")}


@dataclass(frozen=True)
class DisplayGrid:
    """An axis-aligned world grid: pixel centres at ``lo + (k + 0.5) * pixel_mm`` along each world axis.

    lo: ``(3,)`` world mm RAS of the grid's lower corner; shape: pixels along x, y, z; pixel_mm: isotropic size.
    """

    lo: np.ndarray
    shape: tuple[int, int, int]
    pixel_mm: float

    def axis(self, a: int) -> np.ndarray:
        """World coordinates (mm) of the pixel centres along world axis ``a`` (0 = x, 1 = y, 2 = z), ascending."""
        return self.lo[a] + (np.arange(self.shape[a]) + 0.5) * self.pixel_mm

    @property
    def extent_mm(self) -> np.ndarray:
        return np.array(self.shape) * self.pixel_mm

    @classmethod
    def covering(cls, volume: Volume, *, pixel_mm: float | None = None) -> DisplayGrid:
        """The grid covering ``volume``'s voxels (edges included); pixel default: its smallest voxel size,
        enlarged so no axis has more than MAX_DISPLAY_PIXELS pixels."""
        return cls.covering_grid(volume.shape, volume.affine, pixel_mm=pixel_mm)

    @classmethod
    def covering_grid(cls, shape: Sequence[int], affine: np.ndarray, *, pixel_mm: float | None = None) -> DisplayGrid:
        """:meth:`covering` for a voxel grid given by its ``shape`` and ``(4, 4)`` voxel -> world mm RAS affine."""
        n = np.array(shape[:3], dtype=float)
        affine = np.asarray(affine, dtype=np.float64)
        corners = np.array(
            [[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)]
        )
        world = corners @ affine[:3, :3].T + affine[:3, 3]
        lo, hi = world.min(axis=0), world.max(axis=0)
        if pixel_mm is None:
            pixel_mm = max(float(voxel_spacing(affine).min()), float((hi - lo).max()) / MAX_DISPLAY_PIXELS)
        if pixel_mm <= 0:
            raise ValueError(f"pixel_mm must be > 0, got {pixel_mm}")
        shape = tuple(int(max(1, round(float(e) / pixel_mm))) for e in hi - lo)
        return cls(lo=lo, shape=shape, pixel_mm=float(pixel_mm))  # type: ignore[arg-type]


def sample_world(volume: Volume, xyz: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` at world points ``xyz`` ``(..., 3)`` mm RAS; NaN outside its voxels.

    Returns float32 of shape ``xyz.shape[:-1]``."""
    ijk = world_to_voxel(volume.affine, xyz)
    flat = ijk.reshape(-1, 3).T
    out = ndimage.map_coordinates(volume.data, flat, order=1, mode="nearest")
    n = np.array(volume.shape)[:, None]
    outside = np.any((flat < -0.5 - 1e-6) | (flat > n - 0.5 + 1e-6), axis=0)
    out = np.where(outside, np.nan, out)
    return out.reshape(xyz.shape[:-1]).astype(np.float32)


def orthogonal_planes(
    volume: Volume, center_mm: np.ndarray, *, grid: DisplayGrid
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axial, coronal and sagittal planes through world point ``center_mm`` ``(3,)`` mm RAS, ready to show.

    Returns 2D float32 arrays ``(rows, cols)`` for ``imshow(origin="upper")`` in the neurological convention
    (module docstring): axial ``(ny, nx)`` rows anterior -> posterior, cols left -> right (x ascending);
    coronal ``(nz, nx)`` rows superior -> inferior; sagittal ``(nz, ny)`` cols posterior -> anterior.
    """
    c = np.asarray(center_mm, dtype=np.float64)
    x, y, z = grid.axis(0), grid.axis(1), grid.axis(2)

    def plane(rows: np.ndarray, cols: np.ndarray, row_axis: int, col_axis: int) -> np.ndarray:
        pts = np.broadcast_to(c, (len(rows), len(cols), 3)).copy()
        pts[..., row_axis] = rows[:, None]
        pts[..., col_axis] = cols[None, :]
        return sample_world(volume, pts)

    axial = plane(y[::-1], x, 1, 0)
    coronal = plane(z[::-1], x, 2, 0)
    sagittal = plane(z[::-1], y, 2, 1)
    return axial, coronal, sagittal


def center_of_mass_mm(volume: Volume) -> np.ndarray:
    """Intensity-weighted centre (negative values count as 0) in world mm RAS ``(3,)``; the grid centre if empty."""
    w = np.clip(np.nan_to_num(volume.data), 0, None)
    ijk = np.array(ndimage.center_of_mass(w)) if w.sum() > 0 else (np.array(volume.shape) - 1) / 2
    return ijk @ volume.affine[:3, :3].T + volume.affine[:3, 3]


def _prepare(
    volumes: Mapping[str, Volume],
    reference: str | None,
    center_mm: Any,
    pixel_mm: float | None,
    grid: DisplayGrid | None = None,
) -> tuple[Volume, np.ndarray, DisplayGrid]:
    if not volumes:
        raise ValueError("no volumes to show")
    if reference is None:
        reference = next(iter(volumes))
    if reference not in volumes:
        raise ValueError(f"reference {reference!r} is not one of the volumes {list(volumes)}")
    ref = volumes[reference]
    center = center_of_mass_mm(ref) if center_mm is None else np.asarray(center_mm, dtype=np.float64)
    if center.shape != (3,):
        raise ValueError(f"center_mm must be 3 world coordinates (mm RAS), got shape {center.shape}")
    return ref, center, grid if grid is not None else DisplayGrid.covering(ref, pixel_mm=pixel_mm)


def _plot_grid(
    rows: list[tuple[str, tuple[np.ndarray, ...]]],
    path: str | Path,
    *,
    grid: DisplayGrid,
    center: np.ndarray,
    cmap: Any,
    vmin: float,
    vmax: float,
    title: str | None,
    note: str,
    colorbar_label: str | None,
    width_in: float,
    dpi: int,
    crosshair: bool = False,
    box_mm: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Lay out ``rows`` (label, 3 planes) at one scale (inches per mm) and write a PNG atomically.

    crosshair: draw thin lines through ``center`` in every panel; box_mm: ``(lo, hi)`` world mm RAS corners of a
    box to outline in every panel (the zoomed region)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ex, ey, ez = grid.extent_mm
    sizes = [(ex, ey), (ex, ez), (ey, ez)]  # (width, height) mm of axial, coronal, sagittal
    left, right, top, bottom, gap = 0.3, (0.9 if colorbar_label else 0.15), 0.55, 0.3, 0.06  # inches
    scale = (width_in - left - right - 2 * gap) / (2 * ex + ey)  # inches per mm
    row_h = max(ey, ez) * scale
    height_in = top + bottom + len(rows) * row_h + (len(rows) - 1) * gap

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    text = {"color": "white", "fontsize": 8}
    image = None
    for r, (label, planes) in enumerate(rows):
        y0 = height_in - top - (r + 1) * row_h - r * gap
        fig.text(
            left / 2 / width_in, (y0 + row_h / 2) / height_in, label, rotation=90, ha="center", va="center", **text
        )
        x0 = left
        for p, (name, img, (w, h)) in enumerate(zip(PLANES, planes, sizes, strict=True)):
            ax = fig.add_axes(
                (x0 / width_in, (y0 + (row_h - h * scale) / 2) / height_in, w * scale / width_in, h * scale / height_in)
            )
            image = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            lo, hi = _CORNER_LETTERS[name]
            ax.text(0.02, 0.02, lo, transform=ax.transAxes, ha="left", va="bottom", **text)
            ax.text(0.98, 0.02, hi, transform=ax.transAxes, ha="right", va="bottom", **text)
            if crosshair:
                col, row = _plane_pixels(grid, name, center)
                ax.axvline(col, color="cyan", lw=0.5, alpha=0.6)
                ax.axhline(row, color="cyan", lw=0.5, alpha=0.6)
            if box_mm is not None:
                (c0, r0), (c1, r1) = (_plane_pixels(grid, name, np.asarray(p)) for p in box_mm)
                ax.add_patch(_rectangle(min(c0, c1), min(r0, r1), abs(c1 - c0), abs(r1 - r0)))
            if r == 0:
                where = ("z", "y", "x")[p]
                ax.set_title(f"{name} {where}={center[2 - p]:.1f} mm", pad=3, **text)
            x0 += w * scale + gap
    if title:
        fig.text(0.5, 1 - 0.12 / height_in, title, ha="center", va="top", color="white", fontsize=10)
    fig.text(0.005, 0.005, note, ha="left", va="bottom", color="0.7", fontsize=6)
    if colorbar_label and image is not None:
        cax = fig.add_axes(
            (
                (width_in - right + 0.15) / width_in,
                bottom / height_in,
                0.12 / width_in,
                (height_in - top - bottom) / height_in,
            )
        )
        cb = fig.colorbar(image, cax=cax)
        cb.set_label(colorbar_label, color="white", fontsize=8)
        cb.ax.tick_params(colors="white", labelsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, facecolor="black"))


def _plane_pixels(grid: DisplayGrid, plane: str, xyz: np.ndarray) -> tuple[float, float]:
    """``(col, row)`` imshow data coordinates of world point ``xyz`` ``(3,)`` mm RAS in a plane of
    :func:`orthogonal_planes` on ``grid`` (rows run from high to low world coordinate)."""
    col_axis, row_axis = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[plane]

    def index(a: int) -> float:
        return (float(xyz[a]) - float(grid.lo[a])) / grid.pixel_mm - 0.5

    return index(col_axis), grid.shape[row_axis] - 1 - index(row_axis)


def _rectangle(col: float, row: float, width: float, height: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((col, row), width, height, fill=False, edgecolor="yellow", lw=0.8)


def _cmap(name: str, *, bad: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def orthogonal_slices(
    volumes: Mapping[str, Volume],
    path: str | Path,
    *,
    reference: str | None = None,
    center_mm: Any = None,
    window: tuple[float, float] | None = None,
    title: str | None = None,
    pixel_mm: float | None = None,
    grid: DisplayGrid | None = None,
    crosshair: bool = False,
    box_mm: tuple[np.ndarray, np.ndarray] | None = None,
    width_in: float = 9.0,
    dpi: int = 100,
) -> Path:
    """One PNG: a row per volume, columns axial / coronal / sagittal through the same world point.

    volumes: name -> Volume, in display order; any array axis order (see :func:`orthogonal_planes`).
    reference: name of the volume that sets the display grid, centre and window (default: the first).
    center_mm: ``(3,)`` world mm RAS point the planes pass through; default the reference's centre of mass.
    window: ``(low, high)`` grey-level window for every row; default the reference's 1st-99.5th percentiles.
    pixel_mm: display pixel size (mm); grid: the display grid itself (default: covering the reference; a
    smaller one, e.g. :func:`crop_grid`, zooms in). crosshair: thin lines through the centre; box_mm: ``(lo, hi)``
    world mm RAS corners of a box to outline (e.g. the zoomed region).
    width_in, dpi: the PNG is ``width_in * dpi`` pixels wide. Returns ``path``.
    """
    ref, center, grid = _prepare(volumes, reference, center_mm, pixel_mm, grid)
    if window is None:
        window = default_window(ref)
    rows = [(name, orthogonal_planes(v, center, grid=grid)) for name, v in volumes.items()]
    note = f"neurological (L on image left); window [{window[0]:.3g}, {window[1]:.3g}]; {grid.pixel_mm:.2f} mm/pixel"
    return _plot_grid(
        rows,
        path,
        grid=grid,
        center=center,
        cmap=_cmap("gray", bad="black"),
        vmin=window[0],
        vmax=window[1],
        title=title,
        note=note,
        colorbar_label=None,
        width_in=width_in,
        dpi=dpi,
        crosshair=crosshair,
        box_mm=box_mm,
    )


def default_window(volume: Volume) -> tuple[float, float]:
    """The grey-level window ``(low, high)`` shown by default: the WINDOW_PERCENTILES of the finite values."""
    finite = volume.data[np.isfinite(volume.data)]
    lo, hi = (float(v) for v in np.percentile(finite, WINDOW_PERCENTILES)) if finite.size else (0.0, 1.0)
    return lo, hi if hi > lo else lo + 1.0


def crop_grid(volume: Volume, center_mm: Any, *, side_mm: float | None = None, pixel_mm: float | None = None):
    """A cubic display grid of side ``side_mm`` (default CROP_FRACTION of ``volume``'s largest world extent)
    centred on ``center_mm`` ``(3,)`` world mm RAS, with pixels CROP_UPSAMPLING times finer than the volume's
    smallest voxel (default). Pass it as ``grid=`` to :func:`orthogonal_slices` to zoom in."""
    full = DisplayGrid.covering(volume)
    side = float(CROP_FRACTION * full.extent_mm.max()) if side_mm is None else float(side_mm)
    pixel = float(volume.spacing.min()) / CROP_UPSAMPLING if pixel_mm is None else float(pixel_mm)
    if side <= 0 or pixel <= 0:
        raise ValueError(f"side_mm and pixel_mm must be > 0, got {side} and {pixel}")
    n = max(1, round(side / pixel))
    lo = np.asarray(center_mm, dtype=np.float64) - n * pixel / 2
    return DisplayGrid(lo=lo, shape=(n, n, n), pixel_mm=pixel)


def difference_maps(
    volumes: Mapping[str, Volume],
    path: str | Path,
    *,
    reference: str,
    center_mm: Any = None,
    vmax: float | None = None,
    title: str | None = None,
    pixel_mm: float | None = None,
    cmap: str = "magma",
    width_in: float = 9.0,
    dpi: int = 100,
) -> Path:
    """One PNG: ``|volume - reference|`` for every other volume, in the planes of :func:`orthogonal_slices`.

    Both volumes are interpolated (linearly) onto the reference's display grid before subtracting, so the map is
    of the displayed planes, not of a native-grid difference. All rows share the colour scale ``[0, vmax]``;
    vmax default: the 99.5th percentile of all displayed differences. Returns ``path``.
    """
    ref, center, grid = _prepare(volumes, reference, center_mm, pixel_mm)
    others = {name: v for name, v in volumes.items() if name != reference}
    if not others:
        raise ValueError(f"difference_maps needs a volume besides the reference {reference!r}")
    ref_planes = orthogonal_planes(ref, center, grid=grid)
    rows = [
        (
            f"|{name} - {reference}|",
            tuple(np.abs(p - q) for p, q in zip(orthogonal_planes(v, center, grid=grid), ref_planes, strict=True)),
        )
        for name, v in others.items()
    ]
    if vmax is None:
        values = np.concatenate([p.ravel() for _, planes in rows for p in planes])
        values = values[np.isfinite(values)]
        vmax = float(np.percentile(values, DIFF_PERCENTILE)) if values.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
    note = f"neurological (L on image left); |difference| in [0, {vmax:.3g}]; {grid.pixel_mm:.2f} mm/pixel"
    return _plot_grid(
        rows,
        path,
        grid=grid,
        center=center,
        cmap=_cmap(cmap, bad="0.3"),
        vmin=0.0,
        vmax=vmax,
        title=title,
        note=note,
        colorbar_label="|difference|",
        width_in=width_in,
        dpi=dpi,
    )


def slice_residual_plot(
    series: Mapping[str, Mapping[str, np.ndarray]],
    path: str | Path,
    *,
    flagged: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    ylabel: str = "RMS residual (stack units)",
    width_in: float = 8.0,
    dpi: int = 100,
) -> Path:
    """One PNG: a panel per entry of ``series`` (e.g. per method), one line per stack of RMS residual against
    slice index; flagged slices (``flagged[panel][stack]``: slice indices) are circled in red. Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        raise ValueError("no residual series to plot")
    n = len(series)
    fig = Figure(figsize=(width_in, 0.4 + 2.4 * n), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, (panel, lines) in zip(axes, series.items(), strict=True):
        for j, (name, rms) in enumerate(lines.items()):
            rms = np.asarray(rms, dtype=np.float64)
            # explicit colours: the flag markers below must not shift the next stack's colour
            ax.plot(np.arange(rms.size), rms, marker=".", ms=3, lw=1, label=name, color=f"C{j}")
            marks = list((flagged or {}).get(panel, {}).get(name, []))
            if marks:
                ax.plot(marks, rms[marks], "o", mfc="none", mec="red", ms=9, mew=1.5)
        ax.set_title(panel, fontsize=9, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("slice index", fontsize=8)
    if title:
        fig.suptitle(title + ("  (red circles: flagged slices)" if flagged else ""), fontsize=10)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


#: Intensity profiles: (label, world axis) of the three lines through the centre.
PROFILE_LINES = (
    ("left -> right, x (mm)", 0),
    ("posterior -> anterior, y (mm)", 1),
    ("inferior -> superior, z (mm)", 2),
)


def intensity_profiles(
    volumes: Mapping[str, Volume],
    path: str | Path,
    *,
    reference: str | None = None,
    center_mm: Any = None,
    pixel_mm: float | None = None,
    title: str | None = None,
    width_in: float = 9.0,
    dpi: int = 100,
) -> Path:
    """One PNG: every volume's values along the three world axes through ``center_mm`` (the crosshair of
    :func:`orthogonal_slices`), one panel per axis; the reference is drawn in black, thicker, under the others.

    Values are linearly interpolated at the display grid's pixel centres (world mm RAS) along each line;
    positions outside a volume are gaps. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ref, center, grid = _prepare(volumes, reference, center_mm, pixel_mm)
    ref_name = next(name for name, v in volumes.items() if v is ref)
    fig = Figure(figsize=(width_in, 0.6 + 2.0 * len(PROFILE_LINES)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(PROFILE_LINES), 1, squeeze=False)[:, 0]
    for ax, (label, a) in zip(axes, PROFILE_LINES, strict=True):
        t = grid.axis(a)
        pts = np.broadcast_to(center, (t.size, 3)).copy()
        pts[:, a] = t
        order = [ref_name] + [n for n in volumes if n != ref_name]
        for k, name in enumerate(order):
            values = sample_world(volumes[name], pts)
            if name == ref_name:
                ax.plot(t, values, color="black", lw=2.0, label=name, zorder=1)
            else:
                ax.plot(t, values, color=f"C{k - 1}", lw=1.0, label=name, zorder=2)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("intensity", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right", ncols=min(len(volumes), 4))
    x, y, z = center
    fig.suptitle(
        (title + "\n" if title else "") + f"lines through x={x:.1f}, y={y:.1f}, z={z:.1f} mm (world RAS)", fontsize=9
    )
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def loss_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    title: str | None = None,
    width_in: float = 8.0,
    dpi: int = 100,
) -> Path:
    """One PNG: the fitting loss against optimisation step, a colour per method.

    histories: method -> records ``{"step", "loss"}`` with optional ``"data"`` and ``"prior"`` terms (drawn
    dashed and dotted in the method's colour), as in ``FitResult.history``. The y axis is logarithmic when every
    value is positive. Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {m: [r for r in h if r.get("loss") is not None] for m, h in histories.items()}
    curves = {m: h for m, h in curves.items() if h}
    if not curves:
        raise ValueError("no loss history to plot")
    fig = Figure(figsize=(width_in, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positive = True
    for k, (method, records) in enumerate(curves.items()):
        steps = np.array([float(r.get("step", i + 1)) for i, r in enumerate(records)])
        for key, style in (("loss", "-"), ("data", "--"), ("prior", ":")):
            values = np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])
            if not np.isfinite(values).any():
                continue
            positive &= bool(np.nanmin(values) > 0)
            label = method if key == "loss" else f"{method} {key} term"
            ax.plot(steps, values, style, color=f"C{k}", lw=1.4 if key == "loss" else 1.0, label=label)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def motion_plot(
    motion: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str | None = None,
    width_in: float = 8.0,
    dpi: int = 100,
) -> Path:
    """One PNG: per-slice motion of every stack: rotation angle (degrees) and displacement of the slice centre
    (mm), against slice index. motion: stack name -> ``{"rotation_deg": (n,), "displacement_mm": (n,)}``.
    Returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not motion:
        raise ValueError("no motion to plot")
    fig = Figure(figsize=(width_in, 4.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    for key, ax, label in zip(
        ("rotation_deg", "displacement_mm"), axes, ("rotation (degrees)", "slice-centre displacement (mm)"), strict=True
    ):
        for name, series in motion.items():
            values = np.asarray(series[key], dtype=np.float64)
            ax.plot(np.arange(values.size), values, marker=".", ms=3, lw=1, label=name)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("slice index", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
