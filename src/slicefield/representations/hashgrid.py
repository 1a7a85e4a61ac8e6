"""Multiresolution hash encoding + small MLP decoder (Müller et al., "Instant Neural Graphics Primitives with a
Multiresolution Hash Encoding", SIGGRAPH 2022), in pure PyTorch with optional fast paths.

The plain PyTorch path reproduces tiny-cuda-nn's ``HashGrid`` encoding (``GridEncodingTemplated``, linear
interpolation) so that a table trained here can be copied into ``tinycudann.Encoding`` and back:

- inputs are mapped to ``x = (u + 1) / 2`` in [0, 1]^3 (positions outside the box are clamped onto it);
- level ``l`` has ``scale_l = 2^(l log2 b) * base_resolution - 1`` (float32, as tcnn) and
  ``resolution_l = ceil(scale_l) + 1`` vertices per axis, where ``b`` is the per-level growth factor
  ``exp((ln finest_resolution - ln base_resolution) / (levels - 1))``;
- ``pos = x * scale_l + 0.5``, corner ``floor(pos) + {0, 1}^3``, trilinear weights from ``pos - floor(pos)``;
- a level is *dense* when ``resolution_l^3 <= 2^T``: index ``i + j R + k R^2``; otherwise *hashed*:
  ``(i * 1) XOR (j * 2654435761) XOR (k * 805459861)`` in uint32 arithmetic; both taken modulo the level's size;
- level ``l`` owns ``min(next_multiple(resolution_l^3, 8), 2^T)`` rows starting at ``offsets[l]`` of one flat
  table ``(total_rows, F)``; flattened row-major this is exactly tcnn's ``params`` vector;
- the encoding is ``(N, levels * F)`` ordered level-major (feature ``l * F + f``), as tcnn outputs it.

Table entries start at U(-1e-4, 1e-4) (the paper's initialisation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from slicefield.representations._common import ReluMLP, check_points, generator, uniform_

log = logging.getLogger(__name__)

#: Default number of levels L.
HASH_LEVELS = 16
#: Default features per level F.
HASH_FEATURES_PER_LEVEL = 2
#: Default log2 of the per-level table size T (2^19 rows).
HASH_LOG2_TABLE_SIZE = 19
#: Default coarsest resolution (vertices per axis of level 0, tcnn convention).
HASH_BASE_RESOLUTION = 16
#: Default finest resolution (vertices per axis of the last level, tcnn convention): ~256 cells across the box.
HASH_FINEST_RESOLUTION = 256
#: Half-width of the uniform initialisation of the table (Müller et al. 2022, Sec. 4).
HASH_INIT_SCALE = 1e-4
#: Spatial hash primes per axis (Teschner et al. 2003 as used by tcnn's ``coherent_prime_hash``; x's is 1).
HASH_PRIMES = (1, 2654435761, 805459861)
#: Decoder hidden width and number of hidden layers (ReLU).
HASH_DECODER_WIDTH = 64
HASH_DECODER_LAYERS = 2
#: tcnn pads each level's row count to a multiple of this (aligned memory access).
TCNN_LEVEL_ALIGNMENT = 8

_UINT32_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class HashGridConfig:
    """Configuration of :class:`HashGrid` (names follow tiny-cuda-nn's ``HashGrid`` encoding)."""

    levels: int = HASH_LEVELS
    """Number of resolution levels L."""
    features_per_level: int = HASH_FEATURES_PER_LEVEL
    """Features per level F; the encoding has L * F features."""
    log2_table_size: int = HASH_LOG2_TABLE_SIZE
    """T: each hashed level has 2^T rows of F features."""
    base_resolution: int = HASH_BASE_RESOLUTION
    """Vertices per axis of the coarsest level (tcnn's ``base_resolution``)."""
    finest_resolution: int = HASH_FINEST_RESOLUTION
    """Vertices per axis wanted at the finest level; sets the per-level growth factor. Across a 200 mm box the
    default 256 gives ~0.8 mm cells."""
    decoder_width: int = HASH_DECODER_WIDTH
    """Hidden units of the ReLU decoder MLP."""
    decoder_layers: int = HASH_DECODER_LAYERS
    """Hidden layers of the ReLU decoder MLP."""
    implementation: Literal["torch", "compiled", "tcnn"] = "torch"
    """Encoding backend: "torch" (plain, what CI runs), "compiled" (the same function through
    ``torch.compile``; falls back to "torch" with a logged warning if compilation fails), "tcnn" (tiny-cuda-nn;
    needs ``tinycudann`` and CUDA, otherwise raises)."""
    seed: int = 0
    """Seed of the generator that draws the table and the decoder weights."""

    @property
    def per_level_scale(self) -> float:
        """Growth factor b between consecutive levels (tcnn's ``per_level_scale``)."""
        if self.levels == 1:
            return 1.0
        return math.exp((math.log(self.finest_resolution) - math.log(self.base_resolution)) / (self.levels - 1))


@dataclass(frozen=True)
class Level:
    """Geometry of one level: float32 ``scale``, ``resolution`` vertices per axis, rows ``[offset, offset+size)``."""

    scale: float
    resolution: int
    offset: int
    size: int
    dense: bool


def level_layout(config: HashGridConfig) -> list[Level]:
    """The per-level geometry and table offsets, computed as tiny-cuda-nn does (float32 scale)."""
    log2_b = np.float32(np.log2(np.float32(config.per_level_scale)))
    table = 1 << config.log2_table_size
    levels, offset = [], 0
    for lvl in range(config.levels):
        scale = np.float32(np.exp2(np.float32(lvl) * log2_b) * np.float32(config.base_resolution) - np.float32(1.0))
        resolution = int(math.ceil(float(scale))) + 1
        dense_rows = resolution**3
        size = min(-(-dense_rows // TCNN_LEVEL_ALIGNMENT) * TCNN_LEVEL_ALIGNMENT, table)
        levels.append(Level(float(scale), resolution, offset, size, dense_rows <= table))
        offset += size
    return levels


def corner_indices(u: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and trilinear weights of the 8 corners around each point at one level.

    ``u``: (N, 3) float32 normalised positions (clamped to [-1, 1]). Returns ``rows (N, 8) int64`` (absolute rows of
    the flat table, i.e. ``level.offset`` included) and ``weights (N, 8) float32`` (summing to 1). Corner ``c``
    takes the +1 vertex along axis ``d`` when bit ``d`` of ``c`` is set (tcnn's order). Work is done per axis
    (``(N, 2)`` terms) and combined by broadcasting, so nothing of shape ``(N, 8, 3)`` is built.
    """
    x = (u.clamp(-1.0, 1.0) + 1.0) * 0.5
    pos = x * torch.tensor(level.scale, dtype=torch.float32, device=u.device) + 0.5
    floor = torch.floor(pos)
    frac = pos - floor
    lo = floor.to(torch.int64)  # (N, 3), >= 0
    n = u.shape[0]
    if level.dense:
        r = level.resolution
        strides = (1, r, r * r)
        terms = [torch.stack([lo[:, d] * s, (lo[:, d] + 1) * s], dim=1) for d, s in enumerate(strides)]
        idx = terms[2][:, :, None, None] + terms[1][:, None, :, None] + terms[0][:, None, None, :]
    else:
        terms = [
            torch.stack([lo[:, d] * p, (lo[:, d] + 1) * p], dim=1) & _UINT32_MASK for d, p in enumerate(HASH_PRIMES)
        ]
        idx = terms[2][:, :, None, None] ^ terms[1][:, None, :, None] ^ terms[0][:, None, None, :]
    idx = idx.reshape(n, 8)
    if level.size & (level.size - 1) == 0:
        idx = idx & (level.size - 1)
    else:
        idx = idx % level.size
    rows = idx + level.offset
    w = [torch.stack([1.0 - frac[:, d], frac[:, d]], dim=1) for d in range(3)]
    weights = (w[2][:, :, None, None] * w[1][:, None, :, None] * w[0][:, None, None, :]).reshape(n, 8)
    return rows, weights


def encode_torch(u: torch.Tensor, table: torch.Tensor, levels: list[Level]) -> torch.Tensor:
    """Hash-grid features ``(N, L * F)`` float32 of positions ``u (N, 3)`` from the flat ``table (rows, F)``.

    All levels are gathered in one ``index_select`` so the backward pass scatters into a single table-sized
    gradient (not one per level). Peak extra memory is ~``N * L * 8 * (8 + 4 + 4 F)`` bytes (int64 rows, float32
    weights and gathered features): ~200 MB at N = 2^16, L = 16, F = 2; chunk larger queries.
    """
    rows, weights = zip(*(corner_indices(u, lvl) for lvl in levels), strict=True)
    rows_all = torch.stack(rows, dim=1)  # (N, L, 8)
    w_all = torch.stack(weights, dim=1)  # (N, L, 8)
    n, n_levels, _ = rows_all.shape
    feats = table.index_select(0, rows_all.reshape(-1)).view(n * n_levels, 8, table.shape[1])
    out = torch.bmm(w_all.reshape(n * n_levels, 1, 8), feats)  # (N L, 1, F)
    return out.view(n, n_levels * table.shape[1])


class HashGrid(nn.Module):
    """Hash-grid field: ``u (N, 3) float32 in [-1, 1]^3 -> intensity (N,) float32``.

    ``self.table``: (total_rows, F) float32, tcnn's parameter layout; ``self.levels``: the per-level geometry;
    ``self.decoder``: the ReLU MLP on the ``(N, L * F)`` encoding.
    """

    def __init__(self, config: HashGridConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or HashGridConfig()
        if config.finest_resolution < config.base_resolution:
            raise ValueError(
                f"finest_resolution ({config.finest_resolution}) must be >= base_resolution ({config.base_resolution})"
            )
        self.levels = level_layout(config)
        total = self.levels[-1].offset + self.levels[-1].size
        gen = generator(config.seed)
        self.table = nn.Parameter(torch.empty(total, config.features_per_level))
        uniform_(self.table, -HASH_INIT_SCALE, HASH_INIT_SCALE, gen=gen)
        self.decoder = ReluMLP(
            config.levels * config.features_per_level,
            hidden=config.decoder_width,
            n_hidden=config.decoder_layers,
            gen=gen,
        )
        self._encode = encode_torch
        self._tcnn: nn.Module | None = None
        if config.implementation == "compiled":
            self._encode = torch.compile(encode_torch, dynamic=True)
        elif config.implementation == "tcnn":
            self._setup_tcnn()
        elif config.implementation != "torch":
            raise ValueError(f"implementation must be 'torch', 'compiled' or 'tcnn', got {config.implementation!r}")

    def _setup_tcnn(self) -> None:
        try:
            import tinycudann as tcnn
        except ImportError as err:
            raise RuntimeError(
                "HashGrid(implementation='tcnn') needs the tinycudann package (tiny-cuda-nn's PyTorch bindings); "
                "install it on a CUDA machine or use implementation='torch'"
            ) from err
        if not torch.cuda.is_available():
            raise RuntimeError("HashGrid(implementation='tcnn') needs CUDA; use implementation='torch' on CPU")
        c = self.config
        encoding = tcnn.Encoding(
            3,
            {
                "otype": "HashGrid",
                "n_levels": c.levels,
                "n_features_per_level": c.features_per_level,
                "log2_hashmap_size": c.log2_table_size,
                "base_resolution": c.base_resolution,
                "per_level_scale": c.per_level_scale,
                "interpolation": "Linear",
            },
            dtype=torch.float32,
        )
        if encoding.params.numel() != self.table.numel():
            raise RuntimeError(
                f"tinycudann's HashGrid has {encoding.params.numel()} parameters but this layout has "
                f"{self.table.numel()}; the tcnn version's level layout differs from the one reproduced here"
            )
        # tcnn's own parameter is dropped and replaced, at each call, by a view of ``self.table``: the table stays the
        # single trained tensor and the only one in the state dict. The encoding is not registered as a submodule.
        del encoding.params
        object.__setattr__(self, "_tcnn", encoding.cuda())

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """The hash-grid encoding ``(N, L * F)`` float32 of normalised positions ``u (N, 3)``."""
        check_points(u)
        u = u.float()
        if self._tcnn is not None:
            if u.device.type != "cuda" or self.table.device.type != "cuda":
                raise RuntimeError("HashGrid(implementation='tcnn'): move the module and u to CUDA first")
            x = ((u.clamp(-1.0, 1.0) + 1.0) * 0.5).contiguous()
            self._tcnn.params = self.table.view(-1)  # share storage and autograd with the table
            return self._tcnn(x).float()
        if self._encode is not encode_torch:
            try:
                return self._encode(u, self.table, self.levels)
            except Exception as err:  # any compiler failure: fall back to the plain twin
                log.warning("HashGrid: torch.compile failed (%s: %s); falling back to 'torch'", type(err).__name__, err)
                self._encode = encode_torch
        return encode_torch(u, self.table, self.levels)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Intensities ``(N,)`` float32 at normalised positions ``u (N, 3)``."""
        return self.decoder(self.encode(u))
