"""Tests for slicefield.figures: PNGs are written, sized and not blank; display orientation is independent of
the array axis order (RAS vs LPS vs permuted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slicefield.figures import DisplayGrid, difference_maps, orthogonal_planes, orthogonal_slices
from slicefield.volume import Volume

SPACING = (2.0, 2.0, 3.0)
SHAPE = (20, 24, 16)


def _world_grid() -> tuple[np.ndarray, np.ndarray]:
    """World mm RAS of the voxel centres of a RAS grid centred on the origin, ``(X, Y, Z, 3)``, and its affine."""
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -(np.array(SHAPE) - 1) / 2 * np.array(SPACING)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3], affine


def _phantom_ras() -> Volume:
    """Ellipsoid 'head' whose right hemisphere (x > 0) is brighter, with an anterior (y > 0) and superior marker."""
    xyz, affine = _world_grid()
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    head = (x / 18) ** 2 + (y / 22) ** 2 + (z / 20) ** 2 < 1
    data = head * np.where(x > 0, 2.0, 1.0) + head * (y > 10) * 0.5 + head * (z > 10) * 0.25
    return Volume(data.astype(np.float32), affine)


def _as_lps(vol: Volume) -> Volume:
    """The same image with array axes running L->R reversed (x) and P->A reversed (y): LPS array order."""
    data = vol.data[::-1, ::-1, :].copy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    return Volume(data, vol.affine @ flip)


def _as_permuted(vol: Volume) -> Volume:
    """The same image with array axes ordered (z, x, y)."""
    perm = (2, 0, 1)
    affine = np.eye(4)
    affine[:3, :3] = vol.affine[:3, :3][:, perm]
    affine[:3, 3] = vol.affine[:3, 3]
    return Volume(np.transpose(vol.data, perm).copy(), affine)


def test_lps_and_permuted_give_identical_display_arrays() -> None:
    ras = _phantom_ras()
    grid = DisplayGrid.covering(ras, pixel_mm=1.0)
    center = np.array([1.0, -2.0, 1.5])
    expected = orthogonal_planes(ras, center, grid=grid)
    for other in (_as_lps(ras), _as_permuted(ras), _as_permuted(_as_lps(ras))):
        assert DisplayGrid.covering(other, pixel_mm=1.0).shape == grid.shape
        for a, b in zip(expected, orthogonal_planes(other, center, grid=grid), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)


def test_display_convention_neurological_anterior_superior_up() -> None:
    ras = _phantom_ras()
    grid = DisplayGrid.covering(ras, pixel_mm=1.0)
    axial, coronal, sagittal = orthogonal_planes(_as_lps(ras), np.array([0.0, 0.0, 5.0]), grid=grid)
    assert axial.shape == (grid.shape[1], grid.shape[0])
    assert coronal.shape == (grid.shape[2], grid.shape[0])
    assert sagittal.shape == (grid.shape[2], grid.shape[1])
    w = axial.shape[1]
    # Neurological: patient right (bright) on image right, in axial and coronal.
    assert np.nanmean(axial[:, w // 2 + 2 :]) > np.nanmean(axial[:, : w // 2 - 2])
    assert np.nanmean(coronal[:, w // 2 + 2 :]) > np.nanmean(coronal[:, : w // 2 - 2])
    # Anterior marker up in axial; superior marker up in coronal; anterior on image right in sagittal.
    h = axial.shape[0]
    assert np.nanmax(axial[: h // 2 - 8]) > np.nanmax(axial[h // 2 + 8 :])
    ch = coronal.shape[0]
    assert np.nanmax(coronal[: ch // 2 - 8]) > np.nanmax(coronal[ch // 2 + 8 :])
    sw = sagittal.shape[1]
    assert np.nanmax(sagittal[:, sw // 2 + 8 :]) > np.nanmax(sagittal[:, : sw // 2 - 8])


def test_outside_volume_is_nan() -> None:
    ras = _phantom_ras()
    small = Volume(ras.data[5:15], ras.affine @ np.array([[1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]))
    axial, _, _ = orthogonal_planes(small, np.zeros(3), grid=DisplayGrid.covering(ras, pixel_mm=1.0))
    assert np.isnan(axial[:, 0]).all() and np.isnan(axial[:, -1]).all()
    assert np.isfinite(axial[:, axial.shape[1] // 2]).all()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_orthogonal_slices_png(tmp_path: Path) -> None:
    ras = _phantom_ras()
    vols = {"truth": ras, "lps": _as_lps(ras), "noisy": ras.with_data(ras.data + 0.1)}
    out = orthogonal_slices(vols, tmp_path / "ortho.png", reference="truth", title="phantom", width_in=6, dpi=80)
    assert out == tmp_path / "ortho.png"
    img = _png(out)
    assert img.shape[1] == 6 * 80
    # Same mm-per-pixel in every row: one more row adds one row height (48 mm at the width's scale) + a gap.
    two = _png(
        orthogonal_slices(dict(list(vols.items())[:2]), tmp_path / "two.png", title="phantom", width_in=6, dpi=80)
    )
    assert two.shape[1] == img.shape[1]
    mm_px = (6 - 0.6) * 80 / (40 + 40 + 48)  # panel widths: axial x, coronal x, sagittal y (mm); ~0.6 in margins
    assert img.shape[0] - two.shape[0] == pytest.approx(48 * mm_px, rel=0.1)
    assert img.std() > 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_difference_maps_png(tmp_path: Path) -> None:
    ras = _phantom_ras()
    vols = {"truth": ras, "blur": ras.with_data(ras.data * 0.9)}
    out = difference_maps(vols, tmp_path / "diff.png", reference="truth", dpi=60)
    img = _png(out)
    assert img.shape[1] == 9 * 60
    assert img.std() > 0
    with pytest.raises(ValueError, match="besides the reference"):
        difference_maps({"truth": ras}, tmp_path / "d2.png", reference="truth")
    with pytest.raises(ValueError, match="not one of"):
        orthogonal_slices(vols, tmp_path / "d3.png", reference="nope")
