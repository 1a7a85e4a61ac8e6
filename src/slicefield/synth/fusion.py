"""3D fusion CNN: the three per-plane synthetic volumes in, one volume out; trained on 32³ patches, applied
by overlapping patches merged with blending weights.

Tensors: input ``(B, P, D, H, W)`` float32, one channel per plane volume (P = number of planes), intensities
normalised to [0, 1]; output ``(B, 1, D, H, W)``. Array axes are the label grid's voxel axes.

Blending (:func:`blend_window`, :func:`predict_patches`): patches start every ``stride = patch * (1 - overlap)``
voxels on a grid padded by ``stride`` on each side; each patch's prediction is weighted by a separable
``sin²`` window (``sin²(pi (k + 0.5) / patch)``), and the sum is divided by the summed weights. With 50 %
overlap, ``sin²`` and its half-shifted copy ``cos²`` sum to 1, so every voxel is a convex combination whose
weights fall smoothly to ~0 at the patch borders, where zero-padded convs are least reliable: no seams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .spade import LEAKY_SLOPE


@dataclass(frozen=True)
class FusionConfig:
    """The 3D fusion CNN and its training."""

    channels: int = 16
    """Feature channels of the hidden 3D convs."""
    depth: int = 4
    """3x3x3 conv layers (the last maps to one channel)."""
    patch: int = 32
    """Side of the cubic training/inference patches (voxels)."""
    overlap: float = 0.5
    """Overlap between neighbouring patches (fraction of the side)."""
    steps: int = 200
    """Optimisation steps."""
    batch_size: int = 4
    """Patches per step."""
    lr: float = 1e-3
    """Adam learning rate."""


class FusionCNN(nn.Module):
    """``mean(planes) + residual(planes)``: a stack of 3x3x3 convs (leaky ReLU) whose last conv starts at zero,
    so an untrained network returns the mean of the plane volumes (an identity-like path)."""

    def __init__(self, config: FusionConfig, n_planes: int = 3):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = n_planes
        for _ in range(config.depth - 1):
            layers += [nn.Conv3d(c_in, config.channels, 3, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
            c_in = config.channels
        last = nn.Conv3d(c_in, 1, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) + self.body(x)


def patch_stride(patch: int, overlap: float) -> int:
    """Voxels between neighbouring patch starts (16 for 32³ patches at 50 % overlap)."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return max(1, round(patch * (1.0 - overlap)))


def blend_window(patch: int) -> np.ndarray:
    """Separable blending weights ``(patch, patch, patch)`` float64: ``prod_a sin²(pi (k_a + 0.5) / patch)``."""
    w1 = np.sin(np.pi * (np.arange(patch) + 0.5) / patch) ** 2
    return w1[:, None, None] * w1[None, :, None] * w1[None, None, :]


def _padding(n: int, patch: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of an axis of ``n`` voxels so patches every ``stride`` cover it with margin."""
    before = stride if stride < patch else 0
    total = n + 2 * before
    covered = max(total, patch)
    extra = (-(covered - patch)) % stride
    return before, covered + extra - n - before


def patch_starts(n: int, patch: int, stride: int) -> list[int]:
    """Start indices (in the padded axis) of the patches along an axis of ``n`` real voxels."""
    before, after = _padding(n, patch, stride)
    return list(range(0, n + before + after - patch + 1, stride))


def predict_patches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    volume: np.ndarray,
    *,
    patch: int,
    overlap: float = 0.5,
    batch_size: int = 8,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Apply ``fn`` (``(B, C, p, p, p) -> (B, 1, p, p, p)``) to ``volume`` ``(C, X, Y, Z)`` by overlapping patches
    blended with :func:`blend_window`; returns ``(X, Y, Z)`` float32. The volume is edge-padded (replicating border
    values) so that every voxel lies under several patches' smooth window centres. ``progress(done, total)``."""
    c, *shape = volume.shape
    stride = patch_stride(patch, overlap)
    pads = [_padding(n, patch, stride) for n in shape]
    padded = np.pad(volume, [(0, 0), *pads], mode="edge")
    starts = [patch_starts(n, patch, stride) for n in shape]
    corners = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    window = torch.from_numpy(blend_window(patch)).float()
    out = torch.zeros(padded.shape[1:], dtype=torch.float64)
    weight = torch.zeros(padded.shape[1:], dtype=torch.float64)
    src = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    for b in range(0, len(corners), batch_size):
        chunk = corners[b : b + batch_size]
        x = torch.stack([src[:, i : i + patch, j : j + patch, k : k + patch] for i, j, k in chunk]).to(device)
        with torch.no_grad():
            y = fn(x)[:, 0].float().cpu()
        for (i, j, k), yy in zip(chunk, y, strict=True):
            out[i : i + patch, j : j + patch, k : k + patch] += (yy * window).double()
            weight[i : i + patch, j : j + patch, k : k + patch] += window.double()
        if progress is not None:
            progress(min(b + batch_size, len(corners)), len(corners))
    merged = (out / weight.clamp_min(1e-12)).numpy()
    crop = tuple(slice(p[0], p[0] + n) for p, n in zip(pads, shape, strict=True))
    return merged[crop].astype(np.float32)


def training_corners(
    mask: np.ndarray, *, patch: int, overlap: float = 0.5, min_fraction: float = 0.05
) -> list[tuple[int, int, int]]:
    """Patch corners (in the :func:`predict_patches` padding of the mask's grid) on the 50 %-overlap grid whose
    patch holds at least ``min_fraction`` of foreground voxels (all corners when none does)."""
    stride = patch_stride(patch, overlap)
    pads = [_padding(n, patch, stride) for n in mask.shape]
    padded = np.pad(np.asarray(mask, dtype=np.float32), pads)
    starts = [patch_starts(n, patch, stride) for n in mask.shape]
    corners = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    keep = [
        (i, j, k) for i, j, k in corners if padded[i : i + patch, j : j + patch, k : k + patch].mean() >= min_fraction
    ]
    return keep or corners


def pad_for_patches(volume: np.ndarray, *, patch: int, overlap: float = 0.5) -> np.ndarray:
    """``(C, X, Y, Z)`` edge-padded exactly as :func:`predict_patches` pads it (for cutting training patches)."""
    stride = patch_stride(patch, overlap)
    pads = [_padding(n, patch, stride) for n in volume.shape[1:]]
    return np.pad(volume, [(0, 0), *pads], mode="edge")
