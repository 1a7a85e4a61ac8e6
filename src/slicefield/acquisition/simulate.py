"""Simulated acquisitions: thick-slice stacks from a known volume, through the forward model.

Random parameters are sampled first (:func:`sample_simulation`) and then applied deterministically
(:func:`apply_simulation`), so the record written to ``simulation.json`` replays an acquisition exactly.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from ..errors import SlicefieldError
from ..geometry import rotation_matrix
from ..volume import PSF_KINDS, PSFKind, Stack, Volume
from .corrupt import apply_corruption, object_fraction, sample_corruptions
from .operator import acquire

#: Stack frames (columns: in-plane x, in-plane y, slice normal) in world RAS for the named orientations.
ORIENTATION_FRAMES: dict[str, np.ndarray] = {
    "axial": np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]),  # x=R, y=A, normal=S
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]),  # x=R, y=S, normal=A
    "sagittal": np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]),  # x=A, y=S, normal=R
}

#: Seed-sequence key of the random stream that draws corrupted slices (separate, so that turning corruption on
#: leaves the motion and noise of a seed unchanged).
CORRUPTION_STREAM = 1

#: Simulated noise is this kind of distribution.
NoiseKind = Literal["gaussian", "rician"]


@dataclass(frozen=True)
class SimulationConfig:
    """How to acquire stacks from a volume."""

    orientations: tuple[str, ...] = ("axial", "coronal", "sagittal")
    """Stack orientations: axial, coronal, sagittal, each optionally tilted, e.g. ``axial@10,0,5`` (degrees
    about world x, y, z, applied about the volume centre)."""
    thickness: float = 4.0
    """Slice thickness in mm (FWHM of the Gaussian profile, or width of the box)."""
    gap: float = 0.0
    """Gap between slices in mm (negative: overlap). Slice spacing = thickness + gap."""
    inplane: float | None = None
    """In-plane pixel spacing in mm; default the volume's smallest voxel size."""
    psf: PSFKind = "gaussian"
    """Slice profile: gaussian or box."""
    noise: float = 0.01
    """Noise standard deviation as a fraction of the volume's maximum intensity."""
    noise_kind: NoiseKind = "gaussian"
    """gaussian (additive) or rician (magnitude of complex Gaussian noise)."""
    motion_deg: float = 0.0
    """Per-slice rigid motion: rotations uniform in +-motion_deg about each world axis."""
    motion_mm: float = 0.0
    """Per-slice rigid motion: translations uniform in +-motion_mm along each world axis."""
    seed: int = 0
    """Seed for every random draw."""
    step_mm: float | None = None
    """Quadrature step of the simulation's forward model; default half the volume's voxel size (finer than
    reconstruction uses, to avoid an inverse crime)."""
    corrupt_fraction: float = 0.0
    """Share of each stack's slices (rounded) replaced by artefacts (signal dropout band, stripes, ghost; see
    :mod:`slicefield.acquisition.corrupt`), drawn among slices through the object; recorded per slice."""


@dataclass
class StackRecord:
    """Everything that determines one simulated stack (JSON-serialisable)."""

    name: str
    shape: tuple[int, int, int]
    slice_to_world: list
    """Nominal (motion-free) poses, ``(n, 4, 4)`` slice frame mm -> world mm RAS."""
    motion: list
    """Per-slice world -> world rigid transforms applied on top of the nominal poses, ``(n, 4, 4)``."""
    noise_seed: int
    corruptions: list = field(default_factory=list)
    """Corrupted slices, applied after acquisition and before noise: ``[{"slice", "kind", "params"}, ...]``."""


@dataclass
class SimulationRecord:
    config: dict
    stacks: list[StackRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"config": self.config, "stacks": [asdict(s) for s in self.stacks]}

    @classmethod
    def from_json(cls, d: dict) -> SimulationRecord:
        stacks = [StackRecord(**{**s, "shape": tuple(s["shape"])}) for s in d["stacks"]]
        return cls(config=d["config"], stacks=stacks)


def split_orientations(text: str) -> tuple[str, ...]:
    """``"axial@10,5,0,coronal,sagittal@0,0,8"`` -> ``("axial@10,5,0", "coronal", "sagittal@0,0,8")``.

    Commas separate orientations only where a name follows, so tilt angles may contain commas too.
    """
    return tuple(p.strip() for p in re.split(r",\s*(?=[A-Za-z])", text) if p.strip())


def parse_orientation(spec: str) -> np.ndarray:
    """``"axial"`` or ``"axial@rx,ry,rz"`` -> 3x3 stack frame (columns x, y, normal) in world RAS."""
    name, _, angles = spec.strip().partition("@")
    if name not in ORIENTATION_FRAMES:
        raise SlicefieldError(
            f"unknown orientation {spec!r}", fix=f"use one of {', '.join(ORIENTATION_FRAMES)}, optionally @rx,ry,rz"
        )
    frame = ORIENTATION_FRAMES[name]
    if angles:
        try:
            rot = rotation_matrix([float(a) for a in angles.split(",")])
        except (ValueError, TypeError) as e:
            raise SlicefieldError(f"bad orientation angles in {spec!r}", fix="write e.g. axial@10,0,5") from e
        frame = rot @ frame
    return frame


def stack_geometry(
    volume: Volume,
    frame: np.ndarray,
    *,
    inplane: float,
    thickness: float,
    gap: float,
    psf: PSFKind,
    name: str,
) -> Stack:
    """An empty stack with stack frame ``frame`` (3x3, world RAS) whose slices cover the volume's field of view."""
    spacing = thickness + gap
    if spacing <= 0:
        raise SlicefieldError(f"thickness {thickness} + gap {gap} must be > 0", fix="use a smaller overlap")
    center = volume.world_corners().mean(axis=0)
    local = (volume.world_corners() - center) @ frame
    lo, hi = local.min(axis=0), local.max(axis=0)
    ni = int(np.floor((hi[0] - lo[0]) / inplane + 1e-6)) + 1
    nj = int(np.floor((hi[1] - lo[1]) / inplane + 1e-6)) + 1
    ns = int(np.floor((hi[2] - lo[2]) / spacing + 1e-6)) + 1
    # centre the slice grid on the field of view along every axis
    start = (
        np.array(
            [
                -(ni - 1) * inplane / 2,
                -(nj - 1) * inplane / 2,
                -(ns - 1) * spacing / 2,
            ]
        )
        + (lo + hi) / 2
    )
    poses = np.tile(np.eye(4), (ns, 1, 1))
    poses[:, :3, :3] = frame
    poses[:, :3, 3] = center + (start[None] + np.outer(np.arange(ns), [0, 0, spacing])) @ frame.T
    return Stack(np.zeros((ns, ni, nj), np.float32), poses, (inplane, inplane), thickness, psf=psf, name=name)


def sample_simulation(volume: Volume, config: SimulationConfig) -> SimulationRecord:
    """Draw every random parameter of an acquisition (motion, noise seeds) into a replayable record."""
    if config.psf not in PSF_KINDS:
        raise SlicefieldError(f"unknown psf {config.psf!r}", fix=f"use one of {', '.join(PSF_KINDS)}")
    rng = np.random.default_rng(config.seed)
    corrupt_rng = np.random.default_rng([config.seed, CORRUPTION_STREAM])  # leaves the other draws unchanged
    inplane = float(np.min(volume.spacing)) if config.inplane is None else config.inplane
    center = volume.world_corners().mean(axis=0)
    record = SimulationRecord(config=asdict(config))
    for k, spec in enumerate(config.orientations):
        geom = stack_geometry(
            volume,
            parse_orientation(spec),
            inplane=inplane,
            thickness=config.thickness,
            gap=config.gap,
            psf=config.psf,
            name=f"stack_{k}_{spec.split('@')[0]}",
        )
        motion = np.tile(np.eye(4), (geom.n_slices, 1, 1))
        if config.motion_deg > 0 or config.motion_mm > 0:
            angles = rng.uniform(-config.motion_deg, config.motion_deg, (geom.n_slices, 3))
            shifts = rng.uniform(-config.motion_mm, config.motion_mm, (geom.n_slices, 3))
            for s in range(geom.n_slices):
                rot = rotation_matrix(angles[s])
                motion[s, :3, :3] = rot
                motion[s, :3, 3] = center - rot @ center + shifts[s]
        record.stacks.append(
            StackRecord(
                name=geom.name,
                shape=tuple(int(n) for n in geom.data.shape),
                slice_to_world=geom.slice_to_world.tolist(),
                motion=motion.tolist(),
                noise_seed=int(rng.integers(2**31)),
                corruptions=[]
                if config.corrupt_fraction <= 0
                else sample_corruptions(corrupt_rng, object_fraction(volume, geom), fraction=config.corrupt_fraction),
            )
        )
    return record


def add_noise(values: np.ndarray, *, std: float, kind: NoiseKind, seed: int) -> np.ndarray:
    """Deterministic noise of standard deviation ``std`` (same units as values)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return (values + rng.normal(0.0, std, values.shape)).astype(np.float32)
    if kind == "rician":
        re = values + rng.normal(0.0, std, values.shape)
        im = rng.normal(0.0, std, values.shape)
        return np.sqrt(re**2 + im**2).astype(np.float32)
    raise ValueError(f"unknown noise kind {kind!r}")


def apply_simulation(volume: Volume, record: SimulationRecord, *, progress=None) -> list[Stack]:
    """Acquire the stacks a record describes (deterministic).

    Returned stacks carry the *nominal* poses (what a scanner header would say); the motion applied during
    acquisition is only in the record. ``progress``: optional callable(stack_index) after each stack.
    """
    cfg = SimulationConfig(**{**record.config, "orientations": tuple(record.config["orientations"])})
    step = float(np.min(volume.spacing)) / 2 if cfg.step_mm is None else cfg.step_mm
    std = cfg.noise * float(np.max(volume.data))
    stacks = []
    for k, rec in enumerate(record.stacks):
        nominal = np.asarray(rec.slice_to_world)
        moved = np.asarray(rec.motion) @ nominal
        geom = Stack(
            np.zeros(rec.shape, np.float32),
            moved,
            (cfg.inplane or float(np.min(volume.spacing)),) * 2,
            cfg.thickness,
            psf=cfg.psf,
            name=rec.name,
        )
        values = acquire(volume.data, volume.affine, geom, step_mm=step)
        for c in rec.corruptions:
            values[c["slice"]] = apply_corruption(values[c["slice"]], c, intensity_max=float(np.max(volume.data)))
        if std > 0:
            values = add_noise(values, std=std, kind=cfg.noise_kind, seed=rec.noise_seed)
        stacks.append(Stack(values, nominal, geom.spacing, cfg.thickness, psf=cfg.psf, name=rec.name))
        if progress is not None:
            progress(k)
    return stacks


def simulate(volume: Volume, config: SimulationConfig) -> tuple[list[Stack], SimulationRecord]:
    """Sample an acquisition, then apply it: stacks (nominal poses) and the replayable record."""
    record = sample_simulation(volume, config)
    return apply_simulation(volume, record), record
