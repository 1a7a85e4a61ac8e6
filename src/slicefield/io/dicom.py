"""DICOM series input (pydicom): one series of parallel 2D slices -> :class:`Stack`.

Frames and axes:

- DICOM patient coordinates are LPS (x to the patient's Left, y Posterior, z Superior); slicefield's world is
  RAS, so x and y are negated: ``world_ras = diag(-1, -1, 1) @ lps``.
- ``ImageOrientationPatient`` (IOP) holds the row direction ``r`` (first 3 values: the direction in which the
  column index increases along a row) and the column direction ``c`` (last 3: the direction in which the row
  index increases). ``PixelSpacing`` is ``[spacing between rows (along c), spacing between columns (along r)]``.
- A DICOM ``pixel_array`` is ``(rows, cols)``. Stack data are ``(n_slices, ni, nj)`` with ``ni = cols`` and
  ``nj = rows``, i.e. each image is transposed: ``data[s, i, j] = pixel_array[j, i]``. The slice frame has
  ``x = i * dx`` along ``r`` (``dx = PixelSpacing[1]``), ``y = j * dy`` along ``c`` (``dy = PixelSpacing[0]``),
  ``z`` along the normal ``n = r x c``; the origin is ``ImagePositionPatient`` (centre of the first pixel).
- Slices are sorted by ``ImagePositionPatient . n``, increasing.

Enhanced (multi-frame) files are read frame by frame from ``PerFrameFunctionalGroupsSequence`` and
``SharedFunctionalGroupsSequence``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError

from ..errors import SlicefieldError
from ..volume import PSF_KINDS, PSFKind, Stack

log = logging.getLogger(__name__)

#: DICOM LPS -> slicefield world RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: Largest difference between direction cosines of slices treated as parallel.
ORIENTATION_TOL = 1e-4

#: Exceptions pydicom raises for unreadable, corrupt or truncated files (found by fuzzing, tests/test_batch.py).
#: (RuntimeError includes the NotImplementedError of an unknown value representation.)
_READ_ERRORS = (
    OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError,
    BytesLengthException, struct.error,
)  # fmt: skip

#: Slices closer than this along the normal (mm) are at the same position (e.g. several echoes or times).
SAME_POSITION_MM = 1e-3


@dataclass
class _Frame:
    """One 2D image of a series, in DICOM terms (LPS, rows x cols)."""

    pixels: np.ndarray  # (rows, cols) float64, rescale applied
    position: np.ndarray  # (3,) ImagePositionPatient, mm LPS
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float | None
    source: Path


def _list_files(folder_or_files: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path]:
    if isinstance(folder_or_files, str | Path):
        root = Path(folder_or_files)
        if not root.exists():
            raise SlicefieldError("not found", path=root, fix="check the path")
        if root.is_dir():
            files = sorted(f for f in root.iterdir() if f.is_file() and not f.name.startswith("."))
            return files, root
        return [root], root
    files = [Path(f) for f in folder_or_files]
    if not files:
        raise SlicefieldError("no DICOM files given", fix="pass a series folder or its files")
    for f in files:
        if not f.is_file():
            raise SlicefieldError("file not found", path=f, fix="check the path")
    return files, files[0].parent


def _read(path: Path) -> pydicom.Dataset | None:
    """The dataset of a DICOM image file, or None for a file that is not a DICOM image (skipped)."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except _READ_ERRORS as e:
        raise SlicefieldError(
            f"cannot read DICOM file ({e})", path=path, fix="re-export the series or remove the file"
        ) from e
    # No DICM preamble: old-style files without file meta still count if they hold an image.
    try:
        ds = pydicom.dcmread(path, force=True)
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            return ds
    except Exception:  # any failure of a forced read just means "not a DICOM file"
        log.debug("%s: not a DICOM file, skipped", path)
    return None


def _find(ds: Any, group: str, attr: str, index: int | None = None) -> Any:
    """An attribute from a per-frame functional group (frame ``index``), else the shared one, else top level."""
    sources = []
    if index is not None and "PerFrameFunctionalGroupsSequence" in ds:
        sources.append(ds.PerFrameFunctionalGroupsSequence[index])
    if "SharedFunctionalGroupsSequence" in ds:
        sources.append(ds.SharedFunctionalGroupsSequence[0])
    for item in sources:
        if group in item and len(item[group].value) > 0 and attr in item[group].value[0]:
            return item[group].value[0][attr].value
    return ds.get(attr)


def _frames(ds: pydicom.Dataset, path: Path) -> list[_Frame]:
    try:
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SlicefieldError("is a colour image", path=path, fix="pass a greyscale MR series")
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        multi = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
        if pixels.ndim == 2:
            pixels = pixels[None]
        frames = []
        for f in range(pixels.shape[0]):
            idx = f if multi else None
            ipp = _find(ds, "PlanePositionSequence", "ImagePositionPatient", idx)
            iop = _find(ds, "PlaneOrientationSequence", "ImageOrientationPatient", idx)
            ps = _find(ds, "PixelMeasuresSequence", "PixelSpacing", idx)
            thickness = _find(ds, "PixelMeasuresSequence", "SliceThickness", idx)
            slope = _find(ds, "PixelValueTransformationSequence", "RescaleSlope", idx)
            intercept = _find(ds, "PixelValueTransformationSequence", "RescaleIntercept", idx)
            if ipp is None or iop is None or ps is None:
                missing = [n for n, v in (("ImagePositionPatient", ipp), ("ImageOrientationPatient", iop),
                                           ("PixelSpacing", ps)) if v is None]  # fmt: skip
                raise SlicefieldError(
                    f"has no {', '.join(missing)}; its slice geometry is unknown",
                    path=path,
                    fix="pass an MR image series (not a localizer, screenshot or report)",
                )
            slope = 1.0 if slope in (None, "") else float(slope)
            intercept = 0.0 if intercept in (None, "") else float(intercept)
            frames.append(
                _Frame(
                    pixels=pixels[f] * slope + intercept,
                    position=np.asarray([float(v) for v in ipp]),
                    orientation=np.asarray([float(v) for v in iop]),
                    pixel_spacing=(float(ps[0]), float(ps[1])),
                    thickness=None if thickness in (None, "") else float(thickness),
                    source=path,
                )
            )
        return frames
    except SlicefieldError:
        raise
    except _READ_ERRORS as e:
        raise SlicefieldError(
            f"cannot decode DICOM image ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            path=path,
            fix="re-export the series uncompressed, or install the pixel-data decoder pydicom asks for",
        ) from e


def _series_label(ds: pydicom.Dataset) -> str:
    desc = str(ds.get("SeriesDescription", "")).strip()
    number = ds.get("SeriesNumber")
    parts = [f"#{number}" if number not in (None, "") else "", repr(desc) if desc else ""]
    label = " ".join(p for p in parts if p)
    return f"{label} ({ds.get('SeriesInstanceUID', '?')})" if label else str(ds.get("SeriesInstanceUID", "?"))


def load_dicom_series(
    folder_or_files: str | Path | Sequence[str | Path],
    *,
    thickness: float | None = None,
    psf: PSFKind = "gaussian",
) -> Stack:
    """Load one DICOM series of parallel slices (a folder, one multi-frame file, or a list of files) as a Stack.

    Returns data ``(n_slices, ni = cols, nj = rows)`` float32 with ``RescaleSlope``/``RescaleIntercept`` applied
    and ``slice_to_world`` mapping each slice frame to world mm **RAS** (see the module docstring for the axes).
    Files that are not DICOM images are skipped. Raises SlicefieldError naming the file or folder for
    unreadable files, several series, slices of several orientations or sizes, or repeated positions.

    thickness (mm): the argument, else ``SliceThickness``, else the slice spacing.
    """
    if psf not in PSF_KINDS:
        raise SlicefieldError(f"psf must be one of {', '.join(PSF_KINDS)}, got {psf!r}")
    files, root = _list_files(folder_or_files)
    series: dict[str, list[tuple[pydicom.Dataset, Path]]] = {}
    for f in files:
        ds = _read(f)
        if ds is None or "PixelData" not in ds:
            log.debug("%s: not a DICOM image, skipped", f)
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((ds, f))
    if not series:
        raise SlicefieldError("contains no DICOM images", path=root, fix="pass the folder of one DICOM series")
    if len(series) > 1:
        labels = ", ".join(_series_label(items[0][0]) for items in series.values())
        raise SlicefieldError(
            f"contains {len(series)} series: {labels}",
            path=root,
            fix="pass the folder (or files) of one series",
        )
    (items,) = series.values()
    first = items[0][0]
    frames = [fr for ds, f in items for fr in _frames(ds, f)]

    ref = frames[0]
    for fr in frames[1:]:
        if np.abs(fr.orientation - ref.orientation).max() > ORIENTATION_TOL:
            raise SlicefieldError(
                f"has slices in several orientations (e.g. {fr.source.name} vs {ref.source.name})",
                path=root,
                fix="pass a series of parallel slices (not a localizer)",
            )
        if fr.pixels.shape != ref.pixels.shape or not np.allclose(fr.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise SlicefieldError(
                f"image size or pixel spacing differs from {ref.source.name}",
                path=fr.source,
                fix="pass one series of equally sized slices",
            )
    row_dir = ref.orientation[:3] / np.linalg.norm(ref.orientation[:3])
    col_dir = ref.orientation[3:] / np.linalg.norm(ref.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(positions, kind="stable")
    frames = [frames[k] for k in order]
    positions = positions[order]
    steps = np.diff(positions)
    if np.any(steps < SAME_POSITION_MM):
        k = int(np.argmax(steps < SAME_POSITION_MM))
        raise SlicefieldError(
            f"two slices at the same position ({frames[k].source.name}, {frames[k + 1].source.name}); "
            "several echoes, time points or stacks in one series?",
            path=root,
            fix="pass the files of one volume only",
        )

    n = len(frames)
    rotation = LPS_TO_RAS @ np.stack([row_dir, col_dir, normal], axis=1)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = rotation
    poses[:, :3, 3] = np.stack([LPS_TO_RAS @ fr.position for fr in frames])
    data = np.stack([fr.pixels.T for fr in frames]).astype(np.float32)
    spacing = (ref.pixel_spacing[1], ref.pixel_spacing[0])

    source = "argument"
    if thickness is None:
        header = [fr.thickness for fr in frames if fr.thickness is not None and fr.thickness > 0]
        if header:
            thickness, source = float(np.median(header)), "SliceThickness"
        elif n > 1:
            thickness, source = float(np.median(steps)), "slice spacing"
        else:
            raise SlicefieldError("single slice without SliceThickness", path=root, fix="pass --thickness")
    if not (np.isfinite(thickness) and thickness > 0):
        raise SlicefieldError(f"thickness must be a positive number of mm, got {thickness}", path=root)

    name = root.name if root.is_dir() else Path(root.name).stem
    stack = Stack(data=data, slice_to_world=poses, spacing=spacing, thickness=thickness, psf=psf, name=name)
    stack.meta.update(
        {
            "path": str(root),
            "files": [str(fr.source) for fr in frames],
            "series_uid": str(first.get("SeriesInstanceUID", "")),
            "series_description": str(first.get("SeriesDescription", "")),
            "thickness_source": source,
        }
    )
    return stack
