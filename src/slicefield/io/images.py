"""A folder of 2D image files (PNG, TIFF, ...), one slice per file, as a :class:`Stack`.

Image files carry no geometry, so the caller gives the pixel size and the slice thickness or spacing, and
picks an orientation. Files are sorted naturally by name (``slice_2`` before ``slice_10``).

Axes: an image is read as displayed, image right = slice-frame ``+x`` and image up = ``+y``. Stack data are
``(n_slices, ni, nj)`` with ``ni`` = image columns and ``nj`` = image rows, bottom row first:
``data[s, i, j] = image_s[rows - 1 - j, i]``. The orientation maps the slice frame to world mm RAS:

- ``"axial"``: x = R, y = A, normal = S
- ``"coronal"``: x = R, y = S, normal = A (a reflection)
- ``"sagittal"``: x = A, y = S, normal = R

The centre of the stack (middle of the middle slice) is placed at the world origin.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import SlicefieldError
from ..volume import PSF_KINDS, PSFKind, Stack

Orientation = Literal["axial", "coronal", "sagittal"]

#: Slice frame axes (x, y, normal) in world RAS for each orientation, as the columns of a 3x3 matrix.
ORIENTATIONS: dict[str, np.ndarray] = {
    "axial": np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]).T,
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]).T,
    "sagittal": np.array([[0, 1.0, 0], [0, 0, 1], [1, 0, 0]]).T,
}

PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm")
TIFF_SUFFIXES = (".tif", ".tiff")

#: ITU-R BT.601 luma weights for converting RGB to grey.
LUMA_RGB = np.array([0.299, 0.587, 0.114])


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``slice_2`` < ``slice_10``."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name) if t)


def _to_grey(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].astype(np.float64) @ LUMA_RGB
    elif arr.ndim == 3 and arr.shape[-1] == 2:  # grey + alpha
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise SlicefieldError(
            f"image has shape {arr.shape}, expected one 2D slice", path=path, fix="save one slice per file"
        )
    return np.asarray(arr, dtype=np.float32)


def _read_image(path: Path) -> np.ndarray:
    """A greyscale image file as ``(rows, cols)`` float32."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            try:
                import tifffile
            except ImportError:
                tifffile = None
            if tifffile is not None:
                return _to_grey(np.asarray(tifffile.imread(path)), path)
        from PIL import Image

        with Image.open(path) as im:
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                im = im.convert("RGB" if im.mode != "1" else "L")
            return _to_grey(np.asarray(im), path)
    except SlicefieldError:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise SlicefieldError(f"cannot read image ({e})", path=path, fix="re-export it or remove it") from e


def load_image_folder(
    folder: str | Path,
    *,
    spacing: float | Sequence[float],
    thickness: float | None = None,
    slice_spacing: float | None = None,
    orientation: Orientation = "axial",
    psf: PSFKind = "gaussian",
) -> Stack:
    """Load a folder of 2D greyscale images (one slice per file, natural name order) as a Stack.

    spacing: in-plane pixel size in mm, one number or ``(dx, dy)`` (image columns, image rows).
    thickness, slice_spacing: mm; each defaults to the other, and at least one is required.
    orientation: stack frame in world mm RAS (see the module docstring).

    Returns data ``(n_slices, ni = cols, nj = rows)`` float32 and slice poses to world mm RAS, the stack
    centred at the world origin. Raises SlicefieldError for an empty folder, unreadable images or images of
    different sizes (naming the file).
    """
    root = Path(folder)
    if not root.is_dir():
        raise SlicefieldError("is not a folder", path=root, fix="pass the folder that holds the slice images")
    if orientation not in ORIENTATIONS:
        raise SlicefieldError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if psf not in PSF_KINDS:
        raise SlicefieldError(f"psf must be one of {', '.join(PSF_KINDS)}, got {psf!r}")
    dxdy = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,))
    if thickness is None and slice_spacing is None:
        raise SlicefieldError(
            "slice thickness unknown (image files carry no geometry)", path=root, fix="pass --thickness"
        )
    thickness = float(slice_spacing if thickness is None else thickness)
    slice_spacing = float(thickness if slice_spacing is None else slice_spacing)
    if not (np.all(dxdy > 0) and thickness > 0 and slice_spacing > 0):
        raise SlicefieldError("spacing, thickness and slice spacing must be positive mm", path=root)

    suffixes = PILLOW_SUFFIXES + TIFF_SUFFIXES
    files = sorted(
        (f for f in root.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in suffixes),
        key=lambda f: natural_key(f.name),
    )
    if not files:
        raise SlicefieldError(f"contains no image files ({', '.join(suffixes)})", path=root, fix="check the folder")
    images = []
    for f in files:
        img = _read_image(f)
        if images and img.shape != images[0].shape:
            raise SlicefieldError(
                f"image is {img.shape[1]} x {img.shape[0]} pixels but {files[0].name} is "
                f"{images[0].shape[1]} x {images[0].shape[0]}",
                path=f,
                fix="pass slices of one size (crop or pad them)",
            )
        images.append(img)
    # (rows, cols) image, row 0 at the top -> (ni = cols, nj = rows), j = 0 at the bottom.
    data = np.stack([img[::-1, :].T for img in images])
    n, ni, nj = data.shape

    axes = ORIENTATIONS[orientation]
    centre = np.array([(ni - 1) * dxdy[0], (nj - 1) * dxdy[1], 0.0]) / 2
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = axes
    offsets = (np.arange(n) - (n - 1) / 2) * slice_spacing
    poses[:, :3, 3] = offsets[:, None] * axes[:, 2][None] - axes @ centre
    stack = Stack(
        data=data, slice_to_world=poses, spacing=(dxdy[0], dxdy[1]), thickness=thickness, psf=psf, name=root.name
    )
    stack.meta.update({"path": str(root), "files": [str(f) for f in files], "orientation": orientation})
    return stack
