"""Run directories -> figures -> one self-contained HTML report (images embedded as base64 PNG, no network).

The report reads only the run directory (layout in :mod:`slicefield.runs`). Besides config.json,
environment.json, metrics.json, timings.json and log.txt it uses, when present:

- ``reference.nii.gz``: the known truth (benchmark, demo);
- ``recon_<method>.nii.gz``: each method's output;
- ``history_<method>.json``: a fitted field's loss per step, ``[{"step", "loss", "data", "prior"}, ...]``;
- metrics.json keys ``rows`` (one dict per method: :data:`slicefield.benchmark.COLUMNS` keys and
  :data:`EXTRA_COLUMNS`), ``residuals`` (method -> :meth:`slicefield.validate.ResidualReport.to_json`),
  ``motion`` (stack -> ``{"rotation_deg": (n,), "displacement_mm": (n,)}``);
- ``figures/*.png``: made by :func:`make_figures` from the files above (and kept as PNG files), plus any
  other figure a command left there.

:func:`save_benchmark` and :func:`save_reconstruction` write those files for the commands that compute
something; :func:`build_report` = :func:`make_figures` + :func:`write_report` (``slicefield report``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io.atomic import atomic_write

if TYPE_CHECKING:
    from .acquisition.simulate import SimulationRecord
    from .benchmark import BenchmarkResult
    from .runs import RunDir
    from .validate import ResidualReport
    from .volume import Stack, Volume

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.nii.gz"
SIMULATION_FILE = "simulation.json"
#: Lines of log.txt shown at the end of the report.
LOG_TAIL_LINES = 60
#: Columns shown after the benchmark's COLUMNS when some row has them: (key, header, format).
EXTRA_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("residual_rms", "data residual RMS", "{:.4g}"),
    ("flagged_slices", "flagged slices", "{}"),
    ("steps", "fit steps", "{}"),
    ("final_loss", "final loss", "{:.4g}"),
    ("lead_db", "held-out lead over next dB", "{:+.2f}"),
    ("tie", "tied with next", "{}"),
)

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1000px;padding:0 1em;color:#222;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
    "img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1.5em 0}"
    "figcaption{font-size:.92em;color:#444;margin-top:.3em}code,pre{background:#f4f4f4;padding:1px 4px}"
    "pre{padding:.6em;overflow:auto;font-size:.85em;max-height:30em}.meta{color:#555;font-size:.92em}"
    "nav a{margin-right:1em}"
)

#: Figures the report knows, in report order: (file stem, heading, caption HTML).
FIGURES: tuple[tuple[str, str, str], ...] = (
    (
        "orthogonal_slices",
        "Orthogonal slices",
        "A row per volume (reference first when there is one), axial / coronal / sagittal planes through the same "
        "world point (cyan crosshair, coordinates in the titles), every row with the <b>same grey-level window</b> "
        "and scale. Neurological convention: patient left on image left. The yellow box is the zoomed region.",
    ),
    (
        "zoomed_crops",
        "Zoomed crops",
        "The yellow box of the slices above, enlarged (pixels half a voxel wide, linear interpolation), same window: "
        "where blur, ringing and staircase artefacts of the thick slices show.",
    ),
    (
        "difference_maps",
        "Difference maps",
        "|method - reference| in the same planes, one colour scale for every method (colour bar): bright = wrong.",
    ),
    (
        "intensity_profiles",
        "Intensity profiles",
        "Values along the three world axes through the crosshair: the reference in black, each method in colour. "
        "Sharp edges of the reference that a method rounds off show as slopes; overshoots as ringing.",
    ),
    (
        "loss_curves",
        "Loss curves",
        "Fitted fields: the objective (solid), its data term (dashed) and prior term (dotted) against the step.",
    ),
    (
        "residuals",
        "Per-slice residuals",
        "RMS of (the reconstruction's prediction of each acquired slice through the acquisition model - the slice) "
        "per slice and stack; red circles mark slices far out of line with their stack (robust z-score), a sign "
        "of motion, artefact or wrong geometry.",
    ),
    (
        "motion",
        "Slice motion",
        "The per-slice rigid motion of the acquisition: rotation angle and displacement of each slice's centre.",
    ),
)

#: What each kind of run did, for the report's opening paragraph.
_INTRO = {
    "demo": "The MNI152 T1 template (shipped inside nilearn's wheel) was acquired as thick-slice stacks by the "
    "simulator, and every method reconstructed it on the template's grid from those stacks alone. The template is "
    "the known truth: the table scores each method against it, and the pictures show it beside each method.",
    "benchmark": "Thick-slice stacks were simulated from the reference volume, and every method reconstructed it "
    "on the reference's grid from the stacks alone. The table scores each method against the reference; the "
    "pictures show the reference beside each method.",
    "reconstruct": "A reconstruction from acquired stacks. There is no reference here, so the table shows cost and "
    "data consistency (how well the result predicts the slices it was made from), not accuracy.",
    "validate": "Each method predicted slices it did not see (leave one stack, or one slice group, out) through the "
    "acquisition model; the table ranks the methods by how well they did.",
}

#: What the metrics table shows, unless a run says otherwise.
DEFAULT_CAPTION = (
    "PSNR/SSIM/NRMSE against the known reference; <em>brain</em> = inside the reference's automatic "
    "foreground mask; data range = reference max - min. Wall seconds and peak resident memory per method."
)
#: The metrics table's caption for a run without a reference.
NO_REFERENCE_CAPTION = (
    "No reference: wall seconds, peak resident memory, and the data residual RMS = the RMS over every acquired "
    "slice pixel of (the slice predicted from the reconstruction through the acquisition model - the measured "
    "slice), in the stacks' intensity units; flagged slices are far out of line with their stack."
)


# ----------------------------------------------------------------------------------------------- writing runs
def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def recon_file(method: str) -> str:
    """File name of a method's output in a run directory."""
    return f"recon_{_safe(method)}.nii.gz"


def history_file(method: str) -> str:
    """File name of a fitted method's loss history in a run directory."""
    return f"history_{_safe(method)}.json"


def residual_reports(stacks: Sequence[Stack], outputs: Mapping[str, Volume]) -> dict[str, ResidualReport]:
    """Per-slice residuals of each output against ``stacks`` (:func:`slicefield.validate.slice_residuals`);
    the slice operators are built once and shared by outputs on the same grid."""
    from .acquisition.operator import StackOperator
    from .validate import slice_residuals

    reports: dict[str, ResidualReport] = {}
    shared: dict[tuple, list[StackOperator]] = {}
    for method, volume in outputs.items():
        key = (volume.shape, np.asarray(volume.affine).round(6).tobytes())
        if key not in shared:
            shared[key] = [StackOperator(s, volume.shape, volume.affine) for s in stacks]
        reports[method] = slice_residuals(list(stacks), volume, operators=shared[key])
    return reports


def residual_row(report: ResidualReport) -> dict[str, Any]:
    """The table entries of a residual report: RMS over every slice pixel, count of flagged slices."""
    sq = sum(float(np.sum(s.residual.astype(np.float64) ** 2)) for s in report.stacks)
    n = sum(s.residual.size for s in report.stacks)
    return {"residual_rms": math.sqrt(sq / max(n, 1)), "flagged_slices": len(report.flagged)}


def motion_summary(stacks: Sequence[Stack], record: SimulationRecord) -> dict[str, dict[str, list[float]]]:
    """Per stack and slice: rotation angle (degrees) of the simulated motion and displacement (mm) of the
    slice's centre (world mm RAS), from the record's per-slice world -> world transforms."""
    out: dict[str, dict[str, list[float]]] = {}
    for stack, rec in zip(stacks, record.stacks, strict=True):
        motion = np.asarray(rec.motion, dtype=np.float64)
        nominal = np.asarray(rec.slice_to_world, dtype=np.float64)
        ni, nj = stack.data.shape[1:]
        local = np.array([(ni - 1) * stack.spacing[0] / 2, (nj - 1) * stack.spacing[1] / 2, 0.0, 1.0])
        centres = nominal @ local  # (n, 4) world mm RAS
        moved = np.einsum("nij,nj->ni", motion, centres)
        cos = np.clip((np.trace(motion[:, :3, :3], axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)
        out[stack.name] = {
            "rotation_deg": np.degrees(np.arccos(cos)).tolist(),
            "displacement_mm": np.linalg.norm(moved[:, :3] - centres[:, :3], axis=1).tolist(),
        }
    return out


def save_benchmark(run: RunDir, result: BenchmarkResult, *, reference: Volume, residuals: bool = True) -> None:
    """Write a benchmark into a run directory: ``reference.nii.gz``, ``recon_<method>.nii.gz``,
    ``stacks/*.nii.gz``, ``simulation.json`` (replayable), ``history_<method>.json`` of fitted methods,
    metrics.json (``rows``, ``simulation``, ``residuals``, ``motion``) and timings.json.

    residuals: also compute each output's per-slice residuals against the simulated stacks (a few seconds: the
    slice operators, shared by the methods) and add their RMS and flagged-slice count to the rows."""
    from .io import save_stack, save_volume
    from .runs import Timer

    run.record_timing("simulate", result.simulate_seconds)
    for row in result.rows:
        run.record_timing(row["method"], row["seconds"])
    (run.path / "stacks").mkdir(exist_ok=True)
    for stack in result.stacks:
        save_stack(stack, run.path / "stacks" / f"{_safe(stack.name)}.nii.gz")
    save_volume(reference, run.path / REFERENCE_FILE)
    for method, volume in result.outputs.items():
        save_volume(volume, run.path / recon_file(method))
    for method, history in result.histories.items():
        run.write_json(history_file(method), history)
    run.write_json(SIMULATION_FILE, result.record.to_json())
    rows = [dict(r) for r in result.rows]
    metrics: dict[str, Any] = {"simulation": result.record.config}
    if residuals:
        with Timer() as timer:
            reports = residual_reports(result.stacks, result.outputs)
        run.record_timing("residuals", timer.seconds)
        for row in rows:
            row.update(residual_row(reports[row["method"]]))
        metrics["residuals"] = {m: r.to_json() for m, r in reports.items()}
    for row in rows:
        history = result.histories.get(row["method"])
        if history:
            row.update({"steps": history[-1].get("step"), "final_loss": history[-1].get("loss")})
    motion = motion_summary(result.stacks, result.record)
    if any(max(v["displacement_mm"] + v["rotation_deg"], default=0.0) > 0 for v in motion.values()):
        metrics["motion"] = motion
    run.update_metrics({"rows": rows, **metrics})


def save_reconstruction(
    run: RunDir,
    *,
    method: str,
    volume: Volume,
    stacks: Sequence[Stack],
    seconds: float,
    peak_rss_mb: float | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    residuals: bool = True,
) -> None:
    """Write one reconstruction into a run directory: ``recon_<method>.nii.gz``, ``history_<method>.json`` (field
    methods), metrics.json (a row with seconds, peak memory, fit steps and final loss, data residual RMS and
    flagged slices; ``residuals``) and timings.json. residuals: compute the per-slice residuals against
    ``stacks`` (builds each stack's slice operator once)."""
    from .io import save_volume
    from .runs import Timer

    save_volume(volume, run.path / recon_file(method))
    run.record_timing(method, seconds)
    row: dict[str, Any] = {"method": method, "seconds": seconds, "peak_rss_mb": peak_rss_mb}
    metrics: dict[str, Any] = {}
    if history:
        run.write_json(history_file(method), list(history))
        row.update({"steps": history[-1].get("step"), "final_loss": history[-1].get("loss")})
    if residuals:
        with Timer() as timer:
            report = residual_reports(stacks, {method: volume})[method]
        run.record_timing("residuals", timer.seconds)
        row.update(residual_row(report))
        metrics["residuals"] = {method: report.to_json()}
    run.update_metrics({"rows": [row], **metrics})


# ----------------------------------------------------------------------------------------------- figures
@dataclass(frozen=True)
class FigureConfig:
    """How :func:`make_figures` draws a run directory's figures."""

    center_mm: tuple[float, float, float] | None = None
    """World point (mm RAS) the slices and profiles pass through; default the reference's centre of mass."""
    crop_side_mm: float | None = None
    """Side of the zoomed crops in mm; default ``figures.CROP_FRACTION`` of the largest field-of-view extent."""
    width_in: float = 9.0
    """Figure width in inches (slices, profiles)."""
    dpi: int = 100
    """PNG pixels per inch."""


def find_volumes(run_dir: str | Path) -> tuple[Path | None, dict[str, Path]]:
    """``(reference.nii.gz or None, {method: recon_<method>.nii.gz})`` of a run directory, methods in the order
    of metrics.json's rows (then by name)."""
    run = Path(run_dir)
    ref = run / REFERENCE_FILE
    found = {p.name[len("recon_") : -len(".nii.gz")]: p for p in sorted(run.glob("recon_*.nii.gz"))}
    rows = _read_json(run / "metrics.json", {}).get("rows") or []
    order = [r.get("method") for r in rows if r.get("method") in found]
    order += [m for m in found if m not in order]
    return (ref if ref.is_file() else None), {m: found[m] for m in order}


def make_figures(run_dir: str | Path, *, config: FigureConfig = FigureConfig()) -> dict[str, Path]:
    """Draw every figure the run directory's files allow into ``figures/`` (see :data:`FIGURES`); returns them
    by stem. Slices, crops, differences and profiles need volumes; loss curves a history; residual and motion
    plots their metrics.json entries."""
    from .figures import (
        center_of_mass_mm,
        crop_grid,
        default_window,
        difference_maps,
        intensity_profiles,
        loss_curves,
        motion_plot,
        orthogonal_slices,
        slice_residual_plot,
    )
    from .io import load_volume

    run = Path(run_dir)
    figdir = run / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    ref_path, recon_paths = find_volumes(run)
    volumes: dict[str, Volume] = {}
    if ref_path is not None:
        volumes["reference"] = load_volume(ref_path)
    volumes.update({m: load_volume(p) for m, p in recon_paths.items()})
    size = {"width_in": config.width_in, "dpi": config.dpi}
    if volumes:
        ref_name = "reference" if ref_path is not None else next(iter(volumes))
        ref = volumes[ref_name]
        center = center_of_mass_mm(ref) if config.center_mm is None else np.asarray(config.center_mm, float)
        window = default_window(ref)
        crop = crop_grid(ref, center, side_mm=config.crop_side_mm)
        box = (crop.lo, crop.lo + crop.extent_mm)
        common = {"reference": ref_name, "center_mm": center, **size}
        written["orthogonal_slices"] = orthogonal_slices(
            volumes, figdir / "orthogonal_slices.png", window=window, crosshair=True, box_mm=box, **common
        )
        written["zoomed_crops"] = orthogonal_slices(
            volumes, figdir / "zoomed_crops.png", window=window, grid=crop, crosshair=True, **common
        )
        if ref_path is not None and len(volumes) > 1:
            written["difference_maps"] = difference_maps(volumes, figdir / "difference_maps.png", **common)
        written["intensity_profiles"] = intensity_profiles(volumes, figdir / "intensity_profiles.png", **common)
    histories = {m: _read_json(run / history_file(m), None) for m in recon_paths}
    histories = {m: h for m, h in histories.items() if h}
    if histories:
        written["loss_curves"] = loss_curves(histories, figdir / "loss_curves.png", dpi=config.dpi)
    metrics = _read_json(run / "metrics.json", {})
    if metrics.get("residuals"):
        res = metrics["residuals"]
        series = {m: {s["name"]: np.asarray(s["rms"], float) for s in r["stacks"]} for m, r in res.items()}
        flags = {m: {s["name"]: s["flagged"] for s in r["stacks"]} for m, r in res.items()}
        written["residuals"] = slice_residual_plot(
            series, figdir / "residuals.png", flagged=flags, title="RMS residual per slice (all stacks)", dpi=config.dpi
        )
    if metrics.get("motion"):
        written["motion"] = motion_plot(
            metrics["motion"], figdir / "motion.png", title="simulated per-slice motion", dpi=config.dpi
        )
    return written


# ----------------------------------------------------------------------------------------------- HTML
def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default
    except (OSError, ValueError) as e:
        log.warning("%s: not readable as JSON (%s); left out of the report", path, e)
        return default


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(float(value) if "f" in fmt or "g" in fmt else value)
    except (TypeError, ValueError):
        return str(value)


def _table(rows: list[dict]) -> str:
    """The metrics table: the benchmark's columns and EXTRA_COLUMNS that some row has a value for."""
    from .benchmark import COLUMNS

    cols = [c for c in (*COLUMNS, *EXTRA_COLUMNS) if c[0] == "method" or any(r.get(c[0]) is not None for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = []
    for r in rows:
        cells = [_fmt(r.get(k), f) for k, _, f in cols]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _kind(config_doc: Mapping[str, Any]) -> str | None:
    cfg = config_doc.get("config")
    if isinstance(cfg, Mapping):
        if isinstance(cfg.get("kind"), str):
            return cfg["kind"]
        if "validate" in cfg:
            return "validate"
    return None


def _environment_line(env: Mapping[str, Any]) -> str:
    parts = []
    if env.get("utc_time"):
        parts.append(str(env["utc_time"]))
    packages = env.get("packages") or {}
    if packages.get("slicefield"):
        parts.append(f"slicefield {packages['slicefield']}")
    if env.get("python"):
        parts.append(f"Python {str(env['python']).split()[0]}")
    if env.get("platform"):
        parts.append(str(env["platform"]))
    if env.get("cpu_count"):
        parts.append(f"{env['cpu_count']} CPUs")
    torch = env.get("torch") or {}
    if torch.get("available"):
        device = f"CUDA, {torch.get('device_name')}" if torch.get("cuda_available") else "CPU"
        parts.append(f"torch {packages.get('torch') or ''} ({device})".replace("  ", " "))
    git = env.get("git") or {}
    if git.get("commit"):
        parts.append(f"git {git['commit'][:10]}{' (modified)' if git.get('dirty') else ''}")
    return " · ".join(parts)


def _simulation_line(sim: Mapping[str, Any]) -> str:
    orient = ", ".join(sim.get("orientations") or [])
    noise = sim.get("noise")
    bits = [
        f"stacks: {orient}" if orient else None,
        f"slice thickness {sim['thickness']:g} mm" if sim.get("thickness") is not None else None,
        f"gap {sim['gap']:g} mm" if sim.get("gap") is not None else None,
        f"{sim['psf']} slice profile" if sim.get("psf") else None,
        f"{sim.get('noise_kind', '')} noise {noise:.1%} of max" if noise is not None else None,
        f"motion ±{sim.get('motion_deg', 0):g}° / ±{sim.get('motion_mm', 0):g} mm per slice"
        if (sim.get("motion_deg") or sim.get("motion_mm"))
        else "no motion",
        f"seed {sim['seed']}" if sim.get("seed") is not None else None,
    ]
    return "; ".join(b for b in bits if b)


def _png_tag(png: Path, alt: str) -> str:
    data = png.read_bytes()
    size = ""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        size = f" width='{w}' height='{h}'"
    b64 = base64.b64encode(data).decode("ascii")
    return f"<img alt='{html.escape(alt)}'{size} src='data:image/png;base64,{b64}'>"


def write_report(
    run_dir: str | Path,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    caption: str | None = None,
) -> Path:
    """Write ``report.html`` (or ``path``) for a run directory; reads only files inside the run directory.

    One self-contained file: what was run (command, machine, acquisition), the metrics table, timings, every
    figure in ``figures/`` embedded as base64 PNG with a caption (:data:`FIGURES` first, in that order), the
    config and the end of the log. title: default from the kind of run. caption: HTML explaining the metrics
    table (default by kind: scored against a reference, validation, or no reference). Returns the path."""
    run = Path(run_dir)
    metrics = _read_json(run / "metrics.json", {})
    config = _read_json(run / "config.json", {})
    env = _read_json(run / "environment.json", {})
    timings = _read_json(run / "timings.json", {})
    kind = _kind(config)
    if title is None:
        title = f"slicefield {kind or 'run'}: {run.resolve().name}"
    rows = metrics.get("rows") or []
    if caption is None:
        if kind == "validate" or "folds" in metrics:
            from .validate import VALIDATION_CAPTION

            caption = VALIDATION_CAPTION
        elif any(r.get("psnr") is not None for r in rows):
            caption = DEFAULT_CAPTION
        else:
            caption = NO_REFERENCE_CAPTION

    known = [(stem, head, cap) for stem, head, cap in FIGURES if (run / "figures" / f"{stem}.png").is_file()]
    others = sorted(p for p in (run / "figures").glob("*.png") if p.stem not in {s for s, _, _ in FIGURES})
    figures = known + [(p.stem, p.stem.replace("_", " ").capitalize(), "") for p in others]

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if kind in _INTRO:
        parts.append(f"<p>{_INTRO[kind]}</p>")
    meta = []
    if config.get("command"):
        meta.append(f"Command: <code>{html.escape(' '.join(map(str, config['command'])))}</code>")
    if env:
        meta.append(f"Ran on: {html.escape(_environment_line(env))}")
    if isinstance(metrics.get("simulation"), Mapping):
        meta.append(f"Acquisition: {html.escape(_simulation_line(metrics['simulation']))}")
    meta.append(f"Run directory: <code>{html.escape(str(run.resolve()))}</code>")
    parts.append("<p class='meta'>" + "<br>".join(meta) + "</p>")
    nav = ["<a href='#metrics'>metrics</a>"] if rows else []
    nav += [f"<a href='#{stem}'>{html.escape(head.lower())}</a>" for stem, head, _ in figures]
    nav.append("<a href='#details'>config and log</a>")
    parts.append("<nav>" + "".join(nav) + "</nav>")
    if rows:
        parts.append("<h2 id='metrics'>Metrics</h2>" + _table(rows) + f"<p>{caption}</p>")
    if timings:
        cells = "".join(
            f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v, '{:.1f}')}</td></tr>" for k, v in timings.items()
        )
        parts.append(f"<h3>Timings</h3><table><tr><th>step</th><th>wall s</th></tr>{cells}</table>")
    for stem, head, cap in figures:
        img = _png_tag(run / "figures" / f"{stem}.png", head)
        figcap = f"<figcaption>{cap} <span class='meta'>(figures/{html.escape(stem)}.png)</span></figcaption>"
        parts.append(f"<h2 id='{html.escape(stem)}'>{html.escape(head)}</h2><figure>{img}{figcap}</figure>")
    parts.append("<h2 id='details'>Config and log</h2>")
    if config:
        text = json.dumps(config, indent=1)
        parts.append(f"<details><summary>config.json</summary><pre>{html.escape(text)}</pre></details>")
    if env:
        text = json.dumps(env, indent=1)
        parts.append(f"<details><summary>environment.json</summary><pre>{html.escape(text)}</pre></details>")
    log_path = run / "log.txt"
    if log_path.is_file():
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]
        parts.append(
            f"<details><summary>log.txt (last {len(lines)} lines)</summary>"
            f"<pre>{html.escape(chr(10).join(lines))}</pre></details>"
        )
    parts.append("</body></html>")
    out = Path(path) if path is not None else run / "report.html"
    text = "\n".join(parts)
    atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def build_report(
    run_dir: str | Path,
    path: str | Path | None = None,
    *,
    title: str | None = None,
    caption: str | None = None,
    figures: FigureConfig | None = FigureConfig(),
) -> Path:
    """Redraw the run directory's figures (unless ``figures`` is None) and write its report; returns the path."""
    from .errors import SlicefieldError

    run = Path(run_dir)
    if not run.is_dir():
        raise SlicefieldError("no such run directory", path=run, fix="pass a folder written with --run-dir")
    if not (run / "config.json").is_file() and not (run / "metrics.json").is_file():
        raise SlicefieldError(
            "not a run directory (no config.json or metrics.json)",
            path=run,
            fix="pass a folder written by slicefield demo, benchmark, reconstruct or validate with --run-dir",
        )
    if figures is not None:
        make_figures(run, config=figures)
    return write_report(run, path, title=title, caption=caption)


def write_table_report(
    path: str | Path,
    *,
    title: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    summary: str = "",
    links: Sequence[str | None] | None = None,
) -> Path:
    """Write a self-contained HTML page with one table (e.g. a cohort's subjects); returns ``path``.

    rows: cell texts (escaped here). links: per row, a relative URL for the first cell, or None.
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for k, row in enumerate(rows):
        cells = [html.escape(str(c)) for c in row]
        url = links[k] if links is not None else None
        if url and cells:
            cells[0] = f"<a href='{html.escape(url, quote=True)}'>{cells[0]}</a>"
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(summary)}</p>" if summary else "",
        f"<table><tr>{head}</tr>{''.join(body)}</table>",
    ]
    text = "\n".join(p for p in parts if p)
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
