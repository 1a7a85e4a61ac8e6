"""Tests for prior embedding (slicefield.fit.prior, ``reconstruct --method inr --prior``).

Tiny phantoms (the 40^3, 1 mm brain-like phantom of conftest), two thick-slice stacks, few steps; CPU only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.cli import main
from slicefield.errors import SlicefieldError
from slicefield.fit.engine import FitConfig
from slicefield.fit.prior import PriorConfig, PriorPull, check_prior_volume, embed_prior, register_prior
from slicefield.geometry import apply_affine, rotation_matrix
from slicefield.io import save_stack, save_volume
from slicefield.metrics import evaluate, foreground_mask
from slicefield.motion.register import RegistrationConfig
from slicefield.reconstruct import ReconstructConfig, reconstruct
from slicefield.synth.augment import Deformation, deform_image
from slicefield.volume import Volume

#: The known move of the prior (degrees about world x, y, z; mm): the prior's anatomy at truth point p is at G p.
MOVE_DEG = (4.0, -3.0, 6.0)
MOVE_MM = (3.0, -2.0, 1.5)
#: Tolerances of the recovered transform: largest displacement error over the phantom's corners (mm).
REGISTRATION_TOL_MM = 0.6
#: Registration levels fine enough for a 40 mm phantom (the default starts at 4 mm voxels, made for brains).
FINE = RegistrationConfig(shrink_factors=(2, 1), smoothing_mm=(1.0, 0.0), sampling=0.5)
#: Steps of the small inr fits (scratch and prior alike).
STEPS = 40


def _move(volume: Volume, rotation_deg, translation_mm) -> tuple[Volume, np.ndarray]:
    """The volume with its anatomy moved by G (rotation about the grid centre, then translation), same grid; and G
    ``(4, 4)`` world mm RAS."""
    from scipy import ndimage

    c = apply_affine(volume.affine, (np.array(volume.shape) - 1) / 2)
    g = np.eye(4)
    g[:3, :3] = rotation_matrix(np.asarray(rotation_deg))
    g[:3, 3] = c - g[:3, :3] @ c + np.asarray(translation_mm)
    m = np.linalg.inv(volume.affine) @ np.linalg.inv(g) @ volume.affine  # output voxel -> source voxel
    data = ndimage.affine_transform(volume.data, m[:3, :3], offset=m[:3, 3], order=3, cval=0.0)
    return Volume(data.astype(np.float32), volume.affine.copy()), g


def _max_error_mm(t: np.ndarray, expected: np.ndarray, volume: Volume) -> float:
    corners = volume.world_corners()
    return float(np.max(np.linalg.norm(apply_affine(t, corners) - apply_affine(expected, corners), axis=1)))


@pytest.fixture(scope="module")
def two_stacks(phantom: Volume) -> list:
    config = SimulationConfig(orientations=("axial", "sagittal"), thickness=4.0, noise=0.01, seed=0)
    return simulate(phantom, config)[0]


def test_register_prior_recovers_a_rigid_move(phantom: Volume) -> None:
    moved, g = _move(phantom, MOVE_DEG, MOVE_MM)
    t, _ = register_prior(phantom, moved, kind="rigid", config=FINE)
    # T maps the prior's anatomy back onto the subject: the inverse of the move
    assert _max_error_mm(t, np.linalg.inv(g), phantom) < REGISTRATION_TOL_MM


def test_embed_prior_registers_to_the_stacks_and_matches_intensity(phantom: Volume, two_stacks: list) -> None:
    moved, g = _move(phantom, MOVE_DEG, MOVE_MM)
    scaled = Volume(1.5 * moved.data + 0.1 * (moved.data > 0.05), moved.affine)  # other gain, some offset
    grid = Volume(np.zeros(phantom.shape, np.float32), phantom.affine)
    emb = embed_prior(scaled, two_stacks, grid, config=PriorConfig(registration="rigid", intensity="linear"))
    assert _max_error_mm(emb.world_to_world, np.linalg.inv(g), phantom) < 2 * REGISTRATION_TOL_MM
    mask = foreground_mask(phantom.data)
    assert evaluate(phantom.data, emb.values, mask=mask)["psnr_masked"] > 25.0
    assert abs(float(emb.values[mask].mean()) / float(phantom.data[mask].mean()) - 1.0) < 0.05


def test_prior_embedded_inr_beats_scratch_with_two_stacks(phantom: Volume, two_stacks: list) -> None:
    rng = np.random.default_rng(1)
    change = replace(
        Deformation.identity(elastic_grid=4),
        rotation_deg=(2.0, -1.0, 3.0),
        translation_mm=(2.0, -1.5, 1.0),
        elastic_mm=rng.normal(0.0, 0.5, (4, 4, 4, 3)),
        gain=1.3,
    )
    prior = deform_image(phantom, change)  # a slightly deformed, brighter copy of the truth
    grid = Volume(np.zeros(phantom.shape, np.float32), phantom.affine)
    mask = foreground_mask(phantom.data)
    inr = FitConfig(steps=STEPS, restore="off")  # the same Huber fit with and without the prior
    scratch = reconstruct(two_stacks, grid, config=ReconstructConfig(method="inr", inr=inr))
    with_prior = reconstruct(
        two_stacks,
        grid,
        config=ReconstructConfig(method="inr", inr=inr, prior=PriorConfig(registration="rigid")),
        prior=prior,
    )
    p_scratch = evaluate(phantom.data, scratch.data, mask=mask)["psnr_masked"]
    p_prior = evaluate(phantom.data, with_prior.data, mask=mask)["psnr_masked"]
    assert p_prior > p_scratch + 0.5, (p_prior, p_scratch)


def test_pull_gradient_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((5, 6, 7), generator=gen)
    anchor = torch.rand((5, 6, 7), generator=gen)
    for delta in (None, 0.1):
        pull = PriorPull(anchor, weight=0.3, n=50.0, delta=delta)
        value, grad = pull.value_and_grad(x)
        xr = x.clone().requires_grad_(True)
        t = xr - anchor
        rho = t * t if delta is None else torch.where(t.abs() <= delta, t * t, 2 * delta * t.abs() - delta**2)
        (0.3 * rho.sum() / 50.0).backward()
        assert value == pytest.approx(float(0.3 * rho.detach().sum() / 50.0), rel=1e-5)
        torch.testing.assert_close(grad, xr.grad)


def test_constant_prior_is_refused(phantom: Volume) -> None:
    with pytest.raises(SlicefieldError, match="no contrast"):
        check_prior_volume(Volume(np.zeros(phantom.shape, np.float32), phantom.affine), name="flat.nii.gz")


def test_prior_with_another_method_is_refused(phantom: Volume, two_stacks: list) -> None:
    grid = Volume(np.zeros(phantom.shape, np.float32), phantom.affine)
    with pytest.raises(SlicefieldError, match="method inr"):
        reconstruct(two_stacks, grid, config=ReconstructConfig(method="srr"), prior=phantom)


# ----------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def stack_files(tmp_path_factory: pytest.TempPathFactory, phantom: Volume, two_stacks: list) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("prior_cli")
    paths = [save_stack(s, root / f"{s.name}.nii.gz") for s in two_stacks]
    reference = save_volume(phantom, root / "hr.nii.gz")
    return reference, paths


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["-q", *argv])
    return rc, capsys.readouterr().err


def test_cli_reconstruct_with_prior(stack_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference, stacks = stack_files
    out = tmp_path / "hr.nii.gz"
    argv = ["reconstruct", *map(str, stacks), "-o", str(out), "--method", "inr", "--like", str(reference)]
    argv += ["--prior", str(reference), "--prior-registration", "none", "--steps", "3", "--device", "cpu"]
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert nib.load(out).shape == nib.load(reference).shape


@pytest.mark.parametrize("problem", ["missing", "not_nifti", "flat", "wrong_method"])
def test_cli_bad_prior_one_line_error_no_output(
    problem: str, stack_files, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, stacks = stack_files
    prior = tmp_path / "prior.nii.gz"
    method = "inr"
    if problem == "not_nifti":
        prior.write_text("not an image")
    elif problem == "flat":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), prior)
    elif problem == "wrong_method":
        prior = reference
        method = "srr"
    out = tmp_path / "out.nii.gz"
    argv = ["reconstruct", *map(str, stacks), "-o", str(out), "--method", method, "--prior", str(prior)]
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slicefield: error:"), err
    assert ("--prior" in lines[0]) if problem == "wrong_method" else (str(prior) in lines[0])
    assert "; " in lines[0], "the line should end with a fix"
    assert not out.exists()
