"""Sanity checks on loaded stacks: slice gaps and overlaps, unusual voxel shapes, stacks that miss each other.

Problems that make reconstruction impossible raise :class:`SlicefieldError`; doubtful but usable inputs
return warnings (one line each, naming the stack, the problem and the fix).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import SlicefieldError
from ..volume import Stack

#: A gap or overlap between slices smaller than this fraction of the slice spacing is not reported.
GAP_TOLERANCE = 0.05

#: Default for ``check_overlap``: warn when two stacks share less than this fraction of the smaller box.
MIN_OVERLAP_FRACTION = 0.5


def _label(stack: Stack) -> str:
    """How messages name a stack: its file name when it was loaded from one, else its name."""
    path = stack.meta.get("path")
    return Path(path).name if path else stack.name


def check_stack(stack: Stack) -> list[str]:
    """Warnings about one stack's geometry (an empty list when it looks ordinary).

    - slice thickness vs slice spacing along the normal: gaps or overlaps larger than
      :data:`GAP_TOLERANCE` x spacing;
    - in-plane pixels larger than the slice thickness (unusual for a slice stack: wrong slice axis?);
    - uneven steps between consecutive slices (a slice missing from a series, or two series mixed).
    """
    name = stack.name
    warnings: list[str] = []
    if stack.n_slices >= 2:
        spacing, thickness = stack.slice_spacing, stack.thickness
        gap = spacing - thickness
        if gap > GAP_TOLERANCE * spacing:
            warnings.append(
                f"{name}: slice thickness {thickness:.1f} mm but slices are {spacing:.1f} mm apart "
                f"({gap:.1f} mm gaps); pass --thickness if the header is wrong"
            )
        elif -gap > GAP_TOLERANCE * spacing:
            warnings.append(
                f"{name}: slice thickness {thickness:.1f} mm but slices are {spacing:.1f} mm apart "
                f"({-gap:.1f} mm overlap); pass --thickness if the header is wrong"
            )
    if stack.n_slices >= 3:
        steps = np.abs(np.diff(np.sort(stack.slice_positions_mm())))
        spacing = stack.slice_spacing
        if spacing > 0 and np.max(np.abs(steps - spacing)) > GAP_TOLERANCE * spacing:
            warnings.append(
                f"{name}: slices are unevenly spaced (steps from {steps.min():.1f} to {steps.max():.1f} mm, "
                f"median {spacing:.1f} mm); a slice missing from the series? Each slice is modelled at its own "
                "position, but check the input if this is unexpected"
            )
    dx, dy = stack.spacing
    if max(dx, dy) > stack.thickness * (1 + GAP_TOLERANCE):
        warnings.append(
            f"{name}: in-plane pixels ({dx:.2f} x {dy:.2f} mm) are larger than the slice thickness "
            f"({stack.thickness:.2f} mm), which is unusual; check the slice axis and the thickness"
        )
    return warnings


def _box(stack: Stack) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world mm RAS bounding box ``(lo (3,), hi (3,))`` of a stack's field of view.

    The box of the slice corners (pixel centres) is padded by half the largest of pixel size and thickness,
    so a single slice still has a volume.
    """
    corners = stack.world_corners()
    pad = 0.5 * max(*stack.spacing, stack.thickness)
    return corners.min(axis=0) - pad, corners.max(axis=0) + pad


def check_overlap(stacks: Sequence[Stack], *, min_fraction: float = MIN_OVERLAP_FRACTION) -> list[str]:
    """Check that every pair of stacks overlaps in world space (world mm RAS bounding boxes).

    Raises SlicefieldError naming both files when two boxes do not intersect at all (wrong header or
    unregistered stacks). Returns a warning for each pair whose intersection is less than ``min_fraction``
    of the smaller box's volume.
    """
    warnings: list[str] = []
    boxes = [_box(s) for s in stacks]
    for (a, (lo_a, hi_a)), (b, (lo_b, hi_b)) in itertools.combinations(zip(stacks, boxes, strict=True), 2):
        extent = np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b)
        if np.any(extent <= 0):
            distance = float(np.linalg.norm(np.maximum(-extent, 0.0)))
            raise SlicefieldError(
                f"does not overlap {_label(b)} in world space (fields of view {distance:.1f} mm apart)",
                path=_label(a),
                fix="check both headers (sform/qform) or register the stacks first",
            )
        inter = float(np.prod(extent))
        smaller = min(float(np.prod(hi_a - lo_a)), float(np.prod(hi_b - lo_b)))
        fraction = inter / smaller
        if fraction < min_fraction:
            warnings.append(
                f"{_label(a)} and {_label(b)} share only {100 * fraction:.0f}% of their fields of view; "
                "check the headers or register the stacks first"
            )
    return warnings


def check_inputs(stacks: Sequence[Stack], *, min_overlap_fraction: float = MIN_OVERLAP_FRACTION) -> list[str]:
    """Run every input check on a set of stacks; returns all warnings, raises SlicefieldError on fatal ones."""
    if len(stacks) == 0:
        raise SlicefieldError("no input stacks", fix="pass at least one stack")
    warnings: list[str] = []
    for stack in stacks:
        warnings.extend(check_stack(stack))
    warnings.extend(check_overlap(stacks, min_fraction=min_overlap_fraction))
    return warnings
