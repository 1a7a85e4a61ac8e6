"""Evaluation of synthetic volumes against the real one: SSIM / PSNR / MSE in the brain, sharpness and
through-plane consistency per axis, intensity profiles, and a reader-study sheet.

Conventions: both volumes are normalised to [0, 1] with :func:`slicefield.synth.labels.normalise_intensity` in
the brain mask (each by its own 99.5th percentile), so ``data_range = 1`` and MSE is in those units.

Per world axis ``a`` (x, y, z: the axes across sagittal, coronal, axial slices), with ``g_a`` forward differences
along ``a`` over voxel pairs both in the mask:

- ``gradient_ratio_a = mean(g_a(test)²) / mean(g_a(real)²)``: 1 is the real volume's sharpness; < 1 blurred,
  > 1 noisier / striped (slice-to-slice jumps raise it across the slices of a single-plane volume).
- ``gradient_error_a = mean((g_a(test) - g_a(real))²) / mean(g_a(real)²)``: relative error of the edges along
  ``a``; 0 is perfect. A volume generated slice by slice in one plane is consistent in-plane but not across its
  slices. **Through-plane consistency** = ``max_a gradient_error_a`` (lower is better): the worst axis.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from ..metrics import psnr, ssim
from ..volume import Volume
from .labels import normalise_intensity
from .model import PLANE_NORMALS, plane_axis

#: World-axis names in the order of the per-axis arrays.
AXES = ("x", "y", "z")


def plane_path(output: str | Path, plane: str) -> Path:
    """Where ``synth generate --keep-planes`` writes a plane's volume: ``<dir>/<stem>_<plane>.nii.gz``."""
    from ..io.nifti import image_stem

    return Path(output).parent / f"{image_stem(output)}_{plane}.nii.gz"


def plane_volumes(output: str | Path, *, like: Volume) -> dict[str, Volume]:
    """The per-plane volumes written beside ``output`` (those that exist and share ``like``'s grid)."""
    from ..io import load_volume

    out = {}
    for plane in PLANE_NORMALS:
        path = plane_path(output, plane)
        if path.exists():
            v = load_volume(path)
            if v.shape == like.shape and np.allclose(v.affine, like.affine, atol=1e-3):
                out[plane] = v
    return out


def _axis_pairs(mask: np.ndarray, axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...], np.ndarray]:
    lo = tuple(slice(0, -1) if a == axis else slice(None) for a in range(3))
    hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
    return lo, hi, mask[lo] & mask[hi]


def world_axis_order(affine: np.ndarray) -> list[int]:
    """Array axes along world x, y, z."""
    return [plane_axis(affine, p) for p in ("sagittal", "coronal", "axial")]


def gradient_stats(test: np.ndarray, reference: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict:
    """``gradient_ratio_{x,y,z}``, ``gradient_error_{x,y,z}`` and ``through_plane`` (see the module docstring).

    test, reference: ``(X, Y, Z)`` normalised intensities; mask: bool; affine: voxel -> world mm RAS (for naming
    the axes)."""
    out: dict[str, float] = {}
    for name, axis in zip(AXES, world_axis_order(affine), strict=True):
        lo, hi, both = _axis_pairs(mask, axis)
        gt = (test[hi] - test[lo])[both].astype(np.float64)
        gr = (reference[hi] - reference[lo])[both].astype(np.float64)
        energy = float(np.mean(gr**2))
        out[f"gradient_ratio_{name}"] = float(np.mean(gt**2)) / energy
        out[f"gradient_error_{name}"] = float(np.mean((gt - gr) ** 2)) / energy
    out["through_plane"] = max(out[f"gradient_error_{a}"] for a in AXES)
    return out


def synth_metrics(test: Volume, reference: Volume, *, mask: np.ndarray) -> dict[str, float]:
    """SSIM, PSNR (dB), MSE in the mask (data range 1 after normalisation) and :func:`gradient_stats`."""
    mask = np.asarray(mask, dtype=bool)
    t = normalise_intensity(test.data, mask)
    r = normalise_intensity(reference.data, mask)
    return {
        "ssim": ssim(r, t, data_range=1.0, mask=mask),
        "psnr": psnr(r, t, data_range=1.0, mask=mask),
        "mse": float(np.mean((r[mask].astype(np.float64) - t[mask]) ** 2)),
        **gradient_stats(t, r, mask, reference.affine),
    }


def evaluate_volumes(volumes: Mapping[str, Volume], reference: Volume, *, mask: np.ndarray) -> list[dict]:
    """One row per named volume: ``{"volume": name, **synth_metrics}``."""
    return [{"volume": name, **synth_metrics(v, reference, mask=mask)} for name, v in volumes.items()]


def profiles_figure(
    volumes: Mapping[str, Volume], reference: Volume, path: str | Path, *, mask: np.ndarray, title: str | None = None
) -> Path:
    """Intensity profiles (real in black, then every named volume) along world x, y, z through the brain mask's
    centre of mass, all normalised as in :func:`synth_metrics`. Returns ``path``."""
    from ..figures import intensity_profiles
    from ..geometry import apply_affine

    mask = np.asarray(mask, dtype=bool)
    centre = apply_affine(reference.affine, np.argwhere(mask).mean(axis=0))
    named = {"real": reference.with_data(normalise_intensity(reference.data, mask))}
    for name, v in volumes.items():
        named[name] = v.with_data(normalise_intensity(v.data, mask))
    return intensity_profiles(named, path, reference="real", center_mm=centre, title=title)


def reader_sheet(
    real: Volume,
    synthetic: Volume,
    sheet: str | Path,
    *,
    mask: np.ndarray,
    per_plane: int = 4,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A blind reader study: ``per_plane`` random slices per plane (axial, coronal, sagittal) of the real and of the
    synthetic volume (same positions), as PNGs in ``<sheet stem>_images/`` under shuffled ids; ``sheet`` (CSV:
    ``id, image, plane, score``, score empty, to fill with 1-5) and ``<sheet stem>_key.csv`` (``id, source,
    plane, slice``). Slices are drawn among those with >= 20 % of the largest brain cross-section. Returns
    (sheet, key)."""
    from PIL import Image

    sheet = Path(sheet)
    stem = sheet.name[:-4] if sheet.name.lower().endswith(".csv") else sheet.name
    images = sheet.parent / f"{stem}_images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    mask = np.asarray(mask, dtype=bool)
    norm = {
        "real": normalise_intensity(real.data, mask),
        "synthetic": normalise_intensity(synthetic.data, mask),
    }
    items = []
    for plane in PLANE_NORMALS:
        axis = plane_axis(real.affine, plane)
        area = np.moveaxis(mask, axis, 0).sum(axis=(1, 2))
        candidates = np.flatnonzero(area >= 0.2 * area.max())
        picks = rng.choice(candidates, size=min(per_plane, candidates.size), replace=False)
        for s in sorted(int(k) for k in picks):
            for source in ("real", "synthetic"):
                items.append((source, plane, s, np.moveaxis(norm[source], axis, 0)[s]))
    order = rng.permutation(len(items))
    rows, key = [], []
    for n, k in enumerate(order):
        source, plane, s, img = items[k]
        ident = f"r{n + 1:03d}"
        name = f"{ident}.png"
        # display: rows = second in-plane axis reversed (superior / anterior up), 8-bit
        pixels = (np.clip(np.flipud(img.T), 0, 1) * 255).astype(np.uint8)
        atomic_write(images / name, lambda p, px=pixels: Image.fromarray(px).save(p, format="PNG"))
        rows.append({"id": ident, "image": f"{images.name}/{name}", "plane": plane, "score": ""})
        key.append({"id": ident, "source": source, "plane": plane, "slice": s})

    def write(path: Path, table: list[dict]) -> None:
        def fn(p: Path) -> None:
            with p.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(table[0]))
                w.writeheader()
                w.writerows(table)

        atomic_write(path, fn)

    key_path = sheet.parent / f"{stem}_key.csv"
    write(sheet, rows)
    write(key_path, key)
    return sheet, key_path


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`evaluate_volumes` rows."""
    cols = ["volume", "ssim", "psnr", "mse"] + [f"gradient_ratio_{a}" for a in AXES]
    cols += [f"gradient_error_{a}" for a in AXES] + ["through_plane"]
    head = ["volume", "SSIM", "PSNR dB", "MSE", "grad x/real", "grad y/real", "grad z/real"]
    head += ["err x", "err y", "err z", "through-plane"]
    lines = [" | ".join(head)]
    for r in rows:
        cells = [str(r["volume"])]
        for c in cols[1:]:
            v = r[c]
            cells.append(f"{v:.2f}" if c == "psnr" else f"{v:.4f}" if c in ("ssim", "mse") else f"{v:.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)
