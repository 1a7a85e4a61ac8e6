"""Generative radiance field: ray geometry against the views renderer, the DRR of a known field, patch sampling,
the canonical cube's geometry, and the whole train -> render -> single-view reconstruct path on a tiny preset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slicefield.io import load_volume, save_volume
from slicefield.nerf.model import NerfConfig, composite, ray_samples
from slicefield.nerf.train import (
    bilinear,
    load_model,
    model_cameras,
    patch_positions,
    pixel_rays,
    sample_patch,
    to_cube,
)
from slicefield.volume import Volume

TINY = dict(image_size=16, volume_size=16, encoder_size=8, patch=8, width=32, depth=2, frequencies=3, samples=16)


def test_pixel_rays_match_the_cameras_rays_at_pixel_centres():
    cams = model_cameras(NerfConfig(**TINY), 100.0)
    for cam in (cams[0], cams[7], cams[40]):
        o, d = cam.rays()
        v, u = np.meshgrid(np.arange(cam.height), np.arange(cam.width), indexing="ij")
        o2, d2 = pixel_rays(cam, u.astype(float), v.astype(float))
        np.testing.assert_allclose(o2, o, atol=1e-9)
        np.testing.assert_allclose(d2, d, atol=1e-12)


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 45.0])
def test_drr_of_a_uniform_field_is_the_chord_through_the_cube(angle_deg):
    """Density 1 and value 1 everywhere: a pixel is the chord length through the cube in cube sides; a horizontal
    ray through the centre at angle a to the x axis crosses 1 / cos(a) sides (a <= 45 deg)."""
    a = math.radians(angle_deg)
    direction = torch.tensor([[[math.cos(a), math.sin(a), 0.0]]], dtype=torch.float64)
    origin = torch.tensor([[[0.0, 0.0, 10.0]]], dtype=torch.float64)  # 10 mm above the centre, inside the cube
    points, seg = ray_samples(origin, direction, half_mm=50.0, samples=64, jitter=None)
    ones = torch.ones(seg.shape, dtype=torch.float64)
    assert float(composite(ones, ones, seg, "drr")) == pytest.approx(1.0 / math.cos(a), rel=1e-9)
    assert points.abs().max() <= 1.0
    miss = ray_samples(
        origin + torch.tensor([0.0, 0.0, 80.0], dtype=torch.float64), direction, half_mm=50.0, samples=8, jitter=None
    )[1]
    assert float(miss.sum()) == 0.0  # a ray above the cube sees nothing
    # emission with a high density saturates at the value
    assert float(composite(ones * 1e3, ones * 0.7, seg, "emission")) == pytest.approx(0.7, rel=1e-6)


def test_patches_sample_the_image_where_they_say():
    img = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16)
    u, v = (torch.tensor(a[None], dtype=torch.float32) for a in patch_positions(0.0, 0.0, 15.0, 16))
    np.testing.assert_allclose(bilinear(img, u, v).numpy(), img.numpy(), atol=1e-4)  # scale 1, K = image size
    rng = np.random.default_rng(0)
    for _ in range(20):
        u, v = sample_patch(rng, size=16, patch=8, min_scale=0.5)
        assert u.min() >= 0 and v.min() >= 0 and u.max() <= 15 + 1e-9 and v.max() <= 15 + 1e-9
        assert 0.5 * 15 - 1e-9 <= u.max() - u.min() <= 15 + 1e-9
        # a linear image is sampled exactly (bilinear interpolation of a plane)
        got = bilinear(img, torch.tensor(u[None], dtype=torch.float32), torch.tensor(v[None], dtype=torch.float32))
        np.testing.assert_allclose(got[0].numpy(), v * 16 + u, rtol=1e-5)


def test_cube_keeps_the_subjects_geometry(phantom):
    """The cube is centred on the foreground box; its voxel -> subject-world affine puts a bright spot back where
    it was in the subject (world mm RAS), and a subject larger than the cube is refused."""
    from slicefield.errors import SlicefieldError
    from slicefield.geometry import apply_affine

    data = np.zeros(phantom.shape, np.float32)
    data[8:32, 10:30, 6:34] = 1.0
    data[20, 15, 25] = 5.0
    affine = phantom.affine.copy()
    affine[:3, 3] += (30.0, -12.0, 7.0)
    vol = Volume(data, affine)
    cube = to_cube(vol, name="s", size=48, cube_mm=48.0)
    spot_world = apply_affine(affine, np.array([20.0, 15.0, 25.0]))
    peak = np.unravel_index(np.argmax(cube.volume.data), cube.volume.shape)
    np.testing.assert_allclose(apply_affine(cube.subject_affine(), np.array(peak, float)), spot_world, atol=1.0)
    box_centre = apply_affine(affine, np.array([19.5, 19.5, 19.5]))  # centre of voxels 8..31, 10..29, 6..33
    np.testing.assert_allclose(cube.canonical_to_subject[:3, 3], box_centre, atol=1e-6)
    with pytest.raises(SlicefieldError, match="more than the model's 20 mm cube"):
        to_cube(vol, name="s", size=16, cube_mm=20.0)


def test_registration_to_the_reference_undoes_a_rigid_move(phantom):
    """The phantom moved in world mm by 8 deg about S and 5 mm (its header changed): registered to the unmoved
    phantom's cube, its cube matches the reference's; the centring alone does not."""
    from slicefield.geometry import rigid_matrix

    size, cube_mm = 32, 48.0
    ref = to_cube(phantom, name="ref", size=size, cube_mm=cube_mm)
    move = rigid_matrix((0.0, 0.0, 8.0), (5.0, -3.0, 0.0), center_mm=phantom.world_corners().mean(axis=0))
    moved = Volume(phantom.data, move @ phantom.affine)
    plain = to_cube(moved, name="m", size=size, cube_mm=cube_mm)
    registered = to_cube(moved, name="m", size=size, cube_mm=cube_mm, reference=ref)

    def rms(a: Volume) -> float:
        return float(np.sqrt(np.mean((a.data - ref.volume.data) ** 2)))

    assert rms(registered.volume) < 0.3 * rms(plain.volume), (rms(registered.volume), rms(plain.volume))
    # cube voxel -> subject world: the same anatomy, so the move maps the reference's frame onto the subject's
    np.testing.assert_allclose(registered.subject_affine(), move @ ref.subject_affine(), atol=0.3)


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """``slicefield nerf train`` on one phantom subject + 2 deformed copies, a tiny network, 60 iterations."""
    import slicefield.nerf.model as nerf_model
    from slicefield.cli import main

    folder = tmp_path_factory.mktemp("nerf")
    (folder / "subjects").mkdir()
    save_volume(phantom, folder / "subjects" / "phantom.nii.gz")
    tiny = nerf_model.PRESETS["tiny"]
    mp = pytest.MonkeyPatch()
    mp.setitem(nerf_model.PRESETS, "tiny", NerfConfig(**{**tiny.__dict__, **TINY}))
    try:
        argv = ["-q", "nerf", "train", str(folder / "subjects"), "--out-dir", str(folder / "gan")]
        assert main([*argv, "--augment", "2", "--iterations", "60"]) == 0
    finally:
        mp.undo()
    return folder


def test_training_writes_a_model_that_learned(trained):
    gan = trained / "gan"
    model = load_model(gan)  # weights_only=True inside
    assert model.latents.shape == (3, model.config.z_shape + model.config.z_app)
    history = json.loads((gan / "history.json").read_text())
    first, last = np.mean([h["mse"] for h in history[:2]]), np.mean([h["mse"] for h in history[-2:]])
    assert last < 0.5 * first  # the rendered patches moved towards the real ones
    metrics = json.loads((gan / "metrics.json").read_text())["held_out_views"]
    assert metrics["per_subject"]["phantom"]["views"] == 72 - 15  # held-out = 4/5 of the orbit
    assert np.isfinite(metrics["psnr_mean"])
    views = gan / "views" / "phantom"
    assert len(list(views.glob("view_*.png"))) == 72 and (views / "turntable.gif").is_file()
    state = torch.load(gan / "checkpoint.pt", weights_only=True)
    assert int(state["iteration"]) == 60


def test_single_view_reconstruction_fits_the_view_and_writes_a_volume(trained, phantom):
    from slicefield.cli import main

    gan, views, out = trained / "gan", trained / "views", trained / "recon"
    assert (
        main(["-q", "nerf", "render", str(gan), str(trained / "subjects" / "phantom.nii.gz"), "--out-dir", str(views)])
        == 0
    )
    assert (
        main(
            [
                "-q",
                "nerf",
                "reconstruct",
                str(gan),
                "--single-view",
                str(views / "view_010.png"),
                "-o",
                str(out),
                "--steps",
                "40",
            ]
        )
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["mse"] < history[0]["mse"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["view_index"] == 10 and metrics["other_views"]["views"] == 71
    vol = load_volume(out / "volume.nii.gz")
    doc = json.loads((views / "cameras.json").read_text())
    np.testing.assert_allclose(vol.affine, doc["subject"]["affine"], atol=1e-5)  # back in the subject's frame
    # the cube sits on the phantom: its centre is inside the phantom's grid
    centre = vol.affine @ np.r_[(np.array(vol.shape) - 1) / 2, 1.0]
    lo, hi = phantom.world_corners().min(axis=0), phantom.world_corners().max(axis=0)
    assert np.all(centre[:3] > lo) and np.all(centre[:3] < hi)
    assert len(list((out / "views").glob("view_*.png"))) == 72


def test_latent_prior_keeps_the_code_near_the_training_codes(trained):
    from slicefield.nerf.train import SingleViewConfig, reconstruct_single_view

    views = np.load(trained / "gan" / "views" / "phantom" / "views.npy")
    distance = {}
    for weight in (0.0, 10.0):
        model = load_model(trained / "gan")
        config = SingleViewConfig(steps=30, lr=0.1, latent_prior=weight, adversarial=0.0)
        z, _ = reconstruct_single_view(model, views[3], 3, config=config)
        distance[weight] = float((z - model.latents.mean(dim=0, keepdim=True)).norm())
    assert distance[10.0] < 0.5 * distance[0.0]


def test_single_view_needs_the_models_protocol(trained, tmp_path, capsys):
    from PIL import Image

    from slicefield.cli import main

    png = tmp_path / "lonely.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
    argv = ["-q", "nerf", "reconstruct", str(trained / "gan"), "--single-view", str(png), "-o", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lonely.png" in err and "no cameras.json" in err and "nerf render" in err
    assert not (tmp_path / "r").exists()
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    assert (
        main(
            [
                "-q",
                "nerf",
                "render",
                str(bad),
                str(trained / "subjects" / "phantom.nii.gz"),
                "--out-dir",
                str(tmp_path / "v"),
            ]
        )
        == 2
    )
    assert "unreadable generative model" in capsys.readouterr().err


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    from slicefield.nerf.train import CHECKPOINT_FILE, preset, train, true_views
    from slicefield.nerf.train import to_cube as cube_of

    vol = load_volume(trained / "subjects" / "phantom.nii.gz")
    config = preset("tiny", **TINY, iterations=20)
    cube = cube_of(vol, name="p", size=config.volume_size, cube_mm=60.0)
    views = true_views(cube, model_cameras(config, 60.0), mode="drr", cube_mm=60.0)[None]
    _, h1 = train([cube], views, config=config, cube_mm=60.0, checkpoint_dir=tmp_path)
    longer = preset("tiny", **TINY, iterations=40)
    _, h2 = train([cube], views, config=longer, cube_mm=60.0, checkpoint_dir=tmp_path, resume=True)
    assert h2[: len(h1)] == h1 and h2[-1]["iteration"] == 40
    assert int(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["iteration"]) == 40


def test_training_on_bad_input_says_why_and_writes_nothing(tmp_path, capsys):
    from slicefield.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["-q", "nerf", "train", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "gan")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no NIfTI volumes" in err and "empty" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.nii.gz").write_bytes(b"not a nifti")
    assert main(["-q", "nerf", "train", str(tmp_path / "bad"), "--out-dir", str(tmp_path / "gan")]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "gan").exists()


def test_brats_layout_picks_one_modality(tmp_path):
    from slicefield.nerf.train import find_subjects

    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        (tmp_path / case).mkdir()
        for m in ("t1", "t1ce", "t2", "flair"):
            (tmp_path / case / f"{case}_{m}.nii.gz").write_bytes(b"")
    found = find_subjects(tmp_path, modality="flair")
    assert [p.name for p in found] == ["BraTS2021_00000_flair.nii.gz", "BraTS2021_00002_flair.nii.gz"]
    assert Path(found[0]).parent.name == "BraTS2021_00000"
