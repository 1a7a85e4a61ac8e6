"""Tests for slicefield.io: NIfTI round trips and header checks, DICOM geometry (LPS -> RAS), image folders,
atomic writes and input checks. Fixtures are tiny and built here; no data files, no network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from slicefield.errors import SlicefieldError
from slicefield.geometry import rotation_matrix
from slicefield.io import (
    atomic_write,
    check_inputs,
    check_overlap,
    check_stack,
    load_dicom_series,
    load_image_folder,
    load_stack,
    load_volume,
    save_stack,
    save_volume,
)
from slicefield.volume import Stack, Volume

RNG = np.random.default_rng(0)


def _affine(rot: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)[None]
    a[:3, 3] = origin
    return a


# Axis codes -> 3x3 direction matrix whose columns are the world RAS direction of each array axis.
RAS = np.eye(3)
LPS = np.diag([-1.0, -1.0, 1.0])
PIR = np.array([[0, 0, -1], [-1, 0, 0], [0, -1, 0]], dtype=float).T  # i->P, j->I, k->R
AFFINES = {
    "RAS": _affine(RAS, (1.0, 1.2, 3.0), (-20.5, -30.25, 10.0)),
    "LPS": _affine(LPS, (0.8, 0.8, 4.0), (40.0, 35.5, -12.0)),
    "PIR": _affine(PIR, (1.0, 2.0, 0.5), (15.0, 60.0, -25.0)),
    "oblique": _affine(rotation_matrix((17.0, -23.0, 41.0)), (0.9, 1.1, 3.3), (-7.3, 12.9, 31.4)),
}


def _write_nifti(path: Path, data: np.ndarray, *, sform=None, qform=None, scode=1, qcode=1) -> Path:
    img = nib.Nifti1Image(data, None)
    img.set_sform(sform, code=scode if sform is not None else 0)
    img.set_qform(qform, code=qcode if qform is not None else 0)
    nib.save(img, path)
    return path


# --- NIfTI --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_volume_round_trip_keeps_affine_and_data(tmp_path, name, suffix):
    affine = AFFINES[name]
    data = RNG.random((5, 6, 7), dtype=np.float32)
    out = save_volume(Volume(data, affine), tmp_path / f"v{suffix}")
    back = load_volume(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(back.data, data)
    # Both xforms are set to the same affine (scanner code), so the qform reads back identically too.
    hdr = nib.load(out).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    np.testing.assert_allclose(load_volume(out, use_qform=True).affine, affine, atol=1e-5)
    assert hdr.get_xyzt_units()[0] == "mm"


def test_sform_qform_disagreement_names_file(tmp_path):
    sform = AFFINES["RAS"]
    qform = sform.copy()
    qform[:3, 3] += (12.0, 0.0, 0.0)
    path = _write_nifti(tmp_path / "stack2.nii.gz", np.zeros((4, 4, 4), np.float32), sform=sform, qform=qform)
    with pytest.raises(SlicefieldError, match=r"stack2\.nii\.gz: sform and qform disagree by 12\.0 mm.*use-qform"):
        load_volume(path)
    np.testing.assert_allclose(load_volume(path, use_qform=True).affine, qform, atol=1e-5)


def test_sform_preferred_and_qform_used_when_sform_unset(tmp_path):
    q = AFFINES["LPS"]
    path = _write_nifti(tmp_path / "q.nii", np.ones((3, 3, 3), np.float32), qform=q)
    np.testing.assert_allclose(load_volume(path).affine, q, atol=1e-5)


def test_no_xform_falls_back_to_voxel_sizes_with_warning(tmp_path, caplog):
    img = nib.Nifti1Image(np.ones((3, 3, 3), np.float32), None)
    img.header.set_zooms((2.0, 2.0, 5.0))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / "bare.nii")
    vol = load_volume(tmp_path / "bare.nii")
    np.testing.assert_allclose(vol.spacing, (2.0, 2.0, 5.0))
    assert "neither sform nor qform" in caplog.text


def test_sheared_affine_raises(tmp_path):
    a = AFFINES["RAS"].copy()
    a[0, 1] = 0.3  # shear
    path = _write_nifti(tmp_path / "shear.nii", np.zeros((3, 3, 3), np.float32), sform=a, qform=None)
    with pytest.raises(SlicefieldError, match=r"shear\.nii: .*sheared"):
        load_volume(path)


def test_nan_raises(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    path = save_volume(Volume(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(SlicefieldError, match=r"nan\.nii\.gz: 1 voxels are NaN or Inf.*nan_to_num"):
        load_volume(path)


def test_truncated_gzip_raises_slicefield_error(tmp_path):
    path = save_volume(Volume(RNG.random((16, 16, 16)), np.eye(4)), tmp_path / "cut.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SlicefieldError, match=r"cut\.nii\.gz: cannot read as NIfTI") as info:
        load_volume(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"not a nifti at all" * 30])
def test_garbage_file_raises(tmp_path, content):
    path = tmp_path / "junk.nii"
    path.write_bytes(content)
    with pytest.raises(SlicefieldError, match=r"junk\.nii: "):
        load_volume(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(SlicefieldError, match="missing.nii.gz: file not found"):
        load_volume(tmp_path / "missing.nii.gz")


def test_4d_singleton_squeezed_and_true_4d_rejected(tmp_path):
    data = RNG.random((4, 5, 6, 1), dtype=np.float32)
    path = _write_nifti(tmp_path / "s.nii.gz", data, sform=AFFINES["RAS"], qform=AFFINES["RAS"])
    vol = load_volume(path)
    assert vol.shape == (4, 5, 6)
    np.testing.assert_array_equal(vol.data, data[..., 0])
    path4 = _write_nifti(tmp_path / "t.nii.gz", np.zeros((4, 5, 6, 3), np.float32), sform=np.eye(4), qform=np.eye(4))
    with pytest.raises(SlicefieldError, match=r"t\.nii\.gz: image is 4D.*fslroi"):
        load_volume(path4)


def test_scaled_integer_data_loaded_as_float(tmp_path):
    data = np.linspace(-3.0, 7.0, 60, dtype=np.float32).reshape(3, 4, 5)
    path = save_volume(Volume(data, np.eye(4)), tmp_path / "i16.nii", dtype=np.int16)
    assert nib.load(path).get_data_dtype() == np.int16
    back = load_volume(path)
    assert back.data.dtype == np.float32
    np.testing.assert_allclose(back.data, data, atol=1e-3)


# --- atomic writes ------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_when_writer_raises(tmp_path):
    target = tmp_path / "out.nii.gz"

    def writer(tmp: Path) -> None:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, writer)
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"old")  # an existing file is left untouched by a failed write
    with pytest.raises(RuntimeError):
        atomic_write(target, writer)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_atomic_write_replaces_on_success_and_checks_parent(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(SlicefieldError, match=r"nodir.*does not exist"):
        atomic_write(tmp_path / "nodir" / "x.nii.gz", lambda p: p.write_text("x"))


# --- stacks and sidecars ------------------------------------------------------------------------------------


def test_load_stack_uses_sidecar_thickness_and_psf(tmp_path):
    affine = _affine(RAS, (1.0, 1.0, 4.0), (0.0, 0.0, 0.0))
    path = save_volume(Volume(np.zeros((8, 8, 5)), affine), tmp_path / "sub-01_T2w.nii.gz")
    assert load_stack(path).thickness == pytest.approx(4.0)  # no sidecar: slice spacing
    (tmp_path / "sub-01_T2w.json").write_text(json.dumps({"SliceThickness": 3.0, "SlicefieldPSF": "box"}))
    stack = load_stack(path)
    assert stack.name == "sub-01_T2w"
    assert stack.thickness == pytest.approx(3.0) and stack.psf == "box"
    assert stack.meta["path"] == str(path) and stack.meta["thickness_source"] == "sidecar"
    assert stack.n_slices == 5 and stack.data.shape == (5, 8, 8)
    assert load_stack(path, thickness=2.5).thickness == pytest.approx(2.5)  # argument wins


def test_save_stack_round_trip(tmp_path):
    # In-plane pixels larger than the slice spacing: the default slice axis would be wrong without the sidecar.
    affine = _affine(rotation_matrix((10.0, 0.0, -30.0)), (2.0, 2.0, 1.5), (5.0, -4.0, 3.0))
    stack = Stack.from_volume(Volume(RNG.random((6, 7, 4)), affine), slice_axis=2, thickness=1.2, psf="box")
    path = save_stack(stack, tmp_path / "ax.nii.gz")
    side = json.loads((tmp_path / "ax.json").read_text())
    assert side["SliceThickness"] == pytest.approx(1.2) and side["SpacingBetweenSlices"] == pytest.approx(1.5)
    back = load_stack(path)
    np.testing.assert_allclose(back.slice_to_world, stack.slice_to_world, atol=1e-5)
    np.testing.assert_array_equal(back.data, stack.data)
    assert back.thickness == pytest.approx(1.2) and back.psf == "box" and back.spacing == pytest.approx((2.0, 2.0))


# --- checks -------------------------------------------------------------------------------------------------


def _axial_stack(name: str, origin=(0.0, 0.0, 0.0), *, thickness=4.0, spacing_z=4.0, n=10) -> Stack:
    vol = Volume(np.zeros((20, 20, n)), _affine(RAS, (1.0, 1.0, spacing_z), origin))
    return Stack.from_volume(vol, slice_axis=2, thickness=thickness, name=name)


def test_check_stack_reports_gap_and_overlap():
    (msg,) = check_stack(_axial_stack("ax", thickness=3.0, spacing_z=4.0))
    expected = "ax: slice thickness 3.0 mm but slices are 4.0 mm apart (1.0 mm gaps); "
    assert msg == expected + "pass --thickness if the header is wrong"
    assert "overlap" in check_stack(_axial_stack("ax", thickness=5.0, spacing_z=4.0))[0]
    assert check_stack(_axial_stack("ax", thickness=4.1, spacing_z=4.0)) == []  # within 5 %
    thin = _axial_stack("thin", thickness=0.5, spacing_z=0.5)
    assert any("in-plane pixels" in w for w in check_stack(thin))


def test_non_overlapping_stacks_raise_naming_both():
    a = _axial_stack("ax")
    b = _axial_stack("cor", origin=(500.0, 0.0, 0.0))
    a.meta["path"] = "/data/ax.nii.gz"
    with pytest.raises(SlicefieldError, match=r"ax\.nii\.gz: does not overlap cor in world space"):
        check_overlap([a, b])
    with pytest.raises(SlicefieldError):
        check_inputs([a, b])
    partial = _axial_stack("part", origin=(15.0, 0.0, 0.0))  # 5 of 20 mm shared along x
    (warning,) = check_overlap([a, partial])
    assert "share only" in warning
    assert check_inputs([a, _axial_stack("same")]) == []


# --- DICOM --------------------------------------------------------------------------------------------------


def _dicom_slice(path: Path, pixels: np.ndarray, ipp, iop, *, series_uid: str, pixel_spacing=(0.5, 0.8), **extra):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "MR"
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [f"{v}" for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _oblique_series(folder: Path, *, n=5, series_uid=None, rows=4, cols=6):
    """n slices with an oblique IOP, written in shuffled order; returns (row_dir, col_dir, normal, ipps, pixels)."""
    folder.mkdir(exist_ok=True)
    rot = rotation_matrix((20.0, -10.0, 35.0))
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-50.0, 20.0, 30.0])  # LPS mm
    uid = series_uid or generate_uid()
    ipps, pixels = [], []
    for s in range(n):
        ipps.append(origin + 3.0 * s * normal)
        pixels.append(np.arange(rows * cols).reshape(rows, cols) + 100 * s)
    for s in RNG.permutation(n):
        _dicom_slice(
            folder / f"IM{s:04d}.dcm",
            pixels[s],
            ipps[s],
            np.concatenate([row_dir, col_dir]),
            series_uid=uid,
            SliceThickness="2.5",
            RescaleSlope="2",
            RescaleIntercept="-10",
            SeriesDescription="T2 obl",
        )
    return row_dir, col_dir, normal, ipps, pixels


def test_dicom_series_geometry_in_ras(tmp_path):
    row_dir, col_dir, normal, ipps, pixels = _oblique_series(tmp_path / "ser")
    (tmp_path / "ser" / "notes.txt").write_text("not a dicom file")
    stack = load_dicom_series(tmp_path / "ser")
    assert stack.data.shape == (5, 6, 4)  # (n_slices, ni = cols, nj = rows)
    assert stack.spacing == pytest.approx((0.8, 0.5))  # (column spacing, row spacing)
    assert stack.thickness == pytest.approx(2.5)
    assert stack.slice_spacing == pytest.approx(3.0)
    # Slice 3, pixel at row 2, column 5, by hand: LPS = IPP + col * dcol * row_dir + row * drow * col_dir.
    s, row, col = 3, 2, 5
    lps = ipps[s] + col * 0.8 * row_dir + row * 0.5 * col_dir
    ras = np.array([-lps[0], -lps[1], lps[2]])
    np.testing.assert_allclose(stack.pixel_world(s)[col, row], ras, atol=1e-4)
    assert stack.data[s, col, row] == pytest.approx(2 * pixels[s][row, col] - 10)  # rescale applied
    np.testing.assert_allclose(stack.normal, [-normal[0], -normal[1], normal[2]], atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(stack.slice_to_world[0, :3, :3]), 1.0, atol=1e-6)
    assert stack.meta["series_uid"] and len(stack.meta["files"]) == 5


def test_dicom_several_series_raise(tmp_path):
    _oblique_series(tmp_path / "mixed", n=2)
    _dicom_slice(
        tmp_path / "mixed" / "other.dcm",
        np.zeros((4, 6)),
        (0, 0, 0),
        (1, 0, 0, 0, 1, 0),
        series_uid="1.2.3.4",
        SeriesDescription="localizer",
    )
    with pytest.raises(SlicefieldError, match=r"mixed: contains 2 series.*'localizer'.*one series"):
        load_dicom_series(tmp_path / "mixed")


def test_dicom_corrupt_file_named(tmp_path):
    _oblique_series(tmp_path / "ser", n=2)
    bad = tmp_path / "ser" / "IM0001.dcm"
    bad.write_bytes(bad.read_bytes()[:-20])  # pixel data cut short
    with pytest.raises(SlicefieldError, match=r"IM0001\.dcm: cannot decode DICOM image"):
        load_dicom_series(tmp_path / "ser")


def test_dicom_shipped_mr_file():
    path = pydicom.data.get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    stack = load_dicom_series([path])
    assert stack.data.shape == (1, ds.Columns, ds.Rows)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(stack.slice_to_world[0, :3, 3], [-ipp[0], -ipp[1], ipp[2]], atol=1e-6)
    assert stack.thickness == pytest.approx(float(ds.SliceThickness))
    np.testing.assert_array_equal(stack.data[0], ds.pixel_array.T.astype(np.float32))


# --- image folders ------------------------------------------------------------------------------------------


def test_image_folder_natural_sort_and_geometry(tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k in (1, 2, 10):  # lexical order would be 1, 10, 2
        img = np.full((3, 5), k, dtype=np.uint8)
        img[0, 4] = 200  # top-right pixel
        Image.fromarray(img).save(folder / f"slice_{k}.png")
    (folder / "README.txt").write_text("ignored")
    stack = load_image_folder(folder, spacing=0.5, thickness=2.0, orientation="coronal")
    assert stack.data.shape == (3, 5, 3)
    assert [stack.data[s, 0, 0] for s in range(3)] == [1, 2, 10]
    assert stack.data[0, 4, 2] == 200  # image top-right -> i = last column, j = top row
    np.testing.assert_allclose(stack.normal, [0, 1, 0])  # coronal: normal = A
    np.testing.assert_allclose(stack.world_corners().mean(axis=0), 0.0, atol=1e-9)  # centred at the origin
    np.testing.assert_allclose(stack.pixel_world(0)[4, 2] - stack.pixel_world(0)[0, 0], [2.0, 0.0, 1.0])


def test_image_folder_tiff_and_size_mismatch(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "tifs"
    folder.mkdir()
    tifffile.imwrite(folder / "a1.tif", np.ones((4, 4), np.uint16))
    tifffile.imwrite(folder / "a2.tif", np.ones((4, 5), np.uint16))
    with pytest.raises(SlicefieldError, match=r"a2\.tif: image is 5 x 4 pixels but a1\.tif is 4 x 4"):
        load_image_folder(folder, spacing=1.0, thickness=1.0)
    with pytest.raises(SlicefieldError, match="thickness"):
        load_image_folder(folder, spacing=1.0)


def test_dicom_enhanced_multiframe(tmp_path):
    """An enhanced MR file: per-frame positions, shared orientation and pixel measures, frames out of order."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    rows, cols, n = 3, 4, 4
    path = tmp_path / "enhanced.dcm"
    frames = np.stack([np.full((rows, cols), 10 * s) for s in range(n)])
    order = [2, 0, 3, 1]  # storage order of the frames
    _dicom_slice(path, np.zeros((rows, cols)), (0, 0, 0), (1, 0, 0, 0, 1, 0), series_uid=generate_uid())
    ds = pydicom.dcmread(path)
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, key)
    ds.NumberOfFrames = n
    ds.PixelData = frames[order].astype(np.uint16).tobytes()
    measures = Dataset()
    measures.PixelSpacing = ["0.7", "0.9"]
    measures.SliceThickness = "1.5"
    orient = Dataset()
    orient.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: rows along A->P (LPS +y), columns S->I
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orient])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for s in order:
        pos = Dataset()
        pos.ImagePositionPatient = [f"{-20.0 + 2.0 * s}", "-10", "40"]  # normal = (0,1,0) x (0,0,-1) = (-1,0,0)
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.save_as(path, enforce_file_format=True)

    stack = load_dicom_series(path)
    assert stack.data.shape == (n, cols, rows)
    assert stack.spacing == pytest.approx((0.9, 0.7)) and stack.thickness == pytest.approx(1.5)
    # Sorted along the LPS normal (-1, 0, 0): largest LPS x first, i.e. frame s = 3 first.
    assert [float(stack.data[k, 0, 0]) for k in range(n)] == [30.0, 20.0, 10.0, 0.0]
    np.testing.assert_allclose(stack.slice_to_world[0, :3, 3], [-(-20.0 + 6.0), 10.0, 40.0])
    np.testing.assert_allclose(stack.normal, [1.0, 0.0, 0.0])  # LPS -x = RAS +x
    np.testing.assert_allclose(stack.slice_to_world[0, :3, 0], [0.0, -1.0, 0.0])  # row direction: LPS +y = RAS -y
    assert stack.slice_spacing == pytest.approx(2.0)
