"""Field compression (.sfz): round trips meet their target PSNR; damaged or foreign files are refused clearly."""

from __future__ import annotations

import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from slicefield.cli import main
from slicefield.compress import (
    FORMAT_VERSION,
    MAGIC,
    CompressConfig,
    compress_volume,
    decode_sfz,
    field_shape,
    fit_voxel_field,
    read_sfz,
    write_sfz,
)
from slicefield.errors import SlicefieldError
from slicefield.metrics import psnr
from slicefield.volume import Volume

#: nibabel's small real T1 (33 x 41 x 25, 2-3 mm), shipped with nibabel's tests.
ANATOMICAL = Path(data_path) / "anatomical.nii"


@pytest.fixture(scope="module")
def anatomical() -> Volume:
    img = nib.load(ANATOMICAL)
    return Volume(np.asarray(img.get_fdata(), np.float32), img.affine)


def _range(v: Volume) -> float:
    return float(v.data.max() - v.data.min())


@pytest.mark.parametrize("target", [35.0, 45.0])
def test_round_trip_meets_target_on_a_real_t1(anatomical, tmp_path, target):
    result = compress_volume(anatomical, config=CompressConfig(target_psnr_db=target))
    assert result.met_target
    path = write_sfz(result.data, tmp_path / "a.sfz")
    back = read_sfz(path)
    assert back.shape == anatomical.shape
    np.testing.assert_allclose(back.affine, anatomical.affine)
    measured = psnr(anatomical.data, back.data, data_range=_range(anatomical))
    assert measured >= target
    assert measured == pytest.approx(result.psnr_db, abs=1e-3)  # the recorded PSNR is the decoded file's


def test_voxel_field_round_trip_meets_its_target(anatomical):
    result = compress_volume(anatomical, config=CompressConfig(target_psnr_db=40.0, fields=("voxel",)))
    assert result.field == "voxel" and result.met_target
    back = decode_sfz(result.data)
    assert psnr(anatomical.data, back.data, data_range=_range(anatomical)) >= 40.0


def test_pyramid_is_smaller_than_the_voxel_field_at_equal_target(anatomical):
    """The measured reason the pyramid is the default (Colin27 at 40 dB: 222 kB against 469 kB)."""
    both = compress_volume(anatomical, config=CompressConfig(target_psnr_db=40.0, fields=("pyramid", "voxel")))
    voxel = compress_volume(anatomical, config=CompressConfig(target_psnr_db=40.0, fields=("voxel",)))
    assert both.field == "pyramid" and len(both.data) < len(voxel.data)


def test_background_is_restored_exactly_and_an_escape_round_trips(phantom):
    """A zero background comes back exactly 0; a high target makes coefficients beyond int8 (escapes)."""
    from slicefield.compress import unpack_sfz

    data = phantom.data.copy()
    data[:, :, :6] = 0.0  # a constant background slab on top of the phantom's own
    assert (data == 0).mean() > 0.05
    volume = Volume(data, phantom.affine)
    result = compress_volume(volume, config=CompressConfig(target_psnr_db=80.0))
    header, _ = unpack_sfz(result.data)
    assert header["field"]["background"] == 0.0
    assert any(t["name"] == "escapes" and t["nbytes"] > 0 for t in header["tensors"])
    back = decode_sfz(result.data)
    assert np.all(back.data[data == 0] == 0.0)
    assert psnr(data, back.data, data_range=_range(volume)) >= 80.0


def test_a_version_1_file_is_still_read(anatomical):
    from slicefield.compress import pack_sfz, unpack_sfz

    result = compress_volume(anatomical, config=CompressConfig(target_psnr_db=35.0, fields=("voxel",)))
    header, payload = unpack_sfz(result.data)
    del header["compression"]  # version 1 had no such key: its payload is LZMA
    old = pack_sfz(header, payload, version=1)
    np.testing.assert_array_equal(decode_sfz(old).data, decode_sfz(result.data).data)


def test_smaller_than_the_raw_volume_and_smaller_at_a_lower_target(phantom):
    hi = compress_volume(phantom, config=CompressConfig(target_psnr_db=45.0))
    lo = compress_volume(phantom, config=CompressConfig(target_psnr_db=30.0))
    assert len(lo.data) < len(hi.data) < phantom.data.nbytes / 4
    assert lo.met_target and hi.met_target


def test_coarse_field_is_a_least_squares_fit(phantom):
    """The fitted coarse field reads back closer to the volume than plain trilinear downsampling."""
    import torch
    import torch.nn.functional as F

    v = torch.from_numpy(phantom.data)
    shape = field_shape(phantom.shape, 2.0)
    assert shape == (21, 21, 21)
    plain = F.interpolate(v[None, None], size=shape, mode="trilinear", align_corners=True)
    fitted = torch.from_numpy(fit_voxel_field(phantom.data, 2.0))

    def err(g):
        up = F.interpolate(g.reshape(1, 1, *shape), size=phantom.shape, mode="trilinear", align_corners=True)
        return float(((up[0, 0] - v) ** 2).mean())

    assert err(fitted) < 0.8 * err(plain)


@pytest.mark.parametrize("field", ["pyramid", "voxel"])
def test_unreachable_target_is_reported_not_hidden(phantom, field):
    config = CompressConfig(target_psnr_db=300.0, fields=(field,), factors=(2.0,))
    result = compress_volume(phantom, config=config)
    assert result.field == field
    assert not result.met_target
    assert np.isfinite(result.psnr_db) and result.psnr_db < 300.0
    back = decode_sfz(result.data)  # still a valid file
    assert psnr(phantom.data, back.data, data_range=_range(phantom)) == pytest.approx(result.psnr_db, abs=1e-3)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    from conftest import brain_phantom

    v = brain_phantom(16)
    path = tmp_path_factory.mktemp("sfz") / "p.sfz"
    write_sfz(compress_volume(v, config=CompressConfig(target_psnr_db=40.0)).data, path)
    return path


def _damaged(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad.sfz"
    p.write_bytes(data)
    return p


def test_truncated_file_is_refused(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 1):
        with pytest.raises(SlicefieldError, match="truncated|too short"):
            read_sfz(_damaged(tmp_path, data[:cut]))


def test_corrupted_byte_is_refused(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(SlicefieldError, match="checksum mismatch"):
        read_sfz(_damaged(tmp_path, bytes(data)))


def test_wrong_magic_and_version_are_refused(good_file, tmp_path):
    data = good_file.read_bytes()
    with pytest.raises(SlicefieldError, match="wrong magic"):
        read_sfz(_damaged(tmp_path, b"NOTASFZ\0" + data[8:]))
    newer = data[:8] + struct.pack("<H", FORMAT_VERSION + 1) + data[10:]
    with pytest.raises(SlicefieldError, match=f"version {FORMAT_VERSION + 1}"):
        read_sfz(_damaged(tmp_path, newer))
    nifti = _damaged(tmp_path, ANATOMICAL.read_bytes())
    with pytest.raises(SlicefieldError, match="wrong magic"):
        read_sfz(nifti)
    assert data.startswith(MAGIC)


def test_cli_round_trip_and_one_line_errors(tmp_path, capsys):
    out = tmp_path / "a.sfz"
    assert main(["-q", "compress", str(ANATOMICAL), "-o", str(out), "--target-psnr", "40"]) == 0
    back = tmp_path / "back.nii.gz"
    assert main(["-q", "decompress", str(out), "-o", str(back)]) == 0
    ref = nib.load(ANATOMICAL)
    dec = nib.load(back)
    assert dec.shape == ref.shape
    np.testing.assert_allclose(dec.affine, ref.affine, atol=1e-5)
    a = np.asarray(ref.get_fdata(), np.float32)
    assert psnr(a, dec.get_fdata().astype(np.float32), data_range=float(a.max() - a.min())) >= 40.0
    capsys.readouterr()
    bad = _damaged(tmp_path, out.read_bytes()[:-10])
    assert main(["-q", "decompress", str(bad), "-o", str(tmp_path / "x.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.sfz" in err and "truncated" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_header_that_lies_about_the_payload_is_refused(good_file, tmp_path):
    """A well-formed, correctly checksummed file whose header does not describe its payload."""
    from slicefield.compress import pack_sfz, unpack_sfz

    header, payload = unpack_sfz(good_file.read_bytes())
    header["tensors"][0]["nbytes"] -= 1
    with pytest.raises(SlicefieldError, match="does not match its stored size|other data"):
        read_sfz(_damaged(tmp_path, pack_sfz(header, payload)))
    header["tensors"][0]["nbytes"] += 1
    header["field"]["kind"] = "hashgrid"
    with pytest.raises(SlicefieldError, match="malformed header"):
        read_sfz(_damaged(tmp_path, pack_sfz(header, payload)))
    header["field"]["kind"] = "pyramid"
    header["field"]["step"] = -1.0
    with pytest.raises(SlicefieldError, match="malformed header"):
        read_sfz(_damaged(tmp_path, pack_sfz(header, payload)))


def test_cli_unknown_field_kind_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "a.sfz"
    assert main(["-q", "compress", str(ANATOMICAL), "-o", str(out), "--fields", "pyramid,hashgrid"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--fields" in err and "pyramid,voxel" in err
    assert not out.exists()
