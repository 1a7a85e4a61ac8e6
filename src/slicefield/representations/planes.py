"""Factorised plane + line grids with a small MLP decoder, in pure PyTorch.

Two classic factorisations, both sampled with ``F.grid_sample`` (bilinear/linear, ``align_corners=True``,
border padding) at several resolutions, features concatenated across scales, decoded by a ReLU MLP:

- ``"vm"`` (TensoRF vector-matrix, Chen et al. ECCV 2022): ``f = sum_k P_k(u_i, u_j) * L_k(u_m)`` over the three
  axis pairs ``(i, j)`` with ``m`` the remaining axis: a plane times the line along its normal, summed.
- ``"kplanes"`` (Fridovich-Keil et al. CVPR 2023): ``f = prod_k P_k(u_i, u_j)``, the Hadamard product of the three
  planes (no lines).

Feature grids start at U(0.1, 0.5) (K-planes' initialisation), so products start away from zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from slicefield.representations._common import ReluMLP, check_points, generator, uniform_

#: Axis pairs (i, j) of the three planes, and the remaining axis m of each plane's line.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
LINE_AXES = (2, 1, 0)
#: Default resolutions (samples per axis across the box) of the scales; 256 across ~200 mm is ~0.8 mm.
PLANE_RESOLUTIONS = (64, 128, 256)
#: Default features per plane (and line) per scale.
PLANE_FEATURES = 16
#: Range of the uniform initialisation of the grids (K-planes).
PLANE_INIT_RANGE = (0.1, 0.5)
#: Decoder hidden width and number of hidden layers (ReLU).
PLANE_DECODER_WIDTH = 64
PLANE_DECODER_LAYERS = 2


@dataclass(frozen=True)
class TriPlaneConfig:
    """Configuration of :class:`TriPlane`."""

    resolutions: tuple[int, ...] = PLANE_RESOLUTIONS
    """Samples per axis of the planes (and lines) at each scale."""
    features: int = PLANE_FEATURES
    """Features per plane per scale; the decoder sees ``len(resolutions) * features``."""
    mode: Literal["vm", "kplanes"] = "vm"
    """"vm": sum over the three planes of plane x line (TensoRF); "kplanes": product of the three planes."""
    decoder_width: int = PLANE_DECODER_WIDTH
    """Hidden units of the ReLU decoder MLP."""
    decoder_layers: int = PLANE_DECODER_LAYERS
    """Hidden layers of the ReLU decoder MLP."""
    seed: int = 0
    """Seed of the generator that draws the grids and the decoder weights."""


class TriPlane(nn.Module):
    """Plane/line field: ``u (N, 3) float32 in [-1, 1]^3 -> intensity (N,) float32``.

    ``self.planes[s * 3 + k]``: (1, F, R_s, R_s) for plane ``PLANE_AXES[k]`` at scale ``s``; its last (W) axis is
    ``u[:, i]`` and its H axis is ``u[:, j]``. ``self.lines[s * 3 + k]`` (``"vm"`` only): (1, F, R_s, 1) along
    ``u[:, LINE_AXES[k]]``.
    """

    def __init__(self, config: TriPlaneConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TriPlaneConfig()
        if config.mode not in ("vm", "kplanes"):
            raise ValueError(f"mode must be 'vm' or 'kplanes', got {config.mode!r}")
        gen = generator(config.seed)
        lo, hi = PLANE_INIT_RANGE
        self.planes = nn.ParameterList()
        self.lines = nn.ParameterList()
        for r in config.resolutions:
            for _ in PLANE_AXES:
                self.planes.append(nn.Parameter(uniform_(torch.empty(1, config.features, r, r), lo, hi, gen=gen)))
                if config.mode == "vm":
                    self.lines.append(nn.Parameter(uniform_(torch.empty(1, config.features, r, 1), lo, hi, gen=gen)))
        self.decoder = ReluMLP(
            len(config.resolutions) * config.features,
            hidden=config.decoder_width,
            n_hidden=config.decoder_layers,
            gen=gen,
        )

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Concatenated multi-scale features ``(N, len(resolutions) * F)`` at ``u (N, 3)``."""
        check_points(u)
        u = u.float()
        n = u.shape[0]
        zeros = torch.zeros(n, device=u.device, dtype=u.dtype)
        scales = []
        for s in range(len(self.config.resolutions)):
            acc = None
            for k, (i, j) in enumerate(PLANE_AXES):
                grid = torch.stack([u[:, i], u[:, j]], dim=-1).view(1, n, 1, 2)
                f = _sample(self.planes[s * 3 + k], grid)
                if self.config.mode == "vm":
                    line_grid = torch.stack([zeros, u[:, LINE_AXES[k]]], dim=-1).view(1, n, 1, 2)
                    f = f * _sample(self.lines[s * 3 + k], line_grid)
                    acc = f if acc is None else acc + f
                else:
                    acc = f if acc is None else acc * f
            scales.append(acc)
        return torch.cat(scales, dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Intensities ``(N,)`` float32 at normalised positions ``u (N, 3)``."""
        return self.decoder(self.encode(u))


def _sample(grid_param: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sample of a ``(1, F, H, W)`` grid at ``(1, N, 1, 2)`` positions -> ``(N, F)``."""
    out = F.grid_sample(grid_param, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, :, 0].T
