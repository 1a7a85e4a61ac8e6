"""Helpers shared by the representations: seeded initialisation, a small ReLU decoder, input checks.

Every representation initialises its parameters from its own ``torch.Generator`` seeded by its config, so two
modules built from equal configs are bit-identical whatever the global RNG state (habit 5: the random draw is a
function of a recorded seed).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` (parameters are drawn on CPU, then moved)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


@torch.no_grad()
def uniform_(tensor: torch.Tensor, low: float, high: float, *, gen: torch.Generator) -> torch.Tensor:
    """Fill ``tensor`` in place with U(low, high) drawn from ``gen`` (on CPU, then copied to its device)."""
    draw = torch.empty(tensor.shape, dtype=torch.float32).uniform_(low, high, generator=gen)
    tensor.copy_(draw.to(dtype=tensor.dtype, device=tensor.device))
    return tensor


@torch.no_grad()
def torch_default_linear_init_(layer: nn.Linear, *, gen: torch.Generator) -> nn.Linear:
    """PyTorch's default ``nn.Linear`` initialisation, but from ``gen``.

    ``kaiming_uniform_(a=sqrt(5))`` reduces to ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the weight, and the bias
    uses the same bound.
    """
    bound = 1.0 / math.sqrt(layer.in_features)
    uniform_(layer.weight, -bound, bound, gen=gen)
    if layer.bias is not None:
        uniform_(layer.bias, -bound, bound, gen=gen)
    return layer


class ReluMLP(nn.Module):
    """A small decoder: ``in_features -> [hidden, ReLU] * n_hidden -> 1``, linear output.

    Input ``(N, in_features)`` float32; output ``(N,)`` float32.
    """

    def __init__(self, in_features: int, *, hidden: int, n_hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden):
            layers += [torch_default_linear_init_(nn.Linear(width, hidden), gen=gen), nn.ReLU()]
            width = hidden
        layers.append(torch_default_linear_init_(nn.Linear(width, 1), gen=gen))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def check_points(u: torch.Tensor) -> None:
    """Raise a clear error unless ``u`` is ``(N, 3)`` floating point (normalised coordinates in [-1, 1]^3)."""
    if u.ndim != 2 or u.shape[-1] != 3:
        raise ValueError(
            f"representations take normalised positions u of shape (N, 3); got {tuple(u.shape)}. "
            "Map world mm to u with Box.normalise and flatten grids to (N, 3)."
        )
    if not u.is_floating_point():
        raise TypeError(f"u must be a floating-point tensor, got {u.dtype}")
