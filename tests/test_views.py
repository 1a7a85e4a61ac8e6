"""Tests for slicefield.views: cameras, rendering against analytic line integrals, the projectors' adjoints and
their agreement, the sparse-view fit round trip, the geometry checks, the views folder and the CLI.

Phantoms are made here or come from conftest (40^3, 1 mm); everything is CPU-only and small (detectors of
16-32 pixels) so the file runs in well under a minute.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from slicefield.cli import main
from slicefield.errors import SlicefieldError
from slicefield.geometry import apply_affine
from slicefield.io import load_volume, save_volume
from slicefield.views.cameras import Camera, OrbitConfig, axis_vector, orbit
from slicefield.views.checks import check_cameras, check_volume_units, foreground_corners
from slicefield.views.fit import ViewFitConfig, fit_views, orbit_frame_grid, split, to_subject_grid, view_metrics
from slicefield.views.io import read_views, write_views
from slicefield.views.pipeline import plan_orbit
from slicefield.views.projector import OrbitProjector, TorchRayProjector, orbit_grid
from slicefield.views.render import RenderConfig, render_field, render_volume, volume_sampler
from slicefield.volume import Volume

#: Standard deviation (mm) and centre (mm RAS) of the Gaussian blob whose line integrals are known in closed form.
BLOB_SIGMA_MM = 3.0
BLOB_CENTER_MM = np.array([2.0, -1.0, 3.0])


def blob_volume(*, spacing: float = 1.0, side: int = 41) -> Volume:
    """A unit-peak isotropic Gaussian (sigma 3 mm) on a ``side``^3 grid centred on the origin."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(side - 1) / 2 * spacing
    xyz = apply_affine(affine, np.indices((side,) * 3).reshape(3, -1).T)
    d2 = ((xyz - BLOB_CENTER_MM) ** 2).sum(axis=1)
    return Volume(np.exp(-d2 / (2 * BLOB_SIGMA_MM**2)).reshape((side,) * 3), affine)


def blob_field(xyz: np.ndarray) -> np.ndarray:
    return np.exp(-((xyz - BLOB_CENTER_MM) ** 2).sum(axis=1) / (2 * BLOB_SIGMA_MM**2))


def analytic_drr(cam: Camera) -> np.ndarray:
    """Line integral of the blob along each ray: sqrt(2 pi) sigma exp(-d^2 / (2 sigma^2)), d = ray-to-centre."""
    o, d = cam.rays()
    v = BLOB_CENTER_MM - o
    perp = v - (v * d).sum(-1, keepdims=True) * d
    dist2 = (perp**2).sum(-1)
    return np.sqrt(2 * np.pi) * BLOB_SIGMA_MM * np.exp(-dist2 / (2 * BLOB_SIGMA_MM**2))


def small_orbit(projection: str = "parallel", *, n_views: int = 6, size: int = 24, fov: float = 36.0) -> list[Camera]:
    cfg = OrbitConfig(
        n_views=n_views,
        step_deg=360.0 / n_views,
        size=size,
        projection=projection,
        source_to_iso_mm=120.0,
        source_to_detector_mm=180.0,
    )
    return orbit(cfg, center_mm=np.zeros(3), fov_mm=fov)


# ----------------------------------------------------------------------------------------------- cameras
def test_orbit_about_s_starts_anterior_with_superior_up() -> None:
    cams = orbit(OrbitConfig(), center_mm=np.array([1.0, 2.0, 3.0]), fov_mm=256.0)
    assert len(cams) == 72
    p0, p18 = cams[0].pose, cams[18].pose
    np.testing.assert_allclose(p0[:3, 2], [0, -1, 0], atol=1e-12)  # view 0 looks from anterior to posterior
    np.testing.assert_allclose(p0[:3, 1], [0, 0, -1], atol=1e-12)  # image down = inferior
    np.testing.assert_allclose(p0[:3, 0], [-1, 0, 0], atol=1e-12)  # image right = subject's left (facing them)
    np.testing.assert_allclose(p18[:3, 2], [1, 0, 0], atol=1e-12)  # +90 deg about S: source on the left
    for cam in cams:
        assert np.linalg.det(cam.pose[:3, :3]) == pytest.approx(1.0)


def test_orbit_about_any_axis_keeps_the_axis_up() -> None:
    axis = axis_vector("1,1,0")
    for cam in orbit(OrbitConfig(axis="1,1,0", n_views=8, step_deg=45), center_mm=np.zeros(3), fov_mm=100.0):
        np.testing.assert_allclose(cam.pose[:3, 1], -axis, atol=1e-12)
        assert abs(cam.pose[:3, 2] @ axis) < 1e-12
    with pytest.raises(SlicefieldError, match="orbit axis"):
        axis_vector("Q")


@pytest.mark.parametrize("projection", ["parallel", "cone"])
def test_camera_projection_and_rays_agree(projection: str) -> None:
    """A pixel's ray passes through every point that projects onto that pixel; the isocentre hits the centre."""
    cam = small_orbit(projection, n_views=7)[3]
    np.testing.assert_allclose(cam.project(cam.isocenter_mm[None])[0][0], cam.principal_point, atol=1e-9)
    o, d = cam.rays()
    for v, u in [(0, 0), (5, 17), (23, 23)]:
        pts = o[v, u] + np.outer([10.0, 130.0, 150.0], d[v, u])
        uv, depth = cam.project(pts)
        np.testing.assert_allclose(uv, [[u, v]] * 3, atol=1e-9)
    back = Camera.from_json(json.loads(json.dumps(cam.to_json())))
    assert back == cam


# ----------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("projection", ["parallel", "cone"])
def test_drr_of_gaussian_matches_its_analytic_line_integral(projection: str) -> None:
    cams = small_orbit(projection, n_views=3)
    want = np.stack([analytic_drr(c) for c in cams])
    # The exact field: only the midpoint rule's error (< 1e-6 of the peak at 0.25 mm steps).
    got = render_field(blob_field, cams, bounds_mm=([-30.0] * 3, [30.0] * 3), config=RenderConfig(step_mm=0.25))
    np.testing.assert_allclose(got, want, atol=1e-4 * want.max())
    # The voxelised blob on a 0.5 mm grid: trilinear interpolation flattens the peak by ~h^2 / (8 sigma^2) ~ 0.3 %
    # (2 % on a 1 mm grid), so 1 % of the peak line integral.
    got = render_volume(blob_volume(spacing=0.5, side=81), cams)
    np.testing.assert_allclose(got, want, atol=0.01 * want.max())


def test_mip_and_emission_of_known_objects() -> None:
    cam = small_orbit("parallel", n_views=4)[1]
    o, d = cam.rays()
    v = BLOB_CENTER_MM - o
    perp = v - (v * d).sum(-1, keepdims=True) * d
    want_mip = np.exp(-(perp**2).sum(-1) / (2 * BLOB_SIGMA_MM**2))
    # The sampled maximum misses the peak by at most (step / 2)^2 / (2 sigma^2) of it: 0.09 % at 0.25 mm steps.
    cfg = RenderConfig(mode="mip", step_mm=0.25)
    got = render_field(blob_field, [cam], bounds_mm=([-30.0] * 3, [30.0] * 3), config=cfg)
    np.testing.assert_allclose(got[0], want_mip, atol=0.001)
    # Emission-absorption through a uniform box of value c and depth L (mm): (c/s) (1 - exp(-a c/s L)).
    c, s, a, half = 2.0, 4.0, 0.1, 10.0

    def box(xyz: np.ndarray) -> np.ndarray:
        return np.full(len(xyz), c)

    cfg = RenderConfig(mode="emission", absorption_per_mm=a, scale=s, step_mm=0.5)
    img = render_field(box, [cam], bounds_mm=([-half] * 3, [half] * 3), config=cfg)[0]
    # The central pixel's ray crosses the box along its full depth 2 * half (view 1 looks along an axis).
    centre = img[cam.height // 2, cam.width // 2]
    assert centre == pytest.approx((c / s) * (1 - np.exp(-a * c / s * 2 * half)), rel=1e-6)  # float32 image
    with pytest.raises(ValueError, match="scale"):
        render_field(box, [cam], bounds_mm=([-1.0] * 3, [1.0] * 3), config=RenderConfig(mode="emission"))


def test_a_fitted_representation_renders_through_model_field() -> None:
    """slicefield's Representation protocol (module on normalised u + GridFrame + scale) as a renderable field."""
    import torch

    from slicefield.representations.base import GridFrame
    from slicefield.views.render import model_field

    class Blob(torch.nn.Module):
        def forward(self, u: torch.Tensor) -> torch.Tensor:
            return torch.exp(-(u**2).sum(dim=1) * 4.0)

    vol = blob_volume()
    frame = GridFrame.of_grid(vol.shape, vol.affine)
    field = model_field(Blob(), frame, 2.0)
    xyz = np.array([[0.0, 0.0, 0.0], [5.0, -3.0, 2.0]])
    u = frame.normalise(torch.as_tensor(xyz, dtype=torch.float32))
    np.testing.assert_allclose(field(xyz), 2.0 * torch.exp(-(u**2).sum(dim=1) * 4.0).numpy(), rtol=1e-6)
    img = render_field(
        field, small_orbit(n_views=1), bounds_mm=(vol.world_corners().min(0), vol.world_corners().max(0))
    )
    assert img.shape == (1, 24, 24) and img.max() > 0


def test_render_follows_the_affine() -> None:
    """An oblique, flipped grid holding the same blob renders the same DRR."""
    cams = small_orbit("cone", n_views=2)
    rot = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = -rot @ np.full(3, 20.0)
    xyz = apply_affine(affine, np.indices((41,) * 3).reshape(3, -1).T)
    vol = Volume(blob_field(xyz).reshape((41,) * 3), affine)
    np.testing.assert_allclose(render_volume(vol, cams), render_volume(blob_volume(), cams), atol=1e-3)


# ----------------------------------------------------------------------------------------------- projectors
def test_projector_adjoints() -> None:
    """<A x, y> == <x, A^T y> for the sparse orbit projector and the torch twin (cone beam)."""
    rng = np.random.default_rng(0)
    cams = small_orbit("parallel", n_views=5, size=16)
    grid = orbit_grid(cams)
    sparse = OrbitProjector(cams, grid)
    x, y = rng.random(grid.shape), rng.random((5, 16, 16))
    assert np.vdot(sparse.forward(x), y) == pytest.approx(np.vdot(x, sparse.adjoint(y)), rel=1e-12)
    cone = small_orbit("cone", n_views=5, size=16)
    twin = TorchRayProjector(cone, grid.shape, grid.affine)
    assert np.vdot(twin.forward(x), y) == pytest.approx(np.vdot(x, twin.adjoint(y)), rel=1e-5)


def test_sparse_projector_matches_its_plain_twin_and_the_renderer(phantom: Volume) -> None:
    cams = small_orbit("parallel", n_views=6, size=32, fov=56.0)
    grid = orbit_grid(cams)
    ijk = np.indices(grid.shape).reshape(3, -1).T
    vox = apply_affine(np.linalg.inv(phantom.affine) @ grid.affine, ijk)
    x = volume_sampler(phantom)(vox).reshape(grid.shape).astype(np.float64)
    fast = OrbitProjector(cams, grid).forward(x)
    plain = TorchRayProjector(cams, grid.shape, grid.affine).forward(x)
    rendered = render_volume(Volume(x.astype(np.float32), grid.affine), cams)
    peak = fast.max()
    assert np.abs(fast - plain).max() < 0.01 * peak
    assert np.abs(fast - rendered).max() < 0.01 * peak


# ----------------------------------------------------------------------------------------------- fitting
def _views_of(volume: Volume, cams: list[Camera], tmp_path) -> object:
    images = render_volume(volume, cams)
    meta = {"subject": {"shape": list(volume.shape), "affine": volume.affine.tolist()}, "mode": "drr", "units": "-"}
    angles = [10.0 * k for k in range(len(cams))]
    return read_views(write_views(tmp_path / "views", images, cams, angles_deg=angles, meta=meta, gif=False))


def test_fit_renders_held_out_views_and_exports_the_volume(phantom: Volume, tmp_path) -> None:
    """Fit 12 of 36 parallel views of the 40^3 phantom; held-out views and the exported volume match."""
    cams = plan_orbit(phantom, OrbitConfig(n_views=36, step_deg=10.0, size=32))
    views = _views_of(phantom, cams, tmp_path)
    fit = fit_views(views, ViewFitConfig(train_every=3, iterations=60))
    assert fit.train == list(range(0, 36, 3)) and len(fit.held_out) == 24

    scores = [view_metrics(views.images[k], img) for k, img in zip(fit.held_out, fit.rendered, strict=True)]
    assert min(s["psnr"] for s in scores) > 33.0
    assert min(s["ssim"] for s in scores) > 0.95
    out = to_subject_grid(fit.grid_values, fit.grid.affine, phantom.shape, phantom.affine)
    assert out.shape == phantom.shape and np.array_equal(out.affine, phantom.affine)
    assert np.corrcoef(out.data.ravel(), phantom.data.ravel())[0, 1] > 0.9


def test_cone_fit_uses_the_torch_projector(phantom: Volume, tmp_path) -> None:
    cfg = OrbitConfig(n_views=12, step_deg=30.0, size=20, projection="cone", source_to_iso_mm=150.0)
    cams = plan_orbit(phantom, cfg)
    views = _views_of(phantom, cams, tmp_path)
    assert orbit_grid(cams) is None
    fit = fit_views(views, ViewFitConfig(train_every=2, iterations=30))

    assert (
        np.mean([view_metrics(views.images[k], r)["psnr"] for k, r in zip(fit.held_out, fit.rendered, strict=True)])
        > 28.0
    )
    assert orbit_frame_grid(cams).shape == (20, 20, 20)


def test_tv_gradient_matches_finite_differences() -> None:
    from slicefield.views.fit import _tv

    rng = np.random.default_rng(3)
    z = rng.random((5, 6, 4))
    value, grad = _tv(z)
    h = 1e-6
    for idx in [(0, 0, 0), (2, 3, 1), (4, 5, 3), (1, 5, 0)]:
        dz = np.zeros_like(z)
        dz[idx] = h
        assert (_tv(z + dz)[0] - _tv(z - dz)[0]) / (2 * h) == pytest.approx(grad[idx], rel=1e-5, abs=1e-8)


def test_split_and_config_contract() -> None:
    assert split(10, 5) == ([0, 5], [1, 2, 3, 4, 6, 7, 8, 9])
    with pytest.raises(ValueError, match="train_every"):
        ViewFitConfig(train_every=1)


# ----------------------------------------------------------------------------------------------- checks
def test_geometry_checks_name_problem_and_fix(phantom: Volume) -> None:
    metres = Volume(phantom.data, np.diag([0.001, 0.001, 0.001, 1.0]))
    with pytest.raises(SlicefieldError, match=r"brain\.nii\.gz: voxel size .* metres"):
        check_volume_units(metres, path="brain.nii.gz")
    corners = foreground_corners(phantom)
    cams = small_orbit("parallel", n_views=4, size=32, fov=60.0)
    check_cameras(cams, corners)  # fits
    far = corners + np.array([500.0, 0.0, 0.0])
    with pytest.raises(SlicefieldError, match="off the detector.*--center"):
        check_cameras(cams, far, path="brain.nii.gz")
    tight = small_orbit("parallel", n_views=4, size=32, fov=20.0)
    with pytest.raises(SlicefieldError, match=r"does not cover.*--fov \d+"):
        check_cameras(tight, corners)
    cfg = OrbitConfig(n_views=4, step_deg=90, size=32, projection="cone", source_to_iso_mm=0.5, source_to_detector_mm=1)
    with pytest.raises(SlicefieldError, match="metres"):
        check_cameras(orbit(cfg, center_mm=corners.mean(0), fov_mm=60.0), corners)
    with pytest.raises(SlicefieldError, match="metres"):
        check_cameras(small_orbit("parallel", fov=60000.0), corners)


# ----------------------------------------------------------------------------------------------- folder, CLI
def test_views_folder_round_trip(tmp_path) -> None:
    from PIL import Image

    cams = small_orbit("parallel", n_views=3, size=16)
    images = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32) * 50
    meta = {"subject": {"shape": [4, 4, 4], "affine": np.eye(4).tolist()}, "mode": "drr", "units": "x"}
    out = write_views(tmp_path / "v", images, cams, angles_deg=[0, 120, 240], meta=meta, bits=16)
    back = read_views(out)
    np.testing.assert_array_equal(back.images, images)
    assert back.cameras == cams and back.angles_deg == [0, 120, 240]
    png = np.asarray(Image.open(out / "view_001.png")).astype(np.float64)
    doc = json.loads((out / "cameras.json").read_text())
    lo, hi = doc["png"]["png_min"], doc["png"]["png_max"]
    np.testing.assert_allclose(lo + png / 65535 * (hi - lo), images[1], atol=(hi - lo) / 65535)
    assert Image.open(out / "turntable.gif").n_frames == 3
    (out / "cameras.json").write_text("{")
    with pytest.raises(SlicefieldError, match="cameras.json: unreadable"):
        read_views(out)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_cli_render_fit_evaluate(phantom: Volume, tmp_path, capsys) -> None:
    path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(phantom.data, phantom.affine), path)
    views, field = tmp_path / "views", tmp_path / "field"
    argv = ["-q", "render", str(path), "--out-dir", str(views), "--views", "12", "--step", "30", "--size", "24"]
    assert main(argv) == 0
    assert (views / "view_011.png").is_file() and (views / "turntable.gif").is_file()
    assert main(["-q", "views", "fit", str(views), "--out-dir", str(field), "--train-every", "3"]) == 0
    vol = load_volume(field / "field.nii.gz")
    assert vol.shape == phantom.shape and np.allclose(vol.affine, phantom.affine)
    capsys.readouterr()
    assert main(["views", "evaluate", str(field)]) == 0
    text = capsys.readouterr().out
    assert "| 1 | 30 |" in text and "held-out views: 8 (trained on 4)" in text
    metrics = json.loads((field / "metrics.json").read_text())
    assert metrics["psnr_mean"] > 30 and len(metrics["per_view"]) == 8
    missing = ["-q", "views", "evaluate", str(field), "--fid", "--feature-net", str(tmp_path / "none.pt")]
    assert main(missing) == 2  # FID/KID with a network: test_evaluate_scores_fid_and_kid_with_a_local_network
    assert "no feature network here" in capsys.readouterr().err
    for mode in ("mip", "emission"):
        assert main(["-q", "render", str(path), "--out-dir", str(tmp_path / mode), "--views", "2", "--size", "16",
                     "--mode", mode, "--no-gif"]) == 0  # fmt: skip
    assert main(["-q", "views", "fit", str(tmp_path / "mip"), "--out-dir", str(tmp_path / "f2")]) == 2
    assert "render with --mode drr" in capsys.readouterr().err
    assert main(["-q", "render", str(path), "--out-dir", str(tmp_path / "x"), "--fov", "10"]) == 2
    assert "does not cover" in capsys.readouterr().err


def test_cli_views_fit_gaussians_writes_gaussians_that_render_its_held_out_views(phantom: Volume, tmp_path) -> None:
    from slicefield.views.io import read_views
    from slicefield.views.splat import GaussianViewOperator

    path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(phantom.data, phantom.affine), path)
    views, field = tmp_path / "views", tmp_path / "field"
    assert main(["-q", "render", str(path), "--out-dir", str(views), "--views", "12", "--step", "30", "--size", "24",
                 "--no-gif"]) == 0  # fmt: skip
    argv = ["-q", "views", "fit", str(views), "--out-dir", str(field), "--train-every", "3"]
    assert main([*argv, "--representation", "gaussians"]) == 0
    metrics = json.loads((field / "metrics.json").read_text())
    # 4 training views of 24^2 pixels: 29.9 dB (the voxel fit: 30.5; both converged, 2026-12-07)
    assert metrics["psnr_mean"] > 28 and metrics["n_held_out"] == 8
    assert load_volume(field / "field.nii.gz").shape == phantom.shape
    # gaussians.npz holds world-mm Gaussians: the general closed form of any camera, here the held-out ones
    g = np.load(field / "gaussians.npz")
    split = json.loads((field / "split.json").read_text())
    cams = [read_views(views).cameras[k] for k in split["held_out"]]
    op = GaussianViewOperator(cams, g["means_mm"], np.full(len(g["means_mm"]), float(g["std_mm"])))
    held = np.load(field / "heldout.npy")
    np.testing.assert_allclose(op.forward(g["amplitudes"].astype(np.float64)), held, atol=1e-4 * held.max())


# ----------------------------------------------------------------------------------------------- FID / KID
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is what local feature nets ship as
def test_evaluate_scores_fid_and_kid_with_a_local_network(phantom: Volume, tmp_path) -> None:
    """``views evaluate --fid --kid`` through a tiny TorchScript network (FID/KID themselves: tests/test_fid.py):
    rendered views close to the truth score far lower than a blank rendering."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(net).save(str(path))
    vol = tmp_path / "p.nii.gz"
    save_volume(phantom, vol)
    assert (
        main(
            [
                "-q",
                "render",
                str(vol),
                "--out-dir",
                str(tmp_path / "v"),
                "--views",
                "24",
                "--step",
                "15",
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "-q",
                "views",
                "fit",
                str(tmp_path / "v"),
                "--out-dir",
                str(tmp_path / "f"),
                "--train-every",
                "3",
                "--iterations",
                "20",
            ]
        )
        == 0
    )
    evaluate = [
        "-q",
        "views",
        "evaluate",
        str(tmp_path / "f"),
        "--fid",
        "--kid",
        "--feature-net",
        str(path),
        "--feature-size",
        "32",
    ]
    assert main(evaluate) == 0
    good = json.loads((tmp_path / "f" / "metrics.json").read_text())
    held = np.load(tmp_path / "f" / "heldout.npy")
    np.save(tmp_path / "f" / "heldout.npy", np.zeros_like(held))
    assert main(evaluate) == 0
    blank = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert 0 <= good["fid"] < 0.1 * blank["fid"] and good["kid_mean"] < 0.1 * blank["kid_mean"]


def test_cli_renders_a_fitted_field_like_its_sampled_volume(phantom: Volume, tmp_path) -> None:
    """``slicefield render model.pt``: a voxel field fitted to stacks of the phantom, rendered along the rays at
    world mm positions, matches the DRRs of the same field sampled on its fit grid (1 % at most, both trilinear)."""
    import torch

    from slicefield.acquisition.simulate import SimulationConfig, simulate
    from slicefield.fit.engine import FitConfig, fit_field, model_document

    stacks, _ = simulate(phantom, SimulationConfig(thickness=3.0, noise=0.01, seed=1))
    result = fit_field(stacks, phantom, config=FitConfig(representation="voxel", steps=5, warm_start="bspline"))
    torch.save(model_document(result, representation="voxel", representation_config=result.model.config),
               tmp_path / "model.pt")  # fmt: skip
    save_volume(result.volume, tmp_path / "sampled.nii.gz")
    centre = ",".join(f"{v:.3f}" for v in phantom.world_corners().mean(axis=0))
    common = ["--views", "6", "--step", "30", "--size", "24", "--fov", "80", f"--center={centre}", "--no-gif"]
    assert main(["-q", "render", str(tmp_path / "model.pt"), "--out-dir", str(tmp_path / "vf"), *common]) == 0
    assert main(["-q", "render", str(tmp_path / "sampled.nii.gz"), "--out-dir", str(tmp_path / "vv"), *common]) == 0
    field, volume = read_views(tmp_path / "vf"), read_views(tmp_path / "vv")
    np.testing.assert_allclose(field.images, volume.images, atol=0.01 * float(volume.images.max()))
    assert float(volume.images.max()) > 1.0
