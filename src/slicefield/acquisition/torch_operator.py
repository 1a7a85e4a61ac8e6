"""The forward operator on torch tensors (any device), built from a :class:`StackOperator`'s plan.

Same maths as :class:`~slicefield.acquisition.operator.StackOperator` (``tests/test_fit.py`` compares them); used
when fitting on a GPU, where scipy's CPU sparse products would be the bottleneck.
"""

from __future__ import annotations

import numpy as np
import torch

from .operator import StackOperator


class TorchStackOperator:
    """forward: ``(X, Y, Z)`` tensor -> ``(n, ni, nj)``; adjoint: its exact transpose. float32 on ``device``."""

    def __init__(self, op: StackOperator, *, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.stack_shape = op.stack_shape
        self.grid_shape = op.grid_shape
        self.groups = []
        for g, s in zip(op.groups, op.samplers, strict=True):
            coo = s.tocoo()
            rows = torch.from_numpy(coo.row.astype(np.int64)).to(self.device)
            cols = torch.from_numpy(coo.col.astype(np.int64)).to(self.device)
            vals = torch.from_numpy(coo.data.astype(np.float32)).to(self.device)
            mats = tuple(torch.from_numpy(m).to(self.device) for m in (g.mx, g.my, g.mz))
            self.groups.append((torch.from_numpy(g.slices).to(self.device), g.fine_shape, rows, cols, vals, mats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        out = torch.zeros(self.stack_shape, dtype=x.dtype, device=x.device)
        for idx, (fz, fx, fy), rows, cols, vals, (mx, my, mz) in self.groups:
            fine = torch.zeros(fz * fx * fy, dtype=x.dtype, device=x.device).index_add_(0, rows, vals * flat[cols])
            t = (mz @ fine.reshape(fz, fx * fy)).reshape(-1, fx, fy)
            out[idx] = mx @ (t @ my.T)
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(int(np.prod(self.grid_shape)), dtype=y.dtype, device=y.device)
        for idx, (_fz, fx, fy), rows, cols, vals, (mx, my, mz) in self.groups:
            t = (mx.T @ y[idx]) @ my
            fine = (mz.T @ t.reshape(t.shape[0], fx * fy)).reshape(-1)
            out.index_add_(0, cols, vals * fine[rows])
        return out.reshape(self.grid_shape)
