"""The forward model: a volume on a voxel grid -> the values of a stack's slices, and its exact adjoint.

Each slice value is the PSF-weighted integral of the volume around the pixel centre (world mm). The PSF is
separable in the slice frame, so for a group of parallel slices sharing one in-plane grid (a motion-free stack
is one group; after per-slice motion each slice is its own group) the operator factorises as

    y = Mz . Mx . My . S x

where ``S`` samples the volume (trilinear, zero outside the grid) on a fine lattice in the group's slice
frame (in-plane step <= the grid spacing, through-plane step <= min(grid spacing, thickness / 2)), and
``Mx``, ``My``, ``Mz`` are small dense 1D quadrature matrices (:func:`~slicefield.acquisition.psf.profile_weights`).
The adjoint is the product of the transposes, so ``<A x, y> == <x, A^T y>`` holds to rounding.

Two implementations share that plan: :class:`StackOperator` caches ``S`` as a sparse matrix (fast, for
iterative solvers) and :func:`acquire` samples with ``scipy.ndimage.map_coordinates`` chunk by chunk (plain,
low memory, for simulation). ``tests/test_acquisition.py`` checks that they agree.

When no fine plane is shared by two slices of a group (a slice moved on its own after per-slice motion),
:class:`StackOperator` folds ``Mz`` into the cached sampler, ``S' = (Mz (x) I) S``: the same operator with one row
per in-plane lattice point and slice instead of one per fine point. Trilinear weights of neighbouring planes share
voxels, so ``S'`` holds about half the nonzeros of ``S`` (Colin27, 1 mm grid, a moved 4 mm axial stack: 0.48x)
and its adjoint runs about 2x faster (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from ..geometry import apply_affine, voxel_spacing
from ..volume import Stack
from .psf import INPLANE_FWHM_PER_SPACING, profile_halfwidth, profile_weights

#: Points per chunk when building or applying the sampler (bounds temporary memory).
_CHUNK_POINTS = 1_000_000


def _threaded(fn: Callable, items: Iterable) -> list:
    """``[fn(i) for i in items]`` on a thread per core (scipy.ndimage and large numpy ops release the GIL)."""
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


@dataclass
class SliceGroup:
    """Parallel slices of one stack that share one in-plane grid, with their quadrature plan.

    slices: ``(n_g,)`` indices into the stack. frame: ``(4, 4)`` slice frame (mm) -> world mm of the group.
    fine_x, fine_y, fine_z: fine lattice positions in the group's slice frame (mm).
    mx ``(ni, Fx)``, my ``(nj, Fy)``, mz ``(n_g, Fz)``: float32 quadrature weights.
    """

    slices: np.ndarray
    frame: np.ndarray
    fine_x: np.ndarray
    fine_y: np.ndarray
    fine_z: np.ndarray
    mx: np.ndarray
    my: np.ndarray
    mz: np.ndarray

    @property
    def fine_shape(self) -> tuple[int, int, int]:
        return (len(self.fine_z), len(self.fine_x), len(self.fine_y))

    def fine_points_world(self, z_index: slice = slice(None)) -> np.ndarray:
        """World mm RAS of the fine lattice points (planes ``z_index``), ``(Fz', Fx, Fy, 3)`` float64."""
        pts = np.stack(np.meshgrid(self.fine_z[z_index], self.fine_x, self.fine_y, indexing="ij"), axis=-1)
        return apply_affine(self.frame, pts[..., [1, 2, 0]])

    def contract(self, fine: np.ndarray) -> np.ndarray:
        """Fine lattice values ``(Fz, Fx, Fy)`` -> slice values ``(n_g, ni, nj)``."""
        fz, fx, fy = fine.shape
        t = (self.mz @ fine.reshape(fz, fx * fy)).reshape(-1, fx, fy)
        return self.mx @ (t @ self.my.T)

    def expand(self, values: np.ndarray) -> np.ndarray:
        """Adjoint of :meth:`contract`: ``(n_g, ni, nj)`` -> ``(Fz, Fx, Fy)``."""
        t = (self.mx.T @ values) @ self.my
        n, fx, fy = t.shape
        return (self.mz.T @ t.reshape(n, fx * fy)).reshape(-1, fx, fy)


def _lattice(lo: float, hi: float, step: float, halfwidth: float) -> np.ndarray:
    """Regular positions with ``step`` covering ``[lo - halfwidth, hi + halfwidth]``, anchored at ``lo``."""
    pad = int(np.ceil(halfwidth / step - 1e-9))
    n = int(np.floor((hi - lo) / step + 1e-9)) + 1
    return lo + step * np.arange(-pad, n + pad)


def slice_groups(stack: Stack, *, atol_mm: float = 1e-4) -> list[np.ndarray]:
    """Partition a stack's slices into groups of parallel slices sharing an in-plane grid."""
    groups: list[list[int]] = []
    for s in range(stack.n_slices):
        m = stack.slice_to_world[s]
        for g in groups:
            r = stack.slice_to_world[g[0]]
            if not np.allclose(m[:3, :3], r[:3, :3], atol=1e-7):
                continue
            d = r[:3, :3].T @ (m[:3, 3] - r[:3, 3])
            if abs(d[0]) < atol_mm and abs(d[1]) < atol_mm:
                g.append(s)
                break
        else:
            groups.append([s])
    return [np.array(g) for g in groups]


def plan_groups(stack: Stack, grid_spacing_mm: np.ndarray, *, step_mm: float | None = None) -> list[SliceGroup]:
    """Quadrature plan for every slice group of ``stack`` against a grid of ``grid_spacing_mm`` voxels.

    step_mm: target fine-lattice step; default the smallest grid spacing. Smaller is more accurate and slower.
    """
    step = float(np.min(grid_spacing_mm)) if step_mm is None else float(step_mm)
    ni, nj = stack.data.shape[1:]
    dx, dy = stack.spacing
    kind = stack.psf
    inplane_w = (INPLANE_FWHM_PER_SPACING if kind == "gaussian" else 1.0) * np.array([dx, dy])
    plans = []
    for idx in slice_groups(stack):
        frame = stack.slice_to_world[idx[0]]
        z = (stack.slice_to_world[idx, :3, 3] - frame[:3, 3]) @ frame[:3, 2]
        mats, fines = [], []
        for n, d, w in ((ni, dx, inplane_w[0]), (nj, dy, inplane_w[1])):
            h = d / max(1, int(np.ceil(d / step - 1e-6)))
            fine = _lattice(0.0, (n - 1) * d, h, profile_halfwidth(kind, w))
            mats.append(profile_weights(np.arange(n) * d, fine, h, kind=kind, width_mm=w))
            fines.append(fine)
        hz = min(step, stack.thickness / 2.0)
        fine_z = _lattice(z.min(), z.max(), hz, profile_halfwidth(kind, stack.thickness))
        mz = profile_weights(z, fine_z, hz, kind=kind, width_mm=stack.thickness)
        plans.append(
            SliceGroup(
                slices=idx,
                frame=frame,
                fine_x=fines[0],
                fine_y=fines[1],
                fine_z=fine_z,
                mx=mats[0].astype(np.float32),
                my=mats[1].astype(np.float32),
                mz=mz.astype(np.float32),
            )
        )
    return plans


def trilinear_matrix(points_vox: np.ndarray, grid_shape: tuple[int, int, int]) -> sp.csr_matrix:
    """Sparse ``(N, prod(grid_shape))`` trilinear interpolation at voxel coordinates ``(N, 3)``.

    Zero outside the grid (as ``map_coordinates(order=1, mode="grid-constant", cval=0)``); C-order flat index.
    Coordinates within 1e-6 voxel of an integer are snapped, so an axis-aligned lattice gives a pure gather.
    """
    p = np.asarray(points_vox, dtype=np.float64)
    n = p.shape[0]
    strides = (grid_shape[1] * grid_shape[2], grid_shape[2], 1)
    axes = []  # per axis: list of (index contribution, weight, inside) for offsets 0 and 1
    for a in range(3):
        c = p[:, a]
        r = np.round(c)
        c = np.where(np.abs(c - r) < 1e-6, r, c)
        base = np.floor(c)
        frac = (c - base).astype(np.float32)
        base = base.astype(np.int64)
        terms = [(base, 1.0 - frac)]
        if np.any(frac > 0):
            terms.append((base + 1, frac))
        axes.append([(i * strides[a], w, (i >= 0) & (i < grid_shape[a])) for i, w in terms])
    cols, vals = [], []
    for ix, wx, okx in axes[0]:
        for iy, wy, oky in axes[1]:
            for iz, wz, okz in axes[2]:
                ok = okx & oky & okz
                vals.append(np.where(ok, wx * wy * wz, np.float32(0.0)))
                cols.append(np.where(ok, ix + iy + iz, 0))
    k = len(vals)
    index_dtype = np.int32 if np.prod(grid_shape) < 2**31 else np.int64
    m = sp.csr_matrix(
        (
            np.stack(vals, axis=1).ravel(),
            np.stack(cols, axis=1).astype(index_dtype).ravel(),
            np.arange(0, k * n + 1, k, dtype=np.int64),
        ),
        shape=(n, int(np.prod(grid_shape))),
    )
    m.eliminate_zeros()
    return m


def fold_through_plane(group: SliceGroup, sampler: sp.csr_matrix) -> tuple[SliceGroup, sp.csr_matrix]:
    """``(group, S)`` -> ``(group', (Mz (x) I) S)`` when every fine plane serves at most one slice of the group.

    The folded group has ``mz`` = identity and ``fine_z`` = its slices' positions, so ``fine_shape`` is
    ``(n_g, Fx, Fy)`` and :meth:`SliceGroup.contract` / :meth:`SliceGroup.expand` apply the same operator as
    before. Otherwise (planes shared by neighbouring slices, as in a motion-free stack, where folding would
    duplicate them) the pair is returned unchanged.
    """
    if np.count_nonzero(group.mz, axis=0).max(initial=0) > 1:
        return group, sampler
    n_g = len(group.slices)
    per_plane = len(group.fine_x) * len(group.fine_y)
    mz = sp.csr_matrix(group.mz)
    folded = (sp.kron(mz, sp.identity(per_plane, dtype=np.float32, format="csr"), format="csr") @ sampler).tocsr()
    slice_z = (group.mz @ group.fine_z) / np.maximum(group.mz.sum(axis=1), 1e-12)  # PSF centres (mm), bookkeeping
    return replace(group, fine_z=slice_z, mz=np.eye(n_g, dtype=np.float32)), folded


class StackOperator:
    """The linear map from a volume on a voxel grid to one stack's slices, with its exact adjoint.

    grid_shape, grid_affine: the volume's grid (voxel -> world mm RAS). forward: ``(X, Y, Z)`` -> ``(n, ni, nj)``.
    Builds and keeps one sparse sampler per slice group (about 8 nonzeros per fine-lattice point; about 4 per
    in-plane point and fine plane where the through-plane quadrature is folded in, see
    :func:`fold_through_plane`). ``groups`` are the plans as applied (folded ones included).
    """

    def __init__(
        self,
        stack: Stack,
        grid_shape: tuple[int, int, int],
        grid_affine: np.ndarray,
        *,
        step_mm: float | None = None,
    ):
        self.stack_shape = stack.data.shape
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.groups = plan_groups(stack, voxel_spacing(grid_affine), step_mm=step_mm)
        world_to_vox = np.linalg.inv(grid_affine)
        if len(self.groups) == 1:  # one large group (a motion-free stack): a thread per chunk of fine planes
            built = [self._sampler(self.groups[0], world_to_vox, threads=True)]
        else:  # many small groups (slices moved on their own): a thread per group
            built = _threaded(lambda g: self._sampler(g, world_to_vox, threads=False), self.groups)
        self.groups = [g for g, _ in built]
        self.samplers = [m for _, m in built]

    def _sampler(self, g: SliceGroup, world_to_vox: np.ndarray, *, threads: bool) -> tuple[SliceGroup, sp.csr_matrix]:
        chunk = max(1, _CHUNK_POINTS // (len(g.fine_x) * len(g.fine_y)))

        def block(z0: int) -> sp.csr_matrix:
            pts = apply_affine(world_to_vox, g.fine_points_world(slice(z0, z0 + chunk)))
            return trilinear_matrix(pts.reshape(-1, 3), self.grid_shape)

        starts = range(0, len(g.fine_z), chunk)
        blocks = _threaded(block, starts) if threads else [block(z0) for z0 in starts]
        return fold_through_plane(g, sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0])

    @property
    def nnz(self) -> int:
        return int(sum(m.nnz for m in self.samplers))

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Volume ``(X, Y, Z)`` -> slice values ``(n, ni, nj)`` float32."""
        flat = np.asarray(x, dtype=np.float32).ravel()
        out = np.zeros(self.stack_shape, dtype=np.float32)
        for g, s in zip(self.groups, self.samplers, strict=True):
            out[g.slices] = g.contract((s @ flat).reshape(g.fine_shape))
        return out

    def adjoint(self, y: np.ndarray) -> np.ndarray:
        """Slice values ``(n, ni, nj)`` -> volume ``(X, Y, Z)`` float32 (the exact transpose of forward)."""
        y = np.asarray(y, dtype=np.float32)
        out = np.zeros(int(np.prod(self.grid_shape)), dtype=np.float32)
        for g, s in zip(self.groups, self.samplers, strict=True):
            out += s.T @ g.expand(y[g.slices]).ravel()
        return out.reshape(self.grid_shape)


def acquire(
    volume_data: np.ndarray,
    volume_affine: np.ndarray,
    stack: Stack,
    *,
    step_mm: float | None = None,
) -> np.ndarray:
    """Slice values ``(n, ni, nj)`` that ``stack``'s geometry and PSF would measure from a volume.

    Matrix-free twin of :class:`StackOperator` (same quadrature, sampled with ``map_coordinates``), for
    simulation: memory stays bounded by chunking the fine lattice. ``volume_affine``: voxel -> world mm RAS.
    """
    data = np.asarray(volume_data, dtype=np.float32)
    world_to_vox = np.linalg.inv(volume_affine)
    out = np.zeros(stack.data.shape, dtype=np.float32)
    for g in plan_groups(stack, voxel_spacing(volume_affine), step_mm=step_mm):
        chunk = max(1, _CHUNK_POINTS // (len(g.fine_x) * len(g.fine_y)))

        def partial(z0: int, g: SliceGroup = g, chunk: int = chunk) -> np.ndarray:
            pts = apply_affine(world_to_vox, g.fine_points_world(slice(z0, z0 + chunk)))
            vals = ndimage.map_coordinates(
                data, np.moveaxis(pts, -1, 0), order=1, mode="grid-constant", cval=0.0, prefilter=False
            )
            k = vals.shape[0]
            return (g.mz[:, z0 : z0 + k] @ vals.reshape(k, -1)).reshape(len(g.slices), len(g.fine_x), len(g.fine_y))

        starts = list(range(0, len(g.fine_z), chunk))
        acc = np.zeros((len(g.slices), len(g.fine_x), len(g.fine_y)), dtype=np.float32)
        workers = os.cpu_count() or 1
        for i in range(0, len(starts), workers):  # a few chunks in flight at a time: memory stays bounded
            for part in _threaded(partial, starts[i : i + workers]):
                acc += part
        out[g.slices] = g.mx @ (acc @ g.my.T)
    return out
