"""A views folder: rendered images, their cameras and the subject's grid, written and read back.

Layout::

    views/
      cameras.json     frames, units, the subject grid (shape, affine), orbit + render config, one entry per view
                       (index, angle, image file, intrinsics, camera_to_world / world_to_camera in world mm RAS)
      views.npy        (n_views, H, W) float32, the rendered values (units in cameras.json)
      view_000.png ... 8- or 16-bit greyscale, linear from png_min (0) to png_max (full scale), shared by all views
      turntable.gif    the views as an animation (8-bit)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import SlicefieldError
from ..io.atomic import atomic_path
from ..runs import to_jsonable
from .cameras import FRAMES_DOC, Camera

CAMERAS_FILE = "cameras.json"
VIEWS_FILE = "views.npy"
GIF_FILE = "turntable.gif"
#: Frame duration of the turntable GIF (ms).
GIF_FRAME_MS = 60
PNG_BITS: tuple[int, ...] = (8, 16)


@dataclass
class Views:
    """A rendered orbit: images ``(n, H, W)`` float32, their cameras, and what the views folder records."""

    images: np.ndarray
    cameras: list[Camera]
    angles_deg: list[float]
    meta: dict[str, Any]

    @property
    def subject_shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.meta["subject"]["shape"])  # type: ignore[return-value]

    @property
    def subject_affine(self) -> np.ndarray:
        return np.asarray(self.meta["subject"]["affine"], dtype=np.float64)


def to_uint(images: np.ndarray, *, bits: int, lo: float, hi: float) -> np.ndarray:
    """Linear map ``[lo, hi] -> [0, 2^bits - 1]`` with clipping, rounded; uint8 or uint16."""
    if bits not in PNG_BITS:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = 2**bits - 1
    scaled = (np.asarray(images, dtype=np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    return np.rint(np.clip(scaled, 0.0, 1.0) * top).astype(np.uint8 if bits == 8 else np.uint16)


def write_gif(path: str | Path, images: np.ndarray, *, lo: float, hi: float) -> Path:
    """A looping 8-bit greyscale GIF of ``images`` ``(n, H, W)`` (Pillow)."""
    from PIL import Image

    frames = [Image.fromarray(a) for a in to_uint(images, bits=8, lo=lo, hi=hi)]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return Path(path)


def write_views(
    out_dir: str | Path,
    images: np.ndarray,
    cameras: Sequence[Camera],
    *,
    angles_deg: Sequence[float],
    meta: dict[str, Any],
    bits: int = 16,
    gif: bool = True,
) -> Path:
    """Write a views folder (see the module docstring). meta: JSON-able; must hold ``subject`` ``{shape,
    affine}`` and ``units``. Returns the folder."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = np.asarray(images, dtype=np.float32)
    lo, hi = float(images.min()), float(images.max())
    entries = []
    for k, (img, cam, angle) in enumerate(zip(images, cameras, angles_deg, strict=True)):
        name = f"view_{k:03d}.png"
        arr = to_uint(img, bits=bits, lo=lo, hi=hi)
        with atomic_path(out / name) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
        entries.append({"index": k, "angle_deg": float(angle), "image": name, **cam.to_json()})
    with atomic_path(out / VIEWS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, images)
    doc = {
        "slicefield_version": __version__,
        "frames": FRAMES_DOC,
        **meta,
        "png": {"bits": bits, "png_min": lo, "png_max": hi, "note": "value = png_min + png / (2^bits - 1) * range"},
        "views_npy": VIEWS_FILE,
        "views": entries,
    }
    with atomic_path(out / CAMERAS_FILE) as tmp:
        tmp.write_text(json.dumps(to_jsonable(doc), indent=1) + "\n", encoding="utf-8")
    if gif:
        write_gif(out / GIF_FILE, images, lo=lo, hi=hi)
    return out


def read_views(folder: str | Path) -> Views:
    """Read a views folder written by :func:`write_views` (``slicefield render``)."""
    folder = Path(folder)
    cam_path = folder / CAMERAS_FILE
    if not cam_path.is_file():
        raise SlicefieldError(
            f"no {CAMERAS_FILE} here: not a views folder", path=folder, fix="pass a folder written by slicefield render"
        )
    try:
        doc = json.loads(cam_path.read_text(encoding="utf-8"))
        cameras = [Camera.from_json(v) for v in doc["views"]]
        angles = [float(v["angle_deg"]) for v in doc["views"]]
        _ = doc["subject"]["shape"], doc["subject"]["affine"]
    except (ValueError, KeyError, TypeError) as e:
        raise SlicefieldError(
            f"unreadable camera file ({type(e).__name__}: {e})", path=cam_path, fix="re-render the views"
        ) from e
    npy = folder / doc.get("views_npy", VIEWS_FILE)
    if not npy.is_file():
        raise SlicefieldError("the views array is missing", path=npy, fix="re-render the views")
    images = np.load(npy, allow_pickle=False)
    if images.ndim != 3 or len(images) != len(cameras):
        raise SlicefieldError(
            f"holds {images.shape} but {CAMERAS_FILE} lists {len(cameras)} views", path=npy, fix="re-render the views"
        )
    for k, cam in enumerate(cameras):
        if images.shape[1:] != (cam.height, cam.width):
            raise SlicefieldError(
                f"view {k} is {images.shape[1:]} but its camera is {cam.height} x {cam.width}",
                path=npy,
                fix="re-render the views",
            )
    return Views(images=images.astype(np.float32), cameras=cameras, angles_deg=angles, meta=doc)
