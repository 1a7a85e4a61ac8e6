"""IREM: a Gaussian-Fourier-feature ReLU MLP with batch normalisation (Wu et al., MICCAI 2021).

Q. Wu, Y. Li, L. Xu, R. Feng, H. Wei, Q. Yang, B. Yu, X. Liu, J. Yu, Y. Zhang, "IREM: High-Resolution Magnetic
Resonance (MR) Image Reconstruction via Implicit Neural Representation", MICCAI 2021, arXiv:2106.15097.

Provenance of the architecture details (checked 2026-11-22 with the project's search tools over stored public
pages, code and issues): the paper's own text was **not** in any stored corpus; only citations of it were found
(title, authors, arXiv id 2106.15097, MICCAI 2021; e.g. the "awesome implicit neural representations in medical
imaging" lists and an ivadomed issue that links the PDF). So the details below come from the project brief's
summary of the paper and are marked as such:

- From the brief (paper, as summarised): Fourier feature mapping ``gamma(v) = [cos(2 pi B v), sin(2 pi B v)]`` with
  ``B in R^{L x 3}``, ``L = 128`` (so 256 features), entries of ``B`` drawn from ``N(0, sigma^2)`` and fixed;
  18 fully connected layers of 256 units, each with batch normalisation and ReLU; the encoded input concatenated
  again "at the 6th and 12th layers"; a final linear output of one intensity; Adam (beta 0.9/0.999, eps 1e-8),
  learning rate 1e-4 halved every 500 epochs, mini-batch 2500.
- **Our choices where the paper could not be checked**:

  * ``sigma``: unverified; default :data:`IREM_SIGMA` = 8 frequency units per unit of ``u`` (``u`` spans 2 units
    across the box). For a ~200 mm head box that puts the typical encoded wavelength at ~14 mm and the largest of
    128 draws near 3-4 mm; the ReLU MLP makes the higher harmonics. Tune it per field of view.
  * "concatenated at the 6th and 12th layers" is read NeRF-style: the *inputs* of hidden layers 6 and 12 (1-based)
    are ``concat(h, gamma(v))``, 256 + 256 = 512 wide.
  * Order within a layer: ``Linear -> BatchNorm1d -> ReLU``.
  * The output layer has no activation (intensities are normalised by the fitting code, not squashed here).
  * ``v`` is our normalised ``u`` in [-1, 1]^3 (the paper normalises coordinates; its exact range is unverified).

Batch normalisation makes the output depend on the *batch* in training mode; call ``.eval()`` before querying the
field (chunked sampling, rendering, evaluation) so the running statistics are used and results do not depend on
chunk boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slicefield.representations._common import check_points, generator, torch_default_linear_init_

#: Number of Gaussian frequencies L; the encoding has 2L = 256 features (cos and sin).
IREM_FREQUENCIES = 128
#: Width of every hidden fully connected layer.
IREM_WIDTH = 256
#: Number of hidden fully connected layers (each Linear -> BatchNorm1d -> ReLU).
IREM_DEPTH = 18
#: 1-based hidden layers whose input is ``concat(h, gamma(v))``.
IREM_SKIP_LAYERS = (6, 12)
#: Default std of the Gaussian frequencies B (per unit of u); not verified against the paper, see module docstring.
IREM_SIGMA = 8.0
#: Paper's training setup (Adam): learning rate.
IREM_LR = 1e-4
#: Paper's training setup: Adam betas.
IREM_BETAS = (0.9, 0.999)
#: Paper's training setup: Adam epsilon.
IREM_EPS = 1e-8
#: Paper's training setup: mini-batch size (points per step).
IREM_BATCH = 2500
#: Paper's training setup: the learning rate is halved every this many epochs.
IREM_HALVE_EVERY_EPOCHS = 500


@dataclass(frozen=True)
class IREMConfig:
    """Configuration of :class:`IREM`; the defaults are the paper's network.

    Training setup reported for the paper (for the fitting code; constants in this module): Adam with betas
    (0.9, 0.999) and eps 1e-8 (:data:`IREM_BETAS`, :data:`IREM_EPS`), learning rate 1e-4 (:data:`IREM_LR`) halved
    every 500 epochs (:data:`IREM_HALVE_EVERY_EPOCHS`), mini-batches of 2500 points (:data:`IREM_BATCH`).
    """

    frequencies: int = IREM_FREQUENCIES
    """L, the number of Gaussian frequencies; the encoding has 2L features."""
    sigma: float = IREM_SIGMA
    """Std of the entries of B (frequency units per unit of normalised u). Not verified against the paper."""
    width: int = IREM_WIDTH
    """Units in every hidden layer."""
    depth: int = IREM_DEPTH
    """Number of hidden Linear -> BatchNorm1d -> ReLU layers."""
    skip_layers: tuple[int, ...] = IREM_SKIP_LAYERS
    """1-based hidden layers whose input is the previous activation concatenated with the encoding."""
    seed: int = 0
    """Seed of the generator that draws B and the initial weights."""


class IREM(nn.Module):
    """IREM field: ``u (N, 3) float32 in [-1, 1]^3 -> intensity (N,) float32``.

    ``B`` is a registered buffer ``(L, 3)`` (saved in the state dict, not trained). Hidden layers are in
    ``self.linears`` / ``self.norms`` (``IREM_DEPTH`` each); the output layer is ``self.output``.
    """

    def __init__(self, config: IREMConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or IREMConfig()
        if any(not 2 <= k <= config.depth for k in config.skip_layers):
            raise ValueError(f"skip_layers {config.skip_layers} must lie in 2..{config.depth} (1-based hidden layers)")
        gen = generator(config.seed)
        self.register_buffer("B", torch.randn(config.frequencies, 3, generator=gen) * config.sigma)
        n_enc = 2 * config.frequencies
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for k in range(1, config.depth + 1):
            if k == 1:
                fan_in = n_enc
            elif k in config.skip_layers:
                fan_in = config.width + n_enc
            else:
                fan_in = config.width
            self.linears.append(torch_default_linear_init_(nn.Linear(fan_in, config.width), gen=gen))
            self.norms.append(nn.BatchNorm1d(config.width))
        self.output = torch_default_linear_init_(nn.Linear(config.width, 1), gen=gen)

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Fourier features ``gamma(u) = [cos(2 pi B u), sin(2 pi B u)]``: ``(N, 3) -> (N, 2L)``."""
        proj = (2.0 * math.pi) * (u @ self.B.T)
        return torch.cat([torch.cos(proj), torch.sin(proj)], dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Intensities ``(N,)`` float32 at normalised positions ``u (N, 3)``."""
        check_points(u)
        gamma = self.encode(u.float())
        h = gamma
        for k, (linear, norm) in enumerate(zip(self.linears, self.norms, strict=True), start=1):
            if k in self.config.skip_layers:
                h = torch.cat([h, gamma], dim=-1)
            h = torch.relu(norm(linear(h)))
        return self.output(h).squeeze(-1)
