"""The data term and edge-preserving prior on grid values, with their gradient (the SRR objective).

E(x) = ( sum_s || m_s (A_s x - y_s) ||^2 + lambda * sum_edges rho_delta(D x) ) / n_pixels

with rho_delta the Huber function scaled like a square (t^2 inside delta, 2 delta |t| - delta^2 outside), D the
forward differences along each array axis (per edge, so invariant to axis flips). Values are in units of the
intensity ``scale`` (the data are divided by it).
"""

from __future__ import annotations

import numpy as np
import torch

from ..acquisition.operator import StackOperator
from ..acquisition.torch_operator import TorchStackOperator
from ..volume import Stack, Volume


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
        operators: list[StackOperator] | None = None,
    ):
        self.device = device
        ops = operators if operators is not None else [StackOperator(s, grid.shape, grid.affine) for s in stacks]
        self.ops = ops if device.type == "cpu" else [TorchStackOperator(op, device=device) for op in ops]
        self.y = [torch.from_numpy(s.data / np.float32(scale)).to(device) for s in stacks]
        self.m = [
            torch.ones(s.data.shape, device=device) if s.mask is None else torch.from_numpy(s.mask.astype(np.float32))
            for s in stacks
        ]
        self.n = float(sum(float(m.sum()) for m in self.m))
        self.weight = float(weight)
        self.delta = float(delta)

    def _apply(self, op, x: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.device.type == "cpu":  # scipy's sparse products are the fastest CPU path (zero-copy views)
            fn = op.adjoint if adjoint else op.forward
            return torch.from_numpy(fn(x.numpy()))
        return op.adjoint(x) if adjoint else op.forward(x)

    def value_and_grad(self, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(data term, prior term, dE/dx) at ``x``."""
        grad = torch.zeros_like(x)
        data = 0.0
        for op, y, m in zip(self.ops, self.y, self.m, strict=True):
            r = m * (self._apply(op, x, False) - y)
            data += float((r * r).sum())
            grad += 2.0 * self._apply(op, m * r, True)
        prior = 0.0
        if self.weight > 0:
            d = self.delta
            for a in range(3):
                t = torch.diff(x, dim=a)
                at = t.abs()
                prior += float(torch.where(at <= d, t * t, 2 * d * at - d * d).sum())
                psi = 2.0 * self.weight * t.clamp(-d, d)
                lo = [slice(None)] * 3
                hi = [slice(None)] * 3
                lo[a] = slice(0, -1)
                hi[a] = slice(1, None)
                grad[tuple(lo)] -= psi
                grad[tuple(hi)] += psi
        return data / self.n, self.weight * prior / self.n, grad / self.n
