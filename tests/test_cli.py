"""Tests for the command line (slicefield.cli): round trips through every command on a tiny phantom, and the
bad-input contract: one actionable ``slicefield: error:`` line on stderr, exit status 2, no traceback and no
partial output file. Data are made here (a 24 x 28 x 20, 1 mm smooth phantom); no network, CPU only.

Most tests call ``slicefield.cli.main([...])`` in-process; two run ``python -m slicefield.cli`` in a
subprocess to check the real exit status and stderr, and one checks that building the parser (what ``--help``
needs) does not import torch.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from slicefield.cli import main
from slicefield.io import load_stack, load_volume

#: Phantom grid (voxels, 1 mm isotropic); deliberately not a cube so axis mix-ups change shapes.
SHAPE = (24, 28, 20)
#: World mm RAS of voxel (0, 0, 0); integers, so the affine is exact in the float32 NIfTI header.
ORIGIN_MM = (-12.0, -14.0, -10.0)
#: Slice thickness (mm) of the simulated stacks.
THICKNESS_MM = 3.0
#: Offset (mm, along x) that puts a second stack far outside the first one's field of view.
FAR_MM = 200.0
#: sform/qform disagreement written into a header (mm, along x); the reader's limit is 1 mm.
SFORM_QFORM_SHIFT_MM = 12.0


def _affine(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), origin=ORIGIN_MM) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _phantom() -> np.ndarray:
    """Smooth head-like phantom ``SHAPE`` float32: a textured ellipsoid, a bright blob, blurred by 1 voxel."""
    ijk = np.indices(SHAPE, dtype=np.float64)
    u = [(ijk[a] - (SHAPE[a] - 1) / 2) / (SHAPE[a] / 2) for a in range(3)]
    inside = sum((u[a] / 0.8) ** 2 for a in range(3)) <= 1.0
    data = np.where(inside, 0.6 + 0.2 * np.sin(3.0 * u[0]) * np.cos(2.0 * u[1]), 0.0)
    data = np.where((u[0] - 0.2) ** 2 + (u[1] + 0.2) ** 2 + u[2] ** 2 < 0.06, 1.0, data)
    return ndimage.gaussian_filter(data, 1.0).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, *, qform: np.ndarray | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine if qform is None else qform, code=1)
    nib.save(img, path)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process, quiet; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------------------- round trip
@dataclass
class Session:
    """Files written once per module by the CLI round trip."""

    root: Path
    reference: Path
    stacks: list[Path]
    outputs: dict[str, Path]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    root = tmp_path_factory.mktemp("cli")
    reference = _save(root / "hr.nii.gz", _phantom(), _affine())
    argv = ["-q", "simulate", str(reference), "--out-dir", str(root / "stacks")]
    argv += ["--orientations", "axial,coronal,sagittal", "--thickness", str(THICKNESS_MM)]
    argv += ["--noise", "0.01", "--seed", "0"]
    assert main(argv) == 0
    stacks = sorted((root / "stacks").glob("stack_*.nii.gz"))
    outputs = {}
    for method in ("bspline", "srr"):
        out = root / f"recon_{method}.nii.gz"
        argv = ["-q", "reconstruct", *map(str, stacks), "-o", str(out), "--method", method, "--like", str(reference)]
        assert main(argv) == 0
        outputs[method] = out
    return Session(root, reference, stacks, outputs)


def test_simulate_writes_stacks_sidecars_and_record(session: Session) -> None:
    names = [p.name for p in session.stacks]
    assert names == ["stack_0_axial.nii.gz", "stack_1_coronal.nii.gz", "stack_2_sagittal.nii.gz"]
    for p in session.stacks:
        sidecar = json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SliceThickness"] == THICKNESS_MM
        assert load_stack(p).thickness == THICKNESS_MM
    record = json.loads((session.root / "stacks" / "simulation.json").read_text())
    assert record["config"]["seed"] == 0
    assert record["config"]["thickness"] == THICKNESS_MM
    assert [s["name"] for s in record["stacks"]] == [n.removesuffix(".nii.gz") for n in names]
    assert not list((session.root / "stacks").glob(".tmp-*")), "temporary files left behind"


def test_simulate_same_seed_same_data(session: Session, tmp_path: Path) -> None:
    argv = ["-q", "simulate", str(session.reference), "--out-dir", str(tmp_path)]
    argv += ["--orientations", "axial,coronal,sagittal", "--thickness", str(THICKNESS_MM)]
    argv += ["--noise", "0.01", "--seed", "0"]
    assert main(argv) == 0
    for p in session.stacks:
        a, b = nib.load(p), nib.load(tmp_path / p.name)
        np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
        np.testing.assert_array_equal(a.affine, b.affine)
    first = json.loads((session.root / "stacks" / "simulation.json").read_text())
    again = json.loads((tmp_path / "simulation.json").read_text())
    assert first == again


@pytest.mark.parametrize("method", ["bspline", "srr"])
def test_reconstruct_like_gives_reference_grid(session: Session, method: str) -> None:
    ref, out = nib.load(session.reference), nib.load(session.outputs[method])
    assert out.shape == ref.shape == SHAPE
    np.testing.assert_array_equal(out.affine, ref.affine)
    assert np.all(np.isfinite(out.get_fdata()))


def test_reconstruct_resolution_covers_stacks(session: Session, capsys: pytest.CaptureFixture[str]) -> None:
    out = session.root / "recon_2mm.nii.gz"
    rc, _, err = _run(["reconstruct", *map(str, session.stacks), "-o", str(out), "--method", "bspline",
                       "--resolution", "2"], capsys)  # fmt: skip
    assert rc == 0, err
    vol = load_volume(out)
    np.testing.assert_allclose(vol.affine[:3, :3], 2.0 * np.eye(3))
    lo, hi = np.zeros(3), np.array(vol.shape) - 1.0
    for p in session.stacks:
        ijk = nib.affines.apply_affine(np.linalg.inv(vol.affine), load_stack(p).world_corners())
        assert np.all(ijk >= lo - 1e-6) and np.all(ijk <= hi + 1e-6), f"{p.name} sticks out of the grid"


def test_evaluate_json_srr_beats_bspline(session: Session, capsys: pytest.CaptureFixture[str]) -> None:
    psnr = {}
    for method, recon in session.outputs.items():
        target = session.root / f"metrics_{method}.json"
        rc, out, err = _run(["evaluate", str(recon), "--reference", str(session.reference), "--json", str(target)],
                            capsys)  # fmt: skip
        assert rc == 0, err
        metrics = json.loads(target.read_text())
        assert json.loads(out) == metrics
        assert {"psnr", "ssim", "nrmse", "psnr_masked"} <= metrics.keys()
        psnr[method] = metrics["psnr"]
    assert psnr["srr"] > psnr["bspline"], psnr


def test_benchmark_prints_one_row_per_method(session: Session, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["benchmark", str(session.reference), "--methods", "bspline,srr",
                         "--thickness", str(THICKNESS_MM), "--noise", "0.01", "--seed", "0"], capsys)  # fmt: skip
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| method |")
    rows = [line.split("|")[1].strip() for line in lines[2:]]
    assert rows == ["bspline", "srr"]


def test_preprocess_equalize_rescale_halves_inplane_spacing(
    session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = session.stacks[0], session.root / "eq.nii.gz"
    rc, _, err = _run(["preprocess", str(src), "-o", str(out), "--equalize", "--rescale", "2"], capsys)
    assert rc == 0, err
    before, after = load_stack(src), load_stack(out)
    np.testing.assert_allclose(after.spacing, np.asarray(before.spacing) / 2)
    assert after.thickness == before.thickness
    assert after.n_slices == before.n_slices
    assert after.data.shape[1:] == tuple(2 * n for n in before.data.shape[1:])


# ----------------------------------------------------------------------------------------------- bad inputs
@dataclass
class BadCase:
    """A bad command line: argv, the name its error line must contain, and the output that must not appear."""

    argv: list[str]
    name: str
    output: Path


def _good_stack(folder: Path, name: str = "stack.nii.gz", *, shift_mm: float = 0.0) -> Path:
    """An axial 3 mm stack of the phantom (every third z plane), optionally shifted along x."""
    origin = (ORIGIN_MM[0] + shift_mm, ORIGIN_MM[1], ORIGIN_MM[2])
    return _save(folder / name, _phantom()[:, :, ::3], _affine((1.0, 1.0, THICKNESS_MM), origin))


def _reconstruct(d: Path, *inputs: Path | str, extra: tuple[str, ...] = ()) -> BadCase:
    out = d / "out.nii.gz"
    return BadCase(["reconstruct", *map(str, inputs), "-o", str(out), "--method", "bspline", *extra], "", out)


def _missing(d: Path) -> BadCase:
    return _reconstruct(d, d / "missing.nii.gz")


def _text_file(d: Path) -> BadCase:
    (d / "notes.nii.gz").write_text("this is not an image\n")
    return _reconstruct(d, d / "notes.nii.gz")


def _truncated(d: Path) -> BadCase:
    raw = _good_stack(d, "full.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    return _reconstruct(d, d / "truncated.nii.gz")


def _nan(d: Path) -> BadCase:
    data = _phantom()[:, :, ::3].copy()
    data[5, 6, 2] = np.nan
    _save(d / "has_nan.nii.gz", data, _affine((1.0, 1.0, THICKNESS_MM)))
    return _reconstruct(d, d / "has_nan.nii.gz")


def _four_d(d: Path) -> BadCase:
    data = np.stack([_phantom()] * 3, axis=-1)
    _save(d / "fmri.nii.gz", data, _affine())
    return _reconstruct(d, d / "fmri.nii.gz")


def _zero_bytes(d: Path) -> BadCase:
    (d / "empty.nii.gz").write_bytes(b"")
    return _reconstruct(d, d / "empty.nii.gz")


def _sform_qform(d: Path) -> BadCase:
    affine = _affine((1.0, 1.0, THICKNESS_MM))
    qform = affine.copy()
    qform[0, 3] += SFORM_QFORM_SHIFT_MM
    _save(d / "xforms.nii.gz", _phantom()[:, :, ::3], affine, qform=qform)
    return _reconstruct(d, d / "xforms.nii.gz")


def _no_overlap(d: Path) -> BadCase:
    a, b = _good_stack(d, "near.nii.gz"), _good_stack(d, "far.nii.gz", shift_mm=FAR_MM)
    return _reconstruct(d, a, b)


def _no_output_folder(d: Path) -> BadCase:
    out = d / "no_such_folder" / "out.nii.gz"
    argv = ["reconstruct", str(_good_stack(d)), "-o", str(out), "--method", "bspline"]
    return BadCase(argv, "no_such_folder", out)


def _unknown_method(d: Path) -> BadCase:
    out = d / "out.nii.gz"
    return BadCase(["reconstruct", str(_good_stack(d)), "-o", str(out), "--method", "magic"], "--method", out)


def _resolution(value: str) -> Callable[[Path], BadCase]:
    def make(d: Path) -> BadCase:
        case = _reconstruct(d, _good_stack(d), extra=("--resolution", value))
        case.name = "--resolution"
        return case

    return make


def _rescale_negative(d: Path) -> BadCase:
    out = d / "eq.nii.gz"
    return BadCase(["preprocess", str(_good_stack(d)), "-o", str(out), "--rescale", "-2"], "--rescale", out)


def _mask_other_grid(d: Path) -> BadCase:
    reference = _save(d / "reference.nii.gz", _phantom(), _affine())
    mask = _save(d / "mask_2mm.nii.gz", np.ones((12, 14, 10), np.float32), _affine((2.0, 2.0, 2.0)))
    out = d / "metrics.json"
    argv = ["evaluate", str(reference), "--reference", str(reference), "--mask", str(mask), "--json", str(out)]
    return BadCase(argv, mask.name, out)


#: id -> builder of the bad case in a fresh folder. Cases with an empty name must name their (last) input file.
BAD_CASES: dict[str, Callable[[Path], BadCase]] = {
    "missing_file": _missing,
    "text_named_nii_gz": _text_file,
    "truncated_gzip": _truncated,
    "nan_voxel": _nan,
    "4d_three_volumes": _four_d,
    "zero_bytes": _zero_bytes,
    "sform_qform_12mm": _sform_qform,
    "stacks_do_not_overlap": _no_overlap,
    "output_folder_missing": _no_output_folder,
    "unknown_method": _unknown_method,
    "resolution_zero": _resolution("0"),
    "resolution_negative": _resolution("-1"),
    "mask_on_other_grid": _mask_other_grid,
    "preprocess_rescale_negative": _rescale_negative,
}


def _build(case_id: str, folder: Path) -> BadCase:
    case = BAD_CASES[case_id](folder)
    if not case.name:  # the input file at fault: the last positional stack
        case.name = Path(case.argv[case.argv.index("-o") - 1]).name
    return case


def _assert_one_error_line(err: str, case: BadCase) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("slicefield: error: "), line
    assert case.name in line, f"{case.name!r} not named in: {line}"
    assert not case.output.exists(), f"{case.output} was written"
    if case.output.parent.exists():
        assert not list(case.output.parent.glob(".tmp-*")), "temporary files left behind"
    return line


@pytest.mark.parametrize("case_id", list(BAD_CASES))
def test_bad_input_one_line_exit_2_no_output(
    case_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    case = _build(case_id, tmp_path)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        rc = main(case.argv)  # not quiet: progress output would show up as extra stderr lines
    _, err = capsys.readouterr()
    assert rc == 2, err
    _assert_one_error_line(err, case)
    # In-process, pytest's handler takes log records that a real run prints on stderr: none may be emitted.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_sform_qform_error_names_distance_and_a_working_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = _build("sform_qform_12mm", tmp_path)
    rc, _, err = _run(case.argv, capsys)
    assert rc == 2
    assert f"disagree by {SFORM_QFORM_SHIFT_MM:.1f} mm" in err and "--use-qform" in err
    rc, _, err = _run([*case.argv, "--use-qform"], capsys)  # the fix the message suggests works
    assert rc == 0, err
    np.testing.assert_allclose(load_volume(case.output).affine[0, 3], ORIGIN_MM[0] + SFORM_QFORM_SHIFT_MM)


# ----------------------------------------------------------------------------------------------- subprocess
def _cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "slicefield.cli", *argv]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("case_id", ["truncated_gzip", "stacks_do_not_overlap"])
def test_subprocess_bad_input_exit_status(case_id: str, tmp_path: Path) -> None:
    case = _build(case_id, tmp_path)
    proc = _cli(case.argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    _assert_one_error_line(proc.stderr, case)


def test_help_does_not_import_heavy_libraries(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from slicefield.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(json.dumps(sorted(m for m in ('torch', 'SimpleITK', 'nibabel', 'scipy') if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(proc.stdout) == []
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "reconstruct" in proc.stdout


def test_simulate_replay_reproduces_the_stacks(session: Session, tmp_path: Path) -> None:
    ref = str(session.reference)
    first = ["-q", "simulate", ref, "--out-dir", str(tmp_path / "a"), "--thickness", "3", "--seed", "5"]
    assert main([*first, "--motion", "3,2"]) == 0
    record = str(tmp_path / "a" / "simulation.json")
    assert main(["-q", "simulate", ref, "--out-dir", str(tmp_path / "b"), "--replay", record]) == 0
    files = sorted((tmp_path / "a").glob("*.nii.gz"))
    assert len(files) == 3
    for f in files:
        np.testing.assert_array_equal(nib.load(f).get_fdata(), nib.load(tmp_path / "b" / f.name).get_fdata())


def test_oblique_orientations_with_commas_in_their_angles(session: Session, tmp_path: Path) -> None:
    out = tmp_path / "st"
    argv = ["-q", "simulate", str(session.reference), "--out-dir", str(out), "--orientations", "axial@10,5,0,coronal"]
    assert main(argv) == 0
    record = json.loads((out / "simulation.json").read_text())
    assert record["config"]["orientations"] == ["axial@10,5,0", "coronal"]
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_inr_writes_model_run_json_resumes_and_samples(session: Session, tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = tmp_path / "inr.nii.gz"
    base = ["-q", "reconstruct", *map(str, session.stacks), "-o", str(out), "--method", "inr"]
    base += ["--like", str(session.reference), "--device", "cpu", "--restore", "off"]  # restoration: test_restore
    assert main([*base, "--steps", "4", "--checkpoint", str(run)]) == 0
    for name in ("model.pt", "run.json", "checkpoint.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["steps"] == 4
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(session.reference).affine)
    # resume to more steps, then read the field on a coarser grid over the same field of view
    assert main([*base, "--steps", "6", "--resume", str(run)]) == 0
    assert json.loads((run / "run.json").read_text())["steps"] == 6
    fine = tmp_path / "sampled.nii.gz"
    assert main(["-q", "sample", str(run / "model.pt"), "-o", str(fine), "--resolution", "2", "--device", "cpu"]) == 0
    img = nib.load(fine)
    np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), 2.0)
    assert np.isfinite(img.get_fdata()).all() and img.get_fdata().max() > 0


@pytest.mark.parametrize("content", [b"junk", b""])
def test_sample_rejects_a_file_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str], content) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(content)
    out = tmp_path / "out.nii.gz"
    code, _, err = _run(["sample", str(bad), "-o", str(out), "--resolution", "2"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "model.pt" in err and "Traceback" not in err
    assert not out.exists()
