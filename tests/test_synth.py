"""Tests for slicefield.synth (issue 6): labels, deformations, SPADE, fusion blending, training, model files, CLI.

Everything runs on tiny phantoms on CPU (the 40³ brain phantom of conftest.py, 2D slices of it); the networks are
the ``tiny`` preset or smaller, trained for a few steps. No network access, no downloaded weights.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from slicefield.errors import SlicefieldError
from slicefield.synth import augment
from slicefield.synth.evaluate import gradient_stats, synth_metrics
from slicefield.synth.fusion import FusionCNN, FusionConfig, blend_window, patch_stride, predict_patches
from slicefield.synth.labels import gmm_labels, labels_from_probabilities, n_classes, normalise_intensity
from slicefield.synth.model import (
    SynthConfig,
    _plane_data,
    generate,
    generate_plane,
    load_model,
    plane_axis,
    preset,
    save_model,
    train,
    train_generator,
)
from slicefield.synth.spade import (
    SPADE,
    DiscriminatorConfig,
    GeneratorConfig,
    MultiScaleDiscriminator,
    SpadeGenerator,
    hinge_d_loss,
    hinge_g_loss,
    one_hot,
)
from slicefield.volume import Volume

torch.set_num_threads(1)


def _config(**fusion) -> SynthConfig:
    """The tiny preset made smaller still: a few steps, 16³ fusion patches."""
    cfg = preset("tiny", device="cpu")
    return replace(
        cfg,
        generator=GeneratorConfig(channels=4, n_up=2, spade_hidden=8),
        discriminator=DiscriminatorConfig(channels=8, n_layers=2, n_scales=2),
        gan=replace(cfg.gan, steps=3, batch_size=2),
        fusion=replace(cfg.fusion, channels=4, depth=2, patch=16, steps=3, batch_size=2, **fusion),
    )


@pytest.fixture(scope="module")
def pair(phantom) -> tuple[Volume, Volume]:
    """(labels, T1-like image) of the phantom: Gaussian-mixture labels of it."""
    return gmm_labels(phantom), phantom


# ----------------------------------------------------------------------------------------------- labels
def test_gmm_labels_recover_three_tissues_ordered_by_intensity():
    rng = np.random.default_rng(0)
    truth = np.zeros((20, 22, 18), dtype=np.float32)
    truth[2:18, 2:20, 2:16] = 1
    truth[5:15, 5:17, 4:14] = 2
    truth[8:12, 8:14, 7:11] = 3
    means = np.array([0.0, 0.2, 0.5, 0.8])
    image = means[truth.astype(int)] + rng.normal(0, 0.02, truth.shape) * (truth > 0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = (-3, 4, 5)
    out = gmm_labels(Volume(image, affine), mask=truth > 0)
    assert out.shape == truth.shape and np.array_equal(out.affine, affine)
    assert np.mean(out.data == truth) > 0.99
    assert n_classes(out.data) == 4


def test_labels_from_probabilities_and_normalisation():
    gm = np.array([0.7, 0.1, 0.2, 0.9]).reshape(4, 1, 1)
    wm = np.array([0.2, 0.8, 0.1, 0.0]).reshape(4, 1, 1)
    mask = np.array([True, True, True, False]).reshape(4, 1, 1)
    assert labels_from_probabilities(gm, wm, mask).ravel().tolist() == [2.0, 3.0, 1.0, 0.0]
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    normed = normalise_intensity(data, data > 0)
    assert normed.max() == 1.0 and normed.min() == 0.0
    with pytest.raises(SlicefieldError):
        n_classes(np.array([0.0, 1.5]))


# ----------------------------------------------------------------------------------------------- augmentation
def test_identity_deformation_keeps_the_pair(pair):
    labels, image = pair
    lab, img = augment.apply_deformation(labels, image, augment.Deformation.identity())
    np.testing.assert_array_equal(lab.data, labels.data)
    np.testing.assert_allclose(img.data, image.data, atol=1e-5)


def test_deformation_moves_label_and_image_identically(pair):
    """With the image equal to the label map (and no intensity change), the deformed labels (nearest) equal the
    deformed image (linear) wherever the interpolation neighbourhood is uniform (linear interpolation of labels²
    equals the square of that of labels): the same spatial transform moved both."""
    labels, _ = pair
    rng = np.random.default_rng(3)
    d = replace(augment.sample_deformation(rng, augment.AugmentConfig(elastic_mm=2.0)), gamma=1.0, gain=1.0)
    d = replace(d, bias=np.zeros_like(d.bias))
    lab, img = augment.apply_deformation(labels, labels, d)
    assert np.array_equal(lab.affine, labels.affine) and lab.shape == labels.shape
    assert not np.array_equal(lab.data, labels.data)  # it did move
    assert np.mean(lab.data == np.round(img.data)) > 0.97
    squared = augment.apply_deformation(labels, labels.with_data(labels.data**2), d)[1]
    inner = np.abs(squared.data - img.data**2) < 1e-4
    assert inner.mean() > 0.8
    np.testing.assert_array_equal(lab.data[inner], np.round(img.data[inner]))
    # another deformation disagrees much more with this one's labels
    other = augment.apply_deformation(labels, labels, augment.sample_deformation(np.random.default_rng(4)))[0]
    assert np.mean(other.data != lab.data) > 5 * np.mean(lab.data != np.round(img.data))
    # the image-only path gives the same image
    np.testing.assert_array_equal(augment.deform_image(labels, d).data, img.data)


def test_sampling_then_applying_is_replayable(pair):
    labels, image = pair
    d = augment.sample_deformation(np.random.default_rng(7))
    replayed = augment.Deformation.from_json(d.to_json())
    a = augment.apply_deformation(labels, image, d)
    b = augment.apply_deformation(labels, image, replayed)
    np.testing.assert_array_equal(a[0].data, b[0].data)
    np.testing.assert_array_equal(a[1].data, b[1].data)
    pop1 = augment.population(labels, image, n=2, seed=5)
    pop2 = augment.population(labels, image, n=2, seed=5)
    np.testing.assert_array_equal(pop1[1][1].data, pop2[1][1].data)


# ----------------------------------------------------------------------------------------------- SPADE
def test_spade_normalisation_conditions_on_labels_locally():
    torch.manual_seed(0)
    norm = SPADE(channels=6, label_nc=3, hidden=8)
    x = torch.randn(1, 6, 24, 24)
    seg = one_hot(torch.zeros(1, 24, 24), 3)
    labels2 = torch.zeros(1, 24, 24)
    labels2[0, 10:14, 10:14] = 2
    seg2 = one_hot(labels2, 3)
    y1, y2 = norm(x, seg), norm(x, seg2)
    diff = (y1 - y2).abs().sum(dim=1)[0]
    assert diff[10:14, 10:14].min() > 0  # the labels changed the output where they changed
    # two 3x3 convs: influence reaches at most 2 pixels beyond the changed square
    far = torch.ones(24, 24, dtype=torch.bool)
    far[8:16, 8:16] = False
    assert diff[far].max() == 0
    # with gamma = beta = 0 it is the plain instance norm
    for conv in (norm.gamma, norm.beta):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    torch.testing.assert_close(norm(x, seg2), torch.nn.functional.instance_norm(x))


def test_generator_and_discriminator_shapes():
    g = SpadeGenerator(GeneratorConfig(channels=4, n_up=2, spade_hidden=8), label_nc=4)
    seg = one_hot(torch.randint(0, 4, (3, 20, 28)), 4)
    y = g(seg)
    assert y.shape == (3, 1, 20, 28) and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiple"):
        g(one_hot(torch.zeros(1, 18, 28), 4))
    d = MultiScaleDiscriminator(DiscriminatorConfig(channels=8, n_layers=2, n_scales=2), label_nc=4)
    out = d(seg, y)
    assert len(out) == 2 and all(f[-1].shape[1] == 1 for f in out)
    big = [[torch.full((1, 1, 2, 2), 5.0)]]
    assert float(hinge_d_loss(big, [[-f[0] for f in big]])) == 0.0
    assert float(hinge_g_loss(big)) == -5.0


def test_a_few_generator_steps_lower_the_l1_loss(pair):
    labels, image = pair
    cfg = _config()
    cfg = replace(cfg, gan=replace(cfg.gan, steps=25, batch_size=4, lr=2e-3))
    data = _plane_data([(labels, normalise_intensity(image.data, labels.data > 0))], "axial", 4)
    torch.manual_seed(0)
    g = SpadeGenerator(cfg.generator, label_nc=4)

    def l1() -> float:
        with torch.no_grad():
            return float((g.eval()(one_hot(data.labels, 4)) - data.images).abs().mean())

    before = l1()
    train_generator(g, data, config=cfg, label_nc=4, device="cpu")
    assert l1() < 0.8 * before


# ----------------------------------------------------------------------------------------------- fusion
def test_blending_window_sums_to_one_at_half_overlap():
    w = blend_window(32)
    total = sum(w[a : a + 16, b : b + 16, c : c + 16] for a in (0, 16) for b in (0, 16) for c in (0, 16))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)  # the 8 half-shifted windows over a voxel sum to 1
    assert w.min() > 0 and w.min() < 1e-6  # smooth fall to ~0 at the patch borders
    assert patch_stride(32, 0.5) == 16


def test_identity_path_has_no_seams():
    """An untrained fusion CNN is mean(planes); patches blended back give a linear ramp exactly: no seam."""
    net = FusionCNN(FusionConfig(channels=4, depth=3), n_planes=3).eval()
    ramp = np.add.outer(np.add.outer(np.arange(37.0), 0.5 * np.arange(45.0)), -0.25 * np.arange(29.0))
    vol = np.stack([ramp, ramp + 1, ramp - 1]).astype(np.float32)
    out = predict_patches(net, vol, patch=16, overlap=0.5)
    assert out.shape == ramp.shape
    np.testing.assert_allclose(out, ramp, atol=1e-4)
    const = predict_patches(net, np.full((3, 20, 21, 22), 0.3, np.float32), patch=16)
    np.testing.assert_allclose(const, 0.3, atol=1e-6)


def test_blending_removes_patch_border_errors():
    """A random non-identity net: the blended prediction stays close to the whole-volume prediction, far closer
    than hard tiling (no overlap, where each patch's zero-padded border shows as a seam)."""
    torch.manual_seed(1)
    net = FusionCNN(FusionConfig(channels=4, depth=3), n_planes=1).eval()
    torch.nn.init.normal_(net.body[-1].weight, std=0.1)
    x = np.add.outer(np.add.outer(np.linspace(0, 1, 48), np.linspace(0, 1, 40)), np.linspace(0, 1, 40))
    vol = x[None].astype(np.float32)
    with torch.no_grad():
        whole = net(torch.from_numpy(vol)[None])[0, 0].numpy()
    blended = predict_patches(net, vol, patch=16, overlap=0.5)
    tiled = predict_patches(net, vol, patch=16, overlap=0.0)
    inner = (slice(8, -8),) * 3
    err_blend = np.abs(blended - whole)[inner].max()
    err_tiled = np.abs(tiled - whole)[inner].max()
    assert err_tiled > 0.01
    assert err_blend < 0.3 * err_tiled
    # seam check: the blended volume's second difference along x is no larger at patch borders than elsewhere
    d2 = np.abs(np.diff(blended, 2, axis=0))[:, 8:-8, 8:-8].max(axis=(1, 2))
    assert d2.max() < 3 * np.median(d2) + 1e-3


# ----------------------------------------------------------------------------------------------- metrics
def test_through_plane_measure_sees_slice_jitter_and_blur(phantom):
    ref = phantom.data
    mask = ref > 0.1
    rng = np.random.default_rng(0)
    jitter = ref + rng.normal(0, 0.05, (1, 1, ref.shape[2])) * mask  # one offset per z slice
    stats = gradient_stats(jitter, ref, mask, phantom.affine)
    assert stats["gradient_error_z"] > 5 * max(stats["gradient_error_x"], stats["gradient_error_y"])
    assert stats["through_plane"] == stats["gradient_error_z"]
    blurred = ndimage.gaussian_filter1d(ref, 1.5, axis=0)
    assert gradient_stats(blurred, ref, mask, phantom.affine)["gradient_ratio_x"] < 0.8
    same = synth_metrics(phantom, phantom, mask=mask)
    assert same["ssim"] == pytest.approx(1.0) and same["mse"] == 0.0 and same["through_plane"] == 0.0


def test_plane_axes_follow_the_affine():
    a = np.eye(4)
    assert [plane_axis(a, p) for p in ("sagittal", "coronal", "axial")] == [0, 1, 2]
    swapped = np.array([[0, 0, 2.0, 0], [0, -1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    assert plane_axis(swapped, "axial") == 0 and plane_axis(swapped, "sagittal") == 2


# ----------------------------------------------------------------------------------------------- end to end
def test_tiny_training_generation_and_model_round_trip(pair, tmp_path):
    labels, image = pair
    pairs = [(lab, img) for lab, img, _ in augment.population(labels, image, n=2, seed=0)]
    cfg = _config()
    model = train(pairs, cfg)
    assert set(model.history) == {"l1_axial", "l1_coronal", "l1_sagittal", "mse_fusion"}
    out = generate(model, labels)
    assert out.fused.shape == labels.shape and np.array_equal(out.fused.affine, labels.affine)
    assert set(out.planes) == {"axial", "coronal", "sagittal"}
    for v in out.planes.values():
        assert v.shape == labels.shape and np.array_equal(v.affine, labels.affine)
        assert 0.0 <= v.data.min() and v.data.max() <= 1.0
    assert np.all(out.fused.data[labels.data == 0] == 0)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    again = generate(loaded, labels)
    np.testing.assert_allclose(again.fused.data, out.fused.data, atol=1e-6)
    a = generate_plane(loaded.generators["axial"], labels, "axial", label_nc=loaded.label_nc)
    np.testing.assert_allclose(a, out.planes["axial"].data, atol=1e-6)
    with pytest.raises(SlicefieldError, match="not a synthesis model"):
        load_model(tmp_path)


def test_training_is_deterministic_with_a_seed(pair):
    labels, image = pair
    cfg = _config()
    a = train([(labels, image)], cfg)
    b = train([(labels, image)], cfg)
    assert a.history == b.history
    with pytest.raises(SlicefieldError, match="fusion_holdout"):
        train([(labels, image)], replace(cfg, fusion_holdout=1))


class _Killed(Exception):
    """Stands for the process being killed at a step."""


def _kill_at(stage: str, step: int):
    def factory(name: str):
        def cb(done: int, total: int) -> None:
            if name == stage and done == step:
                raise _Killed

        return cb

    return factory


@pytest.mark.parametrize(("stage", "step"), [("axial", 2), ("coronal", 3), ("sagittal", 5), ("fusion", 3)])
def test_killed_then_resumed_training_equals_an_uninterrupted_run(pair, tmp_path, stage, step):
    labels, image = pair
    pairs = [(lab, img) for lab, img, _ in augment.population(labels, image, n=2, seed=0)]
    cfg = _config()
    cfg = replace(cfg, gan=replace(cfg.gan, steps=5), fusion=replace(cfg.fusion, steps=5))
    whole = train(pairs, cfg)
    with pytest.raises(_Killed):
        train(pairs, cfg, progress=_kill_at(stage, step), checkpoint_dir=tmp_path, checkpoint_interval_s=0)
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = train(pairs, cfg, checkpoint_dir=tmp_path, resume=True)
    assert resumed.history == whole.history
    for name, module in [*whole.generators.items(), ("fusion", whole.fusion)]:
        other = resumed.fusion if name == "fusion" else resumed.generators[name]
        for (key, a), b in zip(module.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}.{key} differs after resuming"


def test_two_process_data_parallel_training_on_the_cpu(pair, tmp_path):
    """DDP over 2 CPU processes (gloo), as on several GPUs: it trains, reports progress from rank 0, checkpoints,
    and every rank ends with the same weights (``train`` raises otherwise)."""
    labels, image = pair
    pairs = [(lab, img) for lab, img, _ in augment.population(labels, image, n=2, seed=0)]
    cfg = replace(_config(), planes=("axial",))
    seen: dict[str, int] = {}

    def progress(name: str):
        return lambda done, total: seen.__setitem__(name, done)

    model = train(pairs, cfg, world_size=2, progress=progress, checkpoint_dir=tmp_path)
    assert seen == {"axial": cfg.gan.steps, "synthesise": 2, "fusion": cfg.fusion.steps}
    assert len(model.history["l1_axial"]) == cfg.gan.steps and (tmp_path / "checkpoint.pt").is_file()
    assert model.config.device == "cpu"
    out = generate(model, labels)
    assert out.fused.shape == labels.shape and np.isfinite(out.fused.data).all()


def test_resume_refuses_a_missing_or_foreign_checkpoint(pair, tmp_path):
    labels, image = pair
    cfg = _config()
    with pytest.raises(SlicefieldError, match="no checkpoint"):
        train([(labels, image)], cfg, checkpoint_dir=tmp_path, resume=True)
    train([(labels, image)], cfg, checkpoint_dir=tmp_path)
    with pytest.raises(SlicefieldError, match="other training options"):
        train([(labels, image)], replace(cfg, seed=1), checkpoint_dir=tmp_path, resume=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SlicefieldError, match="cannot read the checkpoint"):
        train([(labels, image)], cfg, checkpoint_dir=tmp_path, resume=True)


def test_cli_labels_pairs_train_generate_evaluate(tmp_path, phantom):
    from slicefield.cli import main
    from slicefield.io import load_volume, save_volume

    t1 = tmp_path / "t1.nii.gz"
    save_volume(phantom, t1)
    lab = tmp_path / "labels.nii.gz"
    assert main(["-q", "synth", "labels", str(t1), "-o", str(lab)]) == 0
    labels = load_volume(lab)
    assert set(np.unique(labels.data)) <= {0.0, 1.0, 2.0, 3.0} and np.allclose(labels.affine, phantom.affine)
    pairs = tmp_path / "pairs"
    assert main(["-q", "synth", "pairs", str(lab), str(t1), "--out-dir", str(pairs), "-n", "2"]) == 0
    assert len(list(pairs.glob("*_labels.nii.gz"))) == 2 and (pairs / "deformations.json").exists()
    model = tmp_path / "model"
    args = ["--planes", "axial,sagittal", "--steps", "2", "--fusion-steps", "2", "--device", "cpu"]
    assert main(["-q", "synth", "train", str(pairs), "--out-dir", str(model), "--preset", "tiny", *args]) == 0
    assert {p.name for p in model.iterdir()} >= {"config.json", "generator_axial.pt", "generator_sagittal.pt"}
    assert not (model / "checkpoint.pt").exists()  # removed once the model is saved
    fresh = tmp_path / "fresh"
    assert main(["-q", "synth", "train", str(pairs), "--out-dir", str(fresh), "--resume", *args]) == 2
    out = tmp_path / "synth.nii.gz"
    assert main(["-q", "synth", "generate", str(lab), "--model", str(model), "-o", str(out), "--keep-planes"]) == 0
    for path in (out, tmp_path / "synth_axial.nii.gz", tmp_path / "synth_sagittal.nii.gz"):
        v = load_volume(path)
        assert v.shape == phantom.shape and np.allclose(v.affine, phantom.affine)
    sheet = tmp_path / "sheet.csv"
    code = main(
        ["-q", "synth", "evaluate", str(out), "--reference", str(t1), "--profiles", "--reader-sheet", str(sheet)]
        + ["--json", str(tmp_path / "m.json"), "--mask", str(lab)]
    )
    assert code == 0
    assert (tmp_path / "synth_profiles.png").stat().st_size > 0
    assert (tmp_path / "sheet_key.csv").exists() and len(sheet.read_text().splitlines()) == 1 + 2 * 3 * 4
    import json

    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert [r["volume"] for r in rows] == ["axial", "sagittal", "fused"]
    assert main(["-q", "synth", "train", str(pairs), "--out-dir", str(model), "--planes", "oblique"]) == 2


@pytest.mark.slow
def test_full_tiny_preset_on_the_phantom_learns(pair):
    """The real ``tiny`` preset (all its steps) on deformed phantoms: the held-out fused volume is closer to the
    real one than an untrained model's. Minutes on one CPU core, hence slow."""
    labels, image = pair
    pairs = [(lab, img) for lab, img, _ in augment.population(labels, image, n=3, seed=0)]
    held_lab, held_img, _ = augment.population(labels, image, n=1, seed=99)[0]
    mask = held_lab.data > 0
    cfg = preset("tiny", device="cpu")
    untrained = generate(
        train(pairs, replace(cfg, gan=replace(cfg.gan, steps=1), fusion=replace(cfg.fusion, steps=1))), held_lab
    )
    trained = generate(train(pairs, cfg), held_lab)
    before = synth_metrics(untrained.fused, held_img, mask=mask)
    after = synth_metrics(trained.fused, held_img, mask=mask)
    assert after["mse"] < 0.5 * before["mse"] and after["ssim"] > before["ssim"]


def test_mni152_labels_are_tissues_ordered_by_t1_intensity():
    """nilearn's maps are stored as 0..255: labels must come out with real CSF and CSF < GM < WM in T1."""
    from slicefield.synth.labels import mni152_pair

    labels, t1 = mni152_pair()
    assert np.array_equal(labels.affine, t1.affine) and labels.shape == t1.shape
    brain = labels.data > 0
    means = [float(t1.data[labels.data == k].mean()) for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    assert min(np.mean(labels.data[brain] == k) for k in (1, 2, 3)) > 0.05
