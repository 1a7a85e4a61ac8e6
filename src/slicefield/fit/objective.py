"""The data term and edge-preserving prior on grid values, with their gradient (the objective of grid-mode fits).

E(x[, w]) = ( sum_s || m_s (A_s x - y_s) ||^2 + lambda * R ) / n_pixels

with ``A_s`` the stack's forward operator and R one of

- ``huber``: sum over edges of rho(D_a x), D_a the forward difference along array axis a (per edge, so invariant
  to axis flips): SRR's prior;
- ``tgv``: second-order total generalised variation (Bredies, Kunisch & Pock 2010) with Huber-smoothed norms,
  sum_a rho(D_a x - w_a) + ratio * sum_{a,c} rho(D_c w_a), with an auxiliary vector field ``w: (3, X, Y, Z)``
  (voxel units) optimised jointly with x. Piecewise-smooth images cost little (intensity ramps go into w, so they
  are not flattened into staircases as by first-order priors) while edges stay sharp.

rho_delta is the Huber function scaled like a square (t^2 inside delta, 2 delta |t| - delta^2 outside). Values are
in units of the intensity ``scale`` (the data are divided by it); differences are per voxel (array axes).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from ..acquisition.operator import StackOperator
from ..acquisition.torch_operator import TorchStackOperator
from ..volume import Stack, Volume

PriorKind = Literal["huber", "tgv"]


class Evaluation(NamedTuple):
    """Value and gradient of the objective at one point."""

    data: float
    """Data term (divided by the number of acquired pixels)."""
    prior: float
    """Weighted prior term (same normalisation)."""
    grad: torch.Tensor
    """dE/dx, shape of x."""
    grad_w: torch.Tensor | None
    """dE/dw for the tgv prior, shape of w; None otherwise."""


def forward_difference(x: torch.Tensor, axis: int) -> torch.Tensor:
    """x[i+1] - x[i] along ``axis`` (voxel units), 0 in the last plane; same shape as ``x``."""
    out = torch.zeros_like(x)
    n = x.shape[axis]
    out.narrow(axis, 0, n - 1).copy_(torch.diff(x, dim=axis))
    return out


def forward_difference_adjoint(g: torch.Tensor, axis: int) -> torch.Tensor:
    """The adjoint of :func:`forward_difference` (minus the backward divergence)."""
    n = g.shape[axis]
    head = g.narrow(axis, 0, n - 1)
    out = torch.zeros_like(g)
    out.narrow(axis, 0, n - 1).sub_(head)
    out.narrow(axis, 1, n - 1).add_(head)
    return out


def _huber(t: torch.Tensor, delta: float) -> tuple[float, torch.Tensor]:
    """(sum of rho_delta(t), rho_delta'(t))."""
    a = t.abs()
    value = float(torch.where(a <= delta, t * t, 2 * delta * a - delta * delta).sum())
    return value, 2.0 * t.clamp(-delta, delta)


class GridObjective:
    """Value and gradient of E with respect to the grid values ``x: (X, Y, Z)`` float32 tensor on ``device``."""

    def __init__(
        self,
        stacks: list[Stack],
        grid: Volume,
        *,
        scale: float,
        weight: float,
        delta: float,
        device: torch.device,
        prior: PriorKind = "huber",
        tgv_ratio: float = 1.0,
        operators: list[StackOperator] | None = None,
    ):
        if prior not in ("huber", "tgv"):
            raise ValueError(f"unknown prior {prior!r}: use huber or tgv")
        self.device = device
        ops = operators if operators is not None else [StackOperator(s, grid.shape, grid.affine) for s in stacks]
        self.ops = ops if device.type == "cpu" else [TorchStackOperator(op, device=device) for op in ops]
        self.y = [torch.from_numpy(s.data / np.float32(scale)).to(device) for s in stacks]
        self.m = [
            torch.ones(s.data.shape, device=device)
            if s.mask is None
            else torch.from_numpy(s.mask.astype(np.float32)).to(device)
            for s in stacks
        ]
        self.n = float(sum(float(m.sum()) for m in self.m))
        self.weight = float(weight)
        self.delta = float(delta)
        self.prior = prior
        self.tgv_ratio = float(tgv_ratio)

    def initial_w(self, x: torch.Tensor) -> torch.Tensor | None:
        """tgv: the auxiliary field to start from (the image gradient of ``x``, so the first-order term starts at
        zero); None for huber."""
        if self.prior != "tgv":
            return None
        return torch.stack([forward_difference(x, a) for a in range(3)])

    def _apply(self, op, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.device.type == "cpu":  # scipy's sparse products are the fastest CPU path (zero-copy views)
            fn = op.adjoint if adjoint else op.forward
            return torch.from_numpy(fn(x.numpy()))
        return op.adjoint(x) if adjoint else op.forward(x)

    def value_and_grad(self, x: torch.Tensor, w: torch.Tensor | None = None) -> Evaluation:
        """E and its gradients at ``x`` (and ``w``, the tgv auxiliary field ``(3, X, Y, Z)``)."""
        grad = torch.zeros_like(x)
        data = 0.0
        for op, y, m in zip(self.ops, self.y, self.m, strict=True):
            r = m * (self._apply(op, x, False) - y)
            data += float((r * r).sum())
            grad += 2.0 * self._apply(op, m * r, True)
        prior, grad_w = 0.0, None
        if self.weight > 0 and self.prior == "huber":
            for a in range(3):
                value, psi = _huber(forward_difference(x, a), self.delta)
                prior += value
                grad += self.weight * forward_difference_adjoint(psi, a)
        elif self.weight > 0:
            if w is None:
                raise ValueError("the tgv prior needs the auxiliary field w")
            grad_w = torch.zeros_like(w)
            for a in range(3):
                value, psi = _huber(forward_difference(x, a) - w[a], self.delta)
                prior += value
                grad += self.weight * forward_difference_adjoint(psi, a)
                grad_w[a] -= self.weight * psi
                for c in range(3):
                    value, psi = _huber(forward_difference(w[a], c), self.delta)
                    prior += self.tgv_ratio * value
                    grad_w[a] += (self.weight * self.tgv_ratio) * forward_difference_adjoint(psi, c)
        elif self.prior == "tgv":
            grad_w = torch.zeros_like(w) if w is not None else None
        n = self.n
        return Evaluation(data / n, self.weight * prior / n, grad / n, None if grad_w is None else grad_w / n)
