"""Small shared phantoms for the physics tests (tiny, deterministic, no files, no network)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from slicefield.volume import Volume

#: Side of the brain-like phantom in voxels (1 mm isotropic).
PHANTOM_SIDE = 40
#: World position (mm RAS) of the phantom's voxel (0, 0, 0); integers, so every affine entry is exact in float32.
PHANTOM_ORIGIN_MM = (-20.0, -23.0, -17.0)


def brain_phantom(side: int = PHANTOM_SIDE) -> Volume:
    """A smooth-but-structured head-like phantom on a ``side``^3 grid of 1 mm voxels, RAS affine.

    An outer "scalp" shell, a "brain" ellipsoid with a low-frequency texture, two dark "ventricles" and a
    bright off-centre blob, blurred by 0.8 voxel so edges are a little over a voxel wide. Intensities in
    roughly [0, 1.1], background exactly 0 far from the head.
    """
    ijk = np.indices((side,) * 3, dtype=np.float64)
    c = (side - 1) / 2.0
    u = [(ijk[a] - c) / (side / 2.0) for a in range(3)]  # about [-1, 1] across the grid

    def ellipsoid(center, radii):
        return sum(((u[a] - center[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0

    head = ellipsoid((0.0, 0.0, 0.0), (0.82, 0.9, 0.78))
    brain = ellipsoid((0.0, 0.02, 0.0), (0.7, 0.78, 0.66))
    vent_l = ellipsoid((-0.16, 0.05, 0.05), (0.1, 0.3, 0.16))
    vent_r = ellipsoid((0.16, 0.05, 0.05), (0.1, 0.3, 0.16))
    blob = ellipsoid((0.3, -0.35, -0.25), (0.16, 0.14, 0.18))
    texture = 0.12 * np.sin(3.1 * u[0] + 0.4) * np.cos(2.3 * u[1] - 0.2) * np.sin(2.7 * u[2] + 1.0)
    data = np.where(head, 0.35, 0.0)
    data = np.where(brain, 0.7 + texture, data)
    data = np.where(vent_l | vent_r, 0.15, data)
    data = np.where(blob, 1.0, data)
    data = ndimage.gaussian_filter(data, 0.8)
    affine = np.eye(4)
    affine[:3, 3] = PHANTOM_ORIGIN_MM
    return Volume(data.astype(np.float32), affine)


@pytest.fixture(scope="session")
def phantom() -> Volume:
    """The 40^3, 1 mm, RAS brain-like phantom (shared; do not modify in place)."""
    return brain_phantom()
