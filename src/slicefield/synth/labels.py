"""Tissue label maps and (label map, T1) pairs on one grid.

Labels are integers stored as float32 NIfTI values: 0 background, 1 CSF, 2 grey matter, 3 white matter
(:data:`TISSUE_CLASSES`). A user's own label maps may have more classes (any non-negative integers); every
function here keeps them as they are.

Two ways to get labels:

- :func:`gmm_labels`: a 3-class Gaussian mixture fitted (EM) to the T1 intensities inside a brain mask
  (``slicefield.metrics.foreground_mask`` unless one is given). Classes are sorted by mean intensity, so on a T1
  the darkest is CSF, the middle GM, the brightest WM. No spatial prior, no bias-field correction: a fast,
  documented stand-in for a segmentation tool, good enough on skull-stripped, bias-corrected templates.
- :func:`mni152_pair`: nilearn's MNI152 2009a T1 and its GM/WM probability maps (shipped in nilearn's wheel, stored
  as 0..255); inside the brain mask, each voxel takes the most probable of CSF (``1 - p_GM - p_WM``), GM and WM.

A pairs folder holds ``<name>_labels.nii.gz`` beside ``<name>_t1.nii.gz`` (:func:`save_pair`, :func:`load_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import packaged_file
from ..errors import SlicefieldError
from ..metrics import foreground_mask
from ..volume import Volume

#: Label values and names of the default tissue classes.
TISSUE_CLASSES = {0: "background", 1: "csf", 2: "gm", 3: "wm"}
#: nilearn's MNI152 2009a grey- and white-matter probability maps (same grid as ``slicefield.data.MNI152_T1``).
MNI152_GM = ("nilearn", "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
MNI152_WM = ("nilearn", "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
#: nilearn stores the MNI152 GM/WM probabilities as 0..255 (uint8 scaled); divide by this to get 0..1.
MNI152_PROBABILITY_SCALE = 255.0
#: File name endings of the two members of a pair in a pairs folder.
LABELS_SUFFIX = "_labels.nii.gz"
IMAGE_SUFFIX = "_t1.nii.gz"
#: Percentiles of the brain's intensities spanned by the initial mixture means of :func:`gmm_labels`.
INIT_PERCENTILES = (1.0, 99.0)
#: Percentile of the brain's intensities mapped to 1 by :func:`normalise_intensity`.
INTENSITY_PERCENTILE = 99.5


@dataclass(frozen=True)
class GMMConfig:
    """Options of the Gaussian-mixture tissue labelling."""

    classes: int = 3
    """Tissue classes inside the mask (labels 1..classes, darkest first)."""
    iterations: int = 100
    """Most EM iterations."""
    tolerance: float = 1e-6
    """Stop when the mean log-likelihood per voxel changes less than this."""


def gmm_labels(image: Volume, *, mask: np.ndarray | None = None, config: GMMConfig = GMMConfig()) -> Volume:
    """Tissue labels of a T1 by a 1D Gaussian mixture (EM) on the intensities inside a brain mask.

    image: the T1, ``(X, Y, Z)``, any intensity units. mask: bool ``(X, Y, Z)`` brain mask; default
    :func:`slicefield.metrics.foreground_mask` of the image. The mixture is initialised at the
    points ``lo + (k + 0.5) / classes * (hi - lo)``, with ``lo``, ``hi`` the :data:`INIT_PERCENTILES` of the masked
    intensities (evenly spaced, so a small bright class still gets a component), equal weights and the masked
    variance / classes²,
    then iterated. Returns a Volume on the image's grid (same affine) with 0 outside the mask and 1..classes inside,
    ordered by component mean (T1: 1 CSF, 2 GM, 3 WM). Deterministic.
    """
    if mask is None:
        mask = foreground_mask(image.data)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} != image shape {image.shape}")
    x = image.data[mask].astype(np.float64)
    k = config.classes
    if x.size < 10 * k or x.min() == x.max():
        raise SlicefieldError(
            "too few distinct intensities inside the brain mask for a tissue mixture",
            fix="check that the image is a T1 with the brain inside the field of view",
        )
    lo, hi = np.percentile(x, INIT_PERCENTILES)
    means = lo + (np.arange(k) + 0.5) / k * (hi - lo)
    variances = np.full(k, x.var() / k**2)
    weights = np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(config.iterations):
        log_p = (
            np.log(weights)[None]
            - 0.5 * np.log(2 * np.pi * variances)[None]
            - 0.5 * (x[:, None] - means[None]) ** 2 / variances[None]
        )
        top = log_p.max(axis=1, keepdims=True)
        log_norm = top + np.log(np.exp(log_p - top).sum(axis=1, keepdims=True))
        resp = np.exp(log_p - log_norm)
        nk = resp.sum(axis=0) + 1e-12
        weights = nk / nk.sum()
        means = (resp * x[:, None]).sum(axis=0) / nk
        variances = np.maximum((resp * (x[:, None] - means[None]) ** 2).sum(axis=0) / nk, 1e-12 * x.var() + 1e-12)
        ll = float(log_norm.mean())
        if abs(ll - previous) < config.tolerance:
            break
        previous = ll
    order = np.argsort(means)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(1, k + 1)
    labels = np.zeros(image.shape, dtype=np.float32)
    labels[mask] = rank[np.argmax(resp, axis=1)]
    return Volume(labels, image.affine.copy())


def labels_from_probabilities(gm: np.ndarray, wm: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Labels ``(X, Y, Z)`` float32 from GM and WM probability maps: inside ``mask`` the most probable of
    CSF (``1 - gm - wm``, clipped at 0), GM and WM (labels 1, 2, 3); 0 outside."""
    csf = np.clip(1.0 - gm - wm, 0.0, None)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.float32)
    labels[~np.asarray(mask, dtype=bool)] = 0.0
    return labels


def mni152_pair() -> tuple[Volume, Volume]:
    """(labels, T1) of nilearn's MNI152 2009a template at 1 mm: labels from its GM/WM maps inside the T1's
    foreground mask (:func:`labels_from_probabilities`), both on the T1's grid. No network."""
    from ..data import mni152_t1_path
    from ..io import load_volume

    t1 = load_volume(mni152_t1_path())
    gm = load_volume(packaged_file(*MNI152_GM)).data / MNI152_PROBABILITY_SCALE
    wm = load_volume(packaged_file(*MNI152_WM)).data / MNI152_PROBABILITY_SCALE
    labels = labels_from_probabilities(gm, wm, foreground_mask(t1.data))
    return Volume(labels, t1.affine.copy()), t1


def n_classes(labels: np.ndarray) -> int:
    """Number of one-hot channels a label map needs: its largest label + 1 (labels must be integers >= 0)."""
    values = np.asarray(labels)
    if values.min() < 0 or not np.allclose(values, np.round(values)):
        raise SlicefieldError(
            "a label map must hold non-negative integers", fix="pass a tissue label map (0 background, 1..N tissues)"
        )
    return int(values.max()) + 1


def normalise_intensity(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Intensities scaled so the :data:`INTENSITY_PERCENTILE` th percentile inside ``mask`` is 1, clipped to
    [0, 1]; ``(X, Y, Z)`` float32 (dimensionless). Used for training targets and for evaluation."""
    mask = np.asarray(mask, dtype=bool)
    values = data[mask] if mask.any() else data.ravel()
    top = float(np.percentile(values, INTENSITY_PERCENTILE))
    if top <= 0:
        raise SlicefieldError("the brain's intensities are not positive", fix="pass a T1 with positive values")
    return np.clip(data / top, 0.0, 1.0).astype(np.float32)


def save_pair(folder: str | Path, name: str, labels: Volume, image: Volume) -> tuple[Path, Path]:
    """Write ``<folder>/<name>_labels.nii.gz`` and ``<name>_t1.nii.gz`` (atomically); returns both paths."""
    from ..io import save_volume

    folder = Path(folder)
    if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-4):
        raise ValueError(f"pair {name!r}: labels and image are on different grids")
    return (
        save_volume(labels, folder / f"{name}{LABELS_SUFFIX}"),
        save_volume(image, folder / f"{name}{IMAGE_SUFFIX}"),
    )


def load_pairs(folder: str | Path) -> list[tuple[str, Volume, Volume]]:
    """All ``(name, labels, image)`` pairs of a pairs folder, sorted by name; each pair checked to share a grid."""
    from ..io import load_volume

    folder = Path(folder)
    if not folder.is_dir():
        raise SlicefieldError("not a folder", path=folder, fix="pass the folder of *_labels / *_t1 pairs")
    pairs = []
    for lab in sorted(folder.glob(f"*{LABELS_SUFFIX}")):
        name = lab.name[: -len(LABELS_SUFFIX)]
        img = folder / f"{name}{IMAGE_SUFFIX}"
        if not img.exists():
            raise SlicefieldError(f"{lab.name} has no partner {img.name}", path=folder, fix="add it or remove both")
        labels, image = load_volume(lab), load_volume(img)
        if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-3):
            raise SlicefieldError(
                f"pair {name!r}: labels and T1 are on different grids",
                path=img,
                fix="resample the label map onto the T1's grid (nearest neighbour)",
            )
        n_classes(labels.data)
        pairs.append((name, labels, image))
    if not pairs:
        raise SlicefieldError(
            f"no *{LABELS_SUFFIX} / *{IMAGE_SUFFIX} pairs", path=folder, fix="write some with `slicefield synth pairs`"
        )
    return pairs
