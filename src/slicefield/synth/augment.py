"""A population of (label map, T1) pairs from a few real ones: random affine + elastic deformations and
intensity variation.

Sampling and applying are separate (STYLE habit 5): :func:`sample_deformation` draws a :class:`Deformation`
(plain numbers, JSON-able, replayable), :func:`apply_deformation` applies it deterministically. The same spatial
transform moves the label map (nearest neighbour) and the image (linear); the intensity variation (gamma, gain,
smooth multiplicative bias) changes the image only.

Frames: the transform acts in world mm RAS about the grid's centre. For an output voxel at world ``x`` the value
is read from the source at ``c + R S (x - c) - t + u(x)`` with ``c`` the grid centre, ``R`` a rotation, ``S`` a
diagonal scale, ``t`` a translation (mm) and ``u`` a smooth displacement (mm): a cubic upsampling of a coarse
random grid of displacements. Output grid = input grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..geometry import apply_affine, rotation_matrix
from ..volume import Volume


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random deformations and intensity changes."""

    rotation_deg: float = 8.0
    """Rotation about each world axis, uniform in [-r, r] degrees."""
    scale: float = 0.08
    """Scale along each axis, uniform in [1 - s, 1 + s]."""
    translation_mm: float = 4.0
    """Translation along each axis, uniform in [-t, t] mm."""
    elastic_mm: float = 3.0
    """Standard deviation (mm) of the coarse elastic displacements."""
    elastic_grid: int = 5
    """Control points per axis of the coarse displacement grid."""
    gamma: float = 0.1
    """Intensity gamma exp(N(0, g))."""
    gain: float = 0.05
    """Global intensity gain, uniform in [1 - g, 1 + g]."""
    bias: float = 0.05
    """Standard deviation of the smooth log bias field (coarse 3x3x3 grid, cubic upsampling)."""


#: Control points per axis of the coarse bias-field grid.
BIAS_GRID = 3


@dataclass(frozen=True)
class Deformation:
    """One sampled deformation + intensity change (see the module docstring for the frame).

    rotation_deg: (3,) degrees about x, y, z. scale: (3,). translation_mm: (3,).
    elastic_mm: (g, g, g, 3) displacements in mm (world RAS) at the coarse control grid.
    gamma, gain: scalars. bias: (3, 3, 3) log bias at the coarse grid.
    """

    rotation_deg: tuple[float, float, float]
    scale: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    elastic_mm: np.ndarray
    gamma: float
    gain: float
    bias: np.ndarray

    def to_json(self) -> dict:
        return {
            "rotation_deg": list(self.rotation_deg),
            "scale": list(self.scale),
            "translation_mm": list(self.translation_mm),
            "elastic_mm": np.asarray(self.elastic_mm).tolist(),
            "gamma": self.gamma,
            "gain": self.gain,
            "bias": np.asarray(self.bias).tolist(),
        }

    @classmethod
    def from_json(cls, doc: dict) -> Deformation:
        return cls(
            rotation_deg=tuple(doc["rotation_deg"]),
            scale=tuple(doc["scale"]),
            translation_mm=tuple(doc["translation_mm"]),
            elastic_mm=np.asarray(doc["elastic_mm"], dtype=np.float64),
            gamma=float(doc["gamma"]),
            gain=float(doc["gain"]),
            bias=np.asarray(doc["bias"], dtype=np.float64),
        )

    @classmethod
    def identity(cls, *, elastic_grid: int = 5) -> Deformation:
        return cls(
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            (0.0, 0.0, 0.0),
            np.zeros((elastic_grid,) * 3 + (3,)),
            1.0,
            1.0,
            np.zeros((BIAS_GRID,) * 3),
        )


def sample_deformation(rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> Deformation:
    """Draw one :class:`Deformation` from the ranges of ``config``."""

    def triple(lo: float, hi: float) -> tuple[float, float, float]:
        return tuple(float(v) for v in rng.uniform(lo, hi, 3))  # type: ignore[return-value]

    g = config.elastic_grid
    return Deformation(
        rotation_deg=triple(-config.rotation_deg, config.rotation_deg),
        scale=triple(1 - config.scale, 1 + config.scale),
        translation_mm=triple(-config.translation_mm, config.translation_mm),
        elastic_mm=rng.normal(0.0, config.elastic_mm, (g, g, g, 3)),
        gamma=float(np.exp(rng.normal(0.0, config.gamma))),
        gain=float(rng.uniform(1 - config.gain, 1 + config.gain)),
        bias=rng.normal(0.0, config.bias, (BIAS_GRID,) * 3),
    )


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Cubic upsampling of a coarse grid spanning the whole field of view onto ``shape`` voxels."""
    coords = [np.linspace(0, coarse.shape[a] - 1, shape[a]) for a in range(3)]
    grid = np.meshgrid(*coords, indexing="ij")
    return ndimage.map_coordinates(coarse, grid, order=3, mode="nearest")


def source_voxels(shape: tuple[int, int, int], affine: np.ndarray, d: Deformation) -> np.ndarray:
    """Voxel coordinates ``(3, X, Y, Z)`` in the source grid that each output voxel reads (same grid)."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    xyz = apply_affine(affine, ijk)
    centre = apply_affine(affine, (np.array(shape, dtype=np.float64) - 1) / 2)
    m = rotation_matrix(np.asarray(d.rotation_deg)) @ np.diag(d.scale)
    src = centre + (xyz - centre) @ m.T - np.asarray(d.translation_mm)
    for a in range(3):
        src[:, a] += _upsample(np.asarray(d.elastic_mm)[..., a], shape).ravel()
    return apply_affine(np.linalg.inv(affine), src).T.reshape(3, *shape)


def apply_deformation(labels: Volume, image: Volume, d: Deformation) -> tuple[Volume, Volume]:
    """Apply one deformation to a pair on the same grid; returns ``(labels, image)`` on that grid.

    Labels: nearest neighbour (stay integers), 0 outside the source. Image: linear, 0 outside, then
    ``gain * exp(bias(x)) * image**gamma`` on the image scaled to [0, 1] by its max (and scaled back).
    """
    if labels.shape != image.shape or not np.allclose(labels.affine, image.affine, atol=1e-4):
        raise ValueError("labels and image must share a grid")
    coords = source_voxels(labels.shape, labels.affine, d)
    lab = ndimage.map_coordinates(labels.data, coords, order=0, mode="constant", cval=0.0)
    return Volume(lab.astype(np.float32), labels.affine.copy()), _deform_image(image, d, coords)


def deform_image(image: Volume, d: Deformation) -> Volume:
    """The image half of :func:`apply_deformation`, for an image without a label map (same result)."""
    return _deform_image(image, d, source_voxels(image.shape, image.affine, d))


def _deform_image(image: Volume, d: Deformation, coords: np.ndarray) -> Volume:
    img = ndimage.map_coordinates(image.data, coords, order=1, mode="constant", cval=0.0)
    top = float(image.data.max())
    if top > 0:
        img = np.clip(img / top, 0.0, None) ** d.gamma * top
    img = img * d.gain * np.exp(_upsample(np.asarray(d.bias), image.shape))
    return Volume(img.astype(np.float32), image.affine.copy())


def population(
    labels: Volume,
    image: Volume,
    *,
    n: int,
    seed: int,
    config: AugmentConfig = AugmentConfig(),
) -> list[tuple[Volume, Volume, Deformation]]:
    """``n`` deformed copies ``(labels, image, deformation)`` of one pair, drawn with ``numpy`` seed ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        d = sample_deformation(rng, config)
        lab, img = apply_deformation(labels, image, d)
        out.append((lab, img, d))
    return out
