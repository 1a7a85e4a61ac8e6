"""Representations: fields mapping normalised positions ``u (N, 3)`` in [-1, 1]^3 to intensities ``(N,)``.

All follow the protocol in :mod:`slicefield.representations.base` (world mm -> ``u`` via a ``Box``), so the
fitting loop, sampling, rendering and the benchmark treat them alike::

    model = build_representation("hashgrid", HashGridConfig(levels=16))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slicefield.representations.base import Box
from slicefield.representations.gaussians import GaussianField, GaussiansConfig
from slicefield.representations.hashgrid import HashGrid, HashGridConfig
from slicefield.representations.irem import IREM, IREMConfig
from slicefield.representations.planes import TriPlane, TriPlaneConfig
from slicefield.representations.siren import Siren, SirenConfig
from slicefield.representations.voxel import VoxelGrid, VoxelGridConfig

#: Name -> (module class, config class).
REPRESENTATIONS: dict[str, tuple[type[nn.Module], type]] = {
    "irem": (IREM, IREMConfig),
    "siren": (Siren, SirenConfig),
    "hashgrid": (HashGrid, HashGridConfig),
    "planes": (TriPlane, TriPlaneConfig),
    "voxel": (VoxelGrid, VoxelGridConfig),
}


def _lookup(name: str) -> tuple[type[nn.Module], type]:
    try:
        return REPRESENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown representation {name!r}; choose one of {sorted(REPRESENTATIONS)}") from None


def default_config(name: str) -> Any:
    """The default config dataclass of representation ``name``."""
    return _lookup(name)[1]()


def config_class(name: str) -> type:
    """The config dataclass type of representation ``name``."""
    return _lookup(name)[1]


def build_representation(name: str, config: Any = None) -> nn.Module:
    """Build representation ``name`` from ``config`` (its config dataclass; ``None`` for the defaults)."""
    cls, config_cls = _lookup(name)
    if config is None:
        config = config_cls()
    elif not isinstance(config, config_cls):
        raise TypeError(f"representation {name!r} takes a {config_cls.__name__}, got {type(config).__name__}")
    return cls(config)


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``module`` (buffers such as IREM's fixed B are not parameters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "REPRESENTATIONS",
    "Box",
    "GaussianField",
    "GaussiansConfig",
    "HashGrid",
    "HashGridConfig",
    "IREM",
    "IREMConfig",
    "Siren",
    "SirenConfig",
    "TriPlane",
    "TriPlaneConfig",
    "VoxelGrid",
    "VoxelGridConfig",
    "build_representation",
    "config_class",
    "count_parameters",
    "default_config",
]
