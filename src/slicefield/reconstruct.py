"""One entry point for every reconstruction method, so the CLI, the demo and the benchmark treat them alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .baselines.bspline import bspline_average
from .baselines.srr import SRRConfig, srr
from .errors import SlicefieldError
from .volume import Stack, Volume

#: Methods available to ``reconstruct``, in the order a benchmark lists them.
METHODS: tuple[str, ...] = ("bspline", "srr")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ReconstructConfig:
    """Options for :func:`reconstruct`."""

    method: str = "srr"
    """Reconstruction method: one of METHODS."""
    srr: SRRConfig = field(default_factory=SRRConfig)
    """Options of the srr method."""


def reconstruct(
    stacks: list[Stack],
    grid: Volume,
    *,
    config: ReconstructConfig = ReconstructConfig(),
    progress: ProgressFn | None = None,
) -> Volume:
    """Reconstruct a volume on ``grid`` (its shape and voxel -> world mm RAS affine) from ``stacks``."""
    if not stacks:
        raise SlicefieldError("no stacks to reconstruct from", fix="pass at least one stack")
    if config.method == "bspline":
        data = bspline_average(stacks, grid, progress=progress)
    elif config.method == "srr":
        init = bspline_average(stacks, grid)
        data = srr(stacks, grid, config=config.srr, init=init, progress=progress)
    else:
        raise SlicefieldError(f"unknown method {config.method!r}", fix=f"use one of {', '.join(METHODS)}")
    return Volume(np.asarray(data, np.float32), grid.affine.copy())
