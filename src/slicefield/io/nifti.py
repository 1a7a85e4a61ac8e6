"""NIfTI input and output (nibabel), with the header checks done before any data is read.

Frames: a NIfTI affine maps voxel indices ``(i, j, k)`` to world mm RAS, which is slicefield's world frame
(see :mod:`slicefield.geometry`). The sform is used when its code is > 0 (unless ``use_qform``), else the
qform; a file with neither gets nibabel's scaling-only fallback affine and a logged warning.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from numpy.typing import DTypeLike

from ..errors import SlicefieldError
from ..geometry import apply_affine, orthogonality_error_deg
from ..volume import MAX_SHEAR_DEG, PSF_KINDS, PSFKind, Stack, Volume
from .atomic import atomic_path

log = logging.getLogger(__name__)

#: Largest distance (mm) allowed between the sform and qform positions of any corner of the field of view.
MAX_SFORM_QFORM_MM = 1.0

#: NIfTI xform code written by :func:`save_volume`: 1 = scanner anatomical coordinates.
XFORM_CODE_SCANNER = 1

#: Exceptions nibabel, gzip and zlib raise for unreadable, corrupt or truncated files.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, OverflowError, struct.error)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def image_stem(path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (or its last suffix): ``sub-01_T2w.nii.gz`` -> ``sub-01_T2w``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def sidecar_path(path: str | Path) -> Path:
    """The BIDS-style JSON sidecar next to an image: ``dir/stem.json``."""
    p = Path(path)
    return p.with_name(image_stem(p) + ".json")


def _read_error(path: Path, e: BaseException) -> SlicefieldError:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    return SlicefieldError(
        f"cannot read as NIfTI ({detail})",
        path=path,
        fix="check that it is a complete .nii or .nii.gz file (re-export or re-copy it)",
    )


def _fov_corners(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel coordinates of the 8 outer corners of the field of view (voxel edges, not centres), ``(8, 3)``."""
    lo, hi = -0.5, np.asarray(shape[:3], dtype=float) - 0.5
    return np.array([[a, b, c] for a in (lo, hi[0]) for b in (lo, hi[1]) for c in (lo, hi[2])])


def _choose_affine(img: nib.Nifti1Pair, path: Path, shape: tuple[int, int, int], use_qform: bool) -> np.ndarray:
    """The voxel -> world mm RAS affine of a NIfTI image, after the sform/qform and shear checks."""
    try:
        sform, scode = img.get_sform(coded=True)
        qform, qcode = img.get_qform(coded=True)
    except (ValueError, HeaderDataError) as e:  # e.g. a quaternion of norm > 1
        raise SlicefieldError(
            f"invalid sform or qform in the header ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            path=path,
            fix="fix the header's orientation fields (e.g. with fslorient or nibabel)",
        ) from e
    if sform is not None and qform is not None and not use_qform:
        corners = _fov_corners(shape)
        dist = float(np.linalg.norm(apply_affine(sform, corners) - apply_affine(qform, corners), axis=1).max())
        if dist > MAX_SFORM_QFORM_MM:
            raise SlicefieldError(
                f"sform and qform disagree by {dist:.1f} mm",
                path=path,
                fix="pass --use-qform or fix the header",
            )
    if use_qform:
        if qform is None:
            raise SlicefieldError("qform is not set (qform_code 0)", path=path, fix="drop --use-qform to use the sform")
        affine, source = qform, "qform"
    elif sform is not None:
        affine, source = sform, "sform"
    elif qform is not None:
        affine, source = qform, "qform"
    else:
        log.warning(
            "%s: neither sform nor qform is set; using the voxel sizes only (position and orientation unknown)",
            path,
        )
        affine, source = img.header.get_base_affine(), "fallback"
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise SlicefieldError(
            f"the {source} affine is singular or not finite", path=path, fix="fix the header (voxel sizes and xforms)"
        )
    shear = orthogonality_error_deg(affine)
    if shear > MAX_SHEAR_DEG:
        raise SlicefieldError(
            f"the {source} affine is sheared (axes {shear:.2f} degrees from orthogonal)",
            path=path,
            fix="resample the image onto an orthogonal grid first"
            + ("" if use_qform or qform is None else ", or pass --use-qform"),
        )
    return affine


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """3D shape of a NIfTI array shape: pads 2D with a singleton, squeezes singleton dims beyond the third."""
    if any(n == 0 for n in shape) or len(shape) == 0:
        raise SlicefieldError(f"image has zero size (shape {shape})", path=path, fix="check the file or its export")
    if len(shape) < 3:
        shape = tuple(shape) + (1,) * (3 - len(shape))
    extra = shape[3:]
    if any(n != 1 for n in extra):
        raise SlicefieldError(
            f"image is {len(shape)}D with shape {shape}, expected one 3D volume",
            path=path,
            fix="extract one volume, e.g. with fslroi",
        )
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def load_volume(path: str | Path, *, use_qform: bool = False) -> Volume:
    """Load a 3D NIfTI image as a :class:`Volume`.

    Returns data ``(X, Y, Z)`` float32 (``scl_slope``/``scl_inter`` applied) and the voxel -> world mm RAS
    affine. The header is checked before the data are read: missing file, not NIfTI, zero size, more than
    one volume (a 4D image with a singleton 4th dimension is squeezed), sform/qform disagreement by more
    than :data:`MAX_SFORM_QFORM_MM` at a corner of the field of view, sheared affine. Then the data are
    checked for NaN/Inf. Every problem raises a one-line :class:`SlicefieldError`.

    use_qform: use the qform even when the sform is set (and skip the disagreement check).
    """
    p = Path(path)
    if not p.exists():
        raise SlicefieldError("file not found", path=p, fix="check the path")
    if p.is_dir():
        raise SlicefieldError("is a folder, not a NIfTI file", path=p, fix="pass the .nii or .nii.gz file")
    try:
        img = nib.load(p)
    except _READ_ERRORS as e:
        raise _read_error(p, e) from e
    if not isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair):
        raise SlicefieldError(
            f"is a {type(img).__name__}, not a NIfTI image", path=p, fix="convert it to .nii.gz first"
        )
    shape = _spatial_shape(tuple(img.shape), p)
    affine = _choose_affine(img, p, shape, use_qform)
    try:
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except _READ_ERRORS as e:
        raise _read_error(p, e) from e
    data = np.asarray(data, dtype=np.float32).reshape(shape)
    bad = ~np.isfinite(data)
    if bad.any():
        raise SlicefieldError(
            f"{int(bad.sum())} voxels are NaN or Inf",
            path=p,
            fix="replace them, e.g. with numpy.nan_to_num, before reconstruction",
        )
    return Volume(data, affine)


def save_volume(volume: Volume, path: str | Path, *, dtype: DTypeLike = np.float32) -> Path:
    """Write a :class:`Volume` as NIfTI (``.nii`` or ``.nii.gz``), atomically; returns the path.

    The affine (voxel -> world mm RAS) is written to both sform and qform with code 1 (scanner), so it
    reads back identically in any tool; units are mm and s. A sheared affine cannot be stored in the
    qform: then only the sform is set (and :func:`load_volume` will refuse the file). ``dtype`` is the
    on-disk type; integer types are scaled by nibabel (``scl_slope``/``scl_inter``). The mask is not saved.
    """
    p = Path(path)
    affine = np.asarray(volume.affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), affine)
    img.set_data_dtype(np.dtype(dtype))
    img.set_sform(affine, code=XFORM_CODE_SCANNER)
    if orthogonality_error_deg(affine) <= MAX_SHEAR_DEG:
        img.set_qform(affine, code=XFORM_CODE_SCANNER)
    else:
        log.warning("%s: sheared affine, written to the sform only (qform_code 0)", p)
        img.set_qform(None, code=0)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    with atomic_path(p) as tmp:
        nib.save(img, tmp)
    return p


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The JSON sidecar of an image as a dict ({} when there is none)."""
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SlicefieldError(
            f"cannot read JSON sidecar ({e})", path=side, fix="fix the JSON or remove the file"
        ) from e
    if not isinstance(meta, dict):
        raise SlicefieldError("JSON sidecar is not an object", path=side, fix="fix the JSON or remove the file")
    return meta


def _positive_mm(value: Any, key: str, side: Path) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise SlicefieldError(
            f"{key} must be a positive number of mm, got {value!r}", path=side, fix=f"fix or remove {key}"
        )
    return v


def load_stack(
    path: str | Path,
    *,
    thickness: float | None = None,
    psf: PSFKind | None = None,
    slice_axis: int | None = None,
    use_qform: bool = False,
) -> Stack:
    """Load a NIfTI image as a :class:`Stack` of slices (data ``(n_slices, ni, nj)``, poses to world mm RAS).

    thickness (mm): the argument, else ``SliceThickness`` of the BIDS-style JSON sidecar ``stem.json`` next
        to the file, else the slice spacing (no gap).
    psf: the argument, else the sidecar's ``SlicefieldPSF`` (``"gaussian"`` or ``"box"``), else gaussian.
    slice_axis: array axis across slices; else the sidecar's ``SliceEncodingDirection`` (``i``/``j``/``k``,
        written by :func:`save_stack`), else the axis with the largest voxel size (see ``Stack.from_volume``).

    The stack is named after the file (without ``.nii``/``.nii.gz``); ``meta`` holds ``path`` and
    ``thickness_source`` (``"argument"``, ``"sidecar"`` or ``"slice spacing"``).
    """
    p = Path(path)
    volume = load_volume(p, use_qform=use_qform)
    side = sidecar_path(p)
    meta = _read_sidecar(p)
    source = "argument"
    if thickness is None and "SliceThickness" in meta:
        thickness = _positive_mm(meta["SliceThickness"], "SliceThickness", side)
        source = "sidecar"
    elif thickness is None:
        source = "slice spacing"
    elif not (math.isfinite(thickness) and thickness > 0):
        raise SlicefieldError(f"thickness must be a positive number of mm, got {thickness}", path=p)
    if psf is None:
        psf = meta.get("SlicefieldPSF", "gaussian")
        if psf not in PSF_KINDS:
            raise SlicefieldError(
                f"SlicefieldPSF must be one of {', '.join(PSF_KINDS)}, got {psf!r}", path=side, fix="fix the sidecar"
            )
    elif psf not in PSF_KINDS:
        raise SlicefieldError(f"psf must be one of {', '.join(PSF_KINDS)}, got {psf!r}", path=p)
    if slice_axis is None and "SliceEncodingDirection" in meta:
        direction = str(meta["SliceEncodingDirection"]).rstrip("-")
        if direction not in ("i", "j", "k"):
            raise SlicefieldError(
                f"SliceEncodingDirection must be i, j or k, got {meta['SliceEncodingDirection']!r}",
                path=side,
                fix="fix the sidecar",
            )
        slice_axis = "ijk".index(direction)
    if slice_axis is not None and slice_axis not in (0, 1, 2):
        raise SlicefieldError(f"slice axis must be 0, 1 or 2, got {slice_axis}", path=p)
    stack = Stack.from_volume(volume, slice_axis=slice_axis, thickness=thickness, psf=psf, name=image_stem(p))
    stack.meta.update({"path": str(p), "thickness_source": source})
    if meta:
        stack.meta["sidecar"] = str(side)
    return stack


def save_stack(stack: Stack, path: str | Path) -> Path:
    """Write a motion-free :class:`Stack` as a 3D NIfTI (axes ``(i, j, slice)``) plus its JSON sidecar.

    The sidecar ``stem.json`` holds ``SliceThickness`` (mm), ``SlicefieldPSF``, ``SpacingBetweenSlices`` (mm)
    and ``SliceEncodingDirection`` (``"k"``), so :func:`load_stack` reads the same stack back. Both files are
    written atomically. Raises SlicefieldError if the slices are not a regular grid (e.g. after motion).
    """
    p = Path(path)
    volume = stack.to_volume()
    save_volume(volume, p)
    sidecar = {
        "SliceThickness": stack.thickness,
        "SlicefieldPSF": stack.psf,
        "SpacingBetweenSlices": stack.slice_spacing,
        "SliceEncodingDirection": "k",
    }
    with atomic_path(sidecar_path(p)) as tmp:
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return p
