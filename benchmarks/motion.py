"""Motion benchmark (issue 4): per-slice motion and corrupted slices on a known volume, with and without correction.

Usage: ``python benchmarks/motion.py ../shared/data/ch2bet.nii.gz --json benchmarks/results/colin_motion.json``
(held-out check: ``python benchmarks/motion.py mni --seed 1 --cases 3``; where the oracle's loss comes from:
``python benchmarks/motion.py ../shared/data/ch2bet.nii.gz --breakdown --cases 3``, see :func:`oracle_breakdown`).

Acquisition (``slicefield simulate``'s model): three orthogonal 4 mm stacks (Gaussian PSF, 1 mm in-plane), Gaussian
noise 1 % of the maximum, per-slice rigid motion uniform in +-5 deg about each world axis (about the volume centre)
and +-5 mm along each, 5 % of the slices corrupted (signal dropout band, stripes or ghost); seed 0. Then the same
with two stacks (axial + sagittal). Rows, each reconstructed on the reference grid:

- ``srr, motion-free``: the same acquisition without motion or corrupted slices (the target);
- ``bspline`` / ``srr, no correction``: the moving acquisition, header poses;
- ``srr, --motion slice --reject-outliers``: :func:`slicefield.motion.svr.reconstruct_with_motion`, defaults;
- ``srr, true poses (oracle)``: the moving acquisition with the simulator's poses and the corrupted slices left
  out: what perfect motion estimation and outlier rejection could give.

Coverage (``coverage`` in the JSON): per brain voxel, the PSF weight the oracle's slices place on it over the
motion-free stacks' (:func:`slicefield.motion.coverage.slice_coverage`); the share of the brain in bins of that ratio
and the RMS error of the oracle and of the motion-free ``srr`` in each bin. Where the moved slices leave gaps the
oracle is worse; where they cover the brain as densely as the motion-free stacks it is not.

Metrics against the truth inside ``foreground_mask(truth)``; "aligned" = after rigidly registering the
reconstruction to the truth (SimpleITK, correlation) and resampling it (cubic B-spline): a reconstruction's frame
is only fixed up to the head's unknown mean position. Pose errors are measured at each slice's centre, over slices
that contain brain (>= 100 foreground pixels) and are not corrupted; "aligned" removes the global rigid offset
(mean rotation vector and mean displacement) first. Flagged = robust z-score above the threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from slicefield.acquisition.operator import StackOperator
from slicefield.acquisition.simulate import SimulationConfig, SimulationRecord, apply_simulation, sample_simulation
from slicefield.baselines.bspline import bspline_average
from slicefield.baselines.srr import srr
from slicefield.io import load_volume
from slicefield.itk import resample
from slicefield.metrics import evaluate, foreground_mask
from slicefield.motion.coverage import slice_coverage
from slicefield.motion.register import RegistrationConfig, rigid_register
from slicefield.motion.svr import MotionConfig, MotionResult, reconstruct_with_motion
from slicefield.motion.transforms import pose_errors, rigid_about, slice_center
from slicefield.runs import Timer, environment, to_jsonable
from slicefield.volume import Stack, Volume

MOTION = SimulationConfig(noise=0.01, motion_deg=5.0, motion_mm=5.0, corrupt_fraction=0.05, seed=0)
#: Slices with fewer foreground pixels are left out of the pose-error statistics (nothing to register).
MIN_PIXELS = 100
#: Bins of (oracle coverage / motion-free coverage) for the coverage table.
COVERAGE_BINS = (0.0, 0.5, 0.8, 1.2, np.inf)


def _metrics(truth: Volume, data: np.ndarray, mask: np.ndarray) -> dict:
    m = evaluate(truth.data, data, mask=mask)
    t, _ = rigid_register(
        truth, Volume(data, truth.affine), config=RegistrationConfig(metric="correlation", sampling=0.2)
    )
    aligned = resample(data, t @ truth.affine, shape=truth.shape, target_affine=truth.affine)
    a = evaluate(truth.data, aligned, mask=mask)
    return {
        "psnr_masked": m["psnr_masked"],
        "ssim_masked": m["ssim_masked"],
        "psnr_masked_aligned": a["psnr_masked"],
        "ssim_masked_aligned": a["ssim_masked"],
    }


def _true_poses(record: SimulationRecord) -> list[np.ndarray]:
    return [np.asarray(r.motion) @ np.asarray(r.slice_to_world) for r in record.stacks]


def coverage_statistics(
    truth: Volume, mask: np.ndarray, relative: np.ndarray, oracle: np.ndarray, free: np.ndarray
) -> list[dict]:
    """Per bin of ``relative`` coverage (oracle / motion-free, ``truth.shape``): share of the brain ``mask`` and the
    RMS error of the ``oracle`` and motion-free (``free``) reconstructions there (intensity units)."""
    out = []
    for lo, hi in zip(COVERAGE_BINS[:-1], COVERAGE_BINS[1:], strict=True):
        sel = mask & (relative >= lo) & (relative < hi)
        n = int(sel.sum())

        def rmse(x: np.ndarray, sel: np.ndarray = sel, n: int = n) -> float:
            return float(np.sqrt(np.mean((x[sel] - truth.data[sel]) ** 2))) if n else float("nan")

        out.append(
            {
                "relative_coverage": [lo, hi],
                "brain_share": n / int(mask.sum()),
                "rmse_oracle": rmse(oracle),
                "rmse_motion_free": rmse(free),
            }
        )
    return out


def pose_statistics(stacks: list[Stack], record: SimulationRecord, result: MotionResult) -> dict:
    """Median / 90th percentile pose errors (raw and with the global offset removed) and outlier detection."""
    from scipy.spatial.transform import Rotation

    truth, est, centers, corrupted_total, hits, false, clean = [], [], [], 0, 0, 0, 0
    for st, rec, m, true in zip(stacks, record.stacks, result.slices, _true_poses(record), strict=True):
        bad = {c["slice"] for c in rec.corruptions}
        keep = (m.pixels >= MIN_PIXELS) & ~np.isin(np.arange(st.n_slices), sorted(bad))
        truth.append(true[keep])
        est.append(m.poses[keep])
        centers += [slice_center(st.spacing, st.data.shape[1:])] * int(keep.sum())
        corrupted_total += len(bad)
        hits += len(bad & set(m.flagged))
        false += len(set(m.flagged) - bad)
        clean += st.n_slices - len(bad)
    truth, est = np.concatenate(truth), np.concatenate(est)

    def errors(poses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = [pose_errors(t[None], p[None], c) for t, p, c in zip(truth, poses, centers, strict=True)]
        return np.array([a[0] for a, _ in out]), np.array([d[0] for _, d in out])

    angle, shift = errors(est)
    corr = truth @ np.linalg.inv(est)
    center = truth[:, :3, 3].mean(axis=0)
    omega = Rotation.from_matrix(corr[:, :3, :3]).as_rotvec().mean(axis=0)
    offset = (corr[:, :3, :3] @ center + corr[:, :3, 3] - center).mean(axis=0)
    angle_a, shift_a = errors(rigid_about(omega, offset, center)[None] @ est)
    header = np.concatenate(
        [
            m.header_poses[
                (m.pixels >= MIN_PIXELS) & ~np.isin(np.arange(len(m.pixels)), [c["slice"] for c in r.corruptions])
            ]
            for m, r in zip(result.slices, record.stacks, strict=True)
        ]
    )
    angle0, shift0 = errors(header)
    return {
        "slices_scored": len(angle),
        "initial_median_deg": float(np.median(angle0)),
        "initial_median_mm": float(np.median(shift0)),
        "median_deg": float(np.median(angle)),
        "median_mm": float(np.median(shift)),
        "p90_deg": float(np.percentile(angle, 90)),
        "p90_mm": float(np.percentile(shift, 90)),
        "global_offset_deg": float(np.degrees(np.linalg.norm(omega))),
        "global_offset_mm": float(np.linalg.norm(offset)),
        "aligned_median_deg": float(np.median(angle_a)),
        "aligned_median_mm": float(np.median(shift_a)),
        "corrupted": corrupted_total,
        "corrupted_flagged": hits,
        "recall": hits / max(corrupted_total, 1),
        "false_flagged": false,
        "clean_slices": clean,
        "false_positive_rate": false / max(clean, 1),
    }


def run_case(
    truth: Volume, orientations: tuple[str, ...], *, seed: int = 0, simulation: SimulationConfig = MOTION, log
) -> dict:
    mask = foreground_mask(truth.data)
    grid = Volume(np.zeros(truth.shape, np.float32), truth.affine)
    rows: list[dict] = []

    def add(name: str, fn) -> np.ndarray:
        with Timer() as timer:
            data = fn()
        row = {
            "method": name,
            **_metrics(truth, data, mask),
            "seconds": timer.seconds,
            "peak_rss_mb": timer.peak_rss_mb,
        }
        log(f"  {row}")
        rows.append(row)
        return data

    config = replace(simulation, orientations=orientations, seed=seed)
    t0 = time.perf_counter()
    free = apply_simulation(
        truth, sample_simulation(truth, replace(config, motion_deg=0, motion_mm=0, corrupt_fraction=0))
    )
    record = sample_simulation(truth, config)
    moving = apply_simulation(truth, record)
    log(f"{orientations}: simulated in {time.perf_counter() - t0:.0f} s")
    x_free = add("srr, motion-free", lambda: srr(free, grid, init=bspline_average(free, grid)))
    add("bspline, no correction", lambda: bspline_average(moving, grid))
    add("srr, no correction", lambda: srr(moving, grid, init=bspline_average(moving, grid)))
    result: list[MotionResult] = []

    def corrected() -> np.ndarray:
        result.append(reconstruct_with_motion(moving, grid, config=MotionConfig(mode="slice", reject_outliers=True)))
        return result[0].volume.data

    add("srr, --motion slice --reject-outliers", corrected)
    posed = [replace(s, slice_to_world=p) for s, p in zip(moving, _true_poses(record), strict=True)]
    weights = []
    for s, r in zip(moving, record.stacks, strict=True):
        w = np.ones(s.n_slices)
        w[[c["slice"] for c in r.corruptions]] = 0.0
        weights.append(w)
    oracle_ops: list[StackOperator] = []

    def oracle() -> np.ndarray:
        oracle_ops.extend(StackOperator(s, grid.shape, grid.affine) for s in posed)
        return srr(posed, grid, init=bspline_average(moving, grid), operators=oracle_ops, slice_weights=weights)

    x_oracle = add("srr, true poses (oracle)", oracle)
    covered = slice_coverage(posed, grid, operators=oracle_ops, slice_weights=weights)
    oracle_ops.clear()
    relative = covered / np.maximum(slice_coverage(free, grid), 1e-6)
    coverage = coverage_statistics(truth, mask, relative, x_oracle, x_free)
    log(f"  coverage: {coverage}")
    stats = pose_statistics(moving, record, result[0])
    log(f"  {stats}")
    return {
        "orientations": orientations,
        "rows": rows,
        "poses": stats,
        "coverage": coverage,
        "rounds": result[0].rounds,
    }


def motion_part(record: SimulationRecord, center_mm: np.ndarray, part: str) -> SimulationRecord:
    """The record with only one part of each slice's motion (noise seeds and corrupted slices kept).

    The simulator's motion is ``p -> c + R (p - c) + t`` (world mm RAS, ``c`` = ``center_mm``, the volume centre).
    part: ``"rotation"`` keeps ``R`` (t = 0); ``"in-plane"`` keeps the component of ``t`` in the slice's nominal
    plane, ``"through-plane"`` its component along the nominal normal (R = I for both).
    """
    out = SimulationRecord(config=dict(record.config), stacks=[])
    c = np.asarray(center_mm, dtype=np.float64)
    for r in record.stacks:
        m = np.asarray(r.motion)
        normal = np.asarray(r.slice_to_world)[:, :3, 2]
        rot = m[:, :3, :3]
        t = m[:, :3, 3] - (c - rot @ c)
        along = (t * normal).sum(axis=1, keepdims=True) * normal
        new = np.tile(np.eye(4), (len(m), 1, 1))
        if part == "rotation":
            new[:, :3, :3] = rot
            new[:, :3, 3] = c - rot @ c
        elif part == "in-plane":
            new[:, :3, 3] = t - along
        elif part == "through-plane":
            new[:, :3, 3] = along
        else:
            raise ValueError(f"unknown motion part {part!r}")
        out.stacks.append(replace(r, motion=new.tolist()))
    return out


def oracle_breakdown(
    truth: Volume, orientations: tuple[str, ...], *, seed: int = 0, simulation: SimulationConfig = MOTION, log
) -> dict:
    """Where the oracle's loss comes from: ``srr`` (defaults) of the same acquisition, one factor at a time.

    Rows: motion-free (the target); motion-free with the corrupted slices' indices left out (exclusion alone);
    motion-free with every stack shifted half a pixel along both in-plane axes, poses known (pixels no longer on
    voxel centres: the truth is then sampled between its voxels); the oracle as in :func:`run_case` (started from
    the B-spline average of the moving stacks at their header poses); the same started from the motion-free
    B-spline average; true poses without corrupted slices; and only the in-plane translations, only the
    through-plane translations or only the rotations of the motion. ``coverage_p5``: 5th percentile over the brain
    of the coverage relative to the motion-free stacks (:func:`slicefield.motion.coverage.slice_coverage`).
    """
    mask = foreground_mask(truth.data)
    grid = Volume(np.zeros(truth.shape, np.float32), truth.affine)
    center = truth.world_corners().mean(axis=0)
    config = replace(simulation, orientations=orientations, seed=seed)
    still = sample_simulation(truth, replace(config, motion_deg=0, motion_mm=0, corrupt_fraction=0))
    free = apply_simulation(truth, still)
    record = sample_simulation(truth, config)
    clean = sample_simulation(truth, replace(config, corrupt_fraction=0))
    init_free = bspline_average(free, grid)
    covered_free = np.maximum(slice_coverage(free, grid), 1e-6)
    weights = []
    for r in record.stacks:
        w = np.ones(r.shape[0])
        w[[c["slice"] for c in r.corruptions]] = 0.0
        weights.append(w)
    half = SimulationRecord(config=dict(still.config), stacks=[])
    for r in still.stacks:
        m, frame = np.asarray(r.motion), np.asarray(r.slice_to_world)[0, :3, :3]
        m[:, :3, 3] += 0.5 * (frame[:, 0] + frame[:, 1]) * float(np.min(truth.spacing))
        half.stacks.append(replace(r, motion=m.tolist()))
    rows: list[dict] = []
    reference: list[np.ndarray] = []  # the motion-free reconstruction, for the coverage bins

    def add(name: str, rec: SimulationRecord, *, init: str = "motion-free", slice_weights=None) -> None:
        with Timer() as timer:
            stacks = apply_simulation(truth, rec)
            posed = [replace(s, slice_to_world=p) for s, p in zip(stacks, _true_poses(rec), strict=True)]
            ops = [StackOperator(s, grid.shape, grid.affine) for s in posed]
            start = init_free if init == "motion-free" else bspline_average(stacks, grid)
            x = srr(posed, grid, init=start, operators=ops, slice_weights=slice_weights)
            relative = slice_coverage(posed, grid, operators=ops, slice_weights=slice_weights) / covered_free
            del ops
        m = evaluate(truth.data, x, mask=mask)
        row = {
            "row": name,
            "init": init,
            "psnr_masked": m["psnr_masked"],
            "ssim_masked": m["ssim_masked"],
            "coverage_p5": float(np.percentile(relative[mask], 5)),
            "seconds": timer.seconds,
        }
        if not reference:
            reference.append(x)
        row["coverage"] = coverage_statistics(truth, mask, relative, x, reference[0])
        log(f"  {row}")
        rows.append(row)

    add("motion-free", still)
    add("motion-free, corrupted slices' indices left out", still, slice_weights=weights)
    add("motion-free, stacks shifted half a pixel in-plane (known)", half)
    add("true poses, corrupted left out (oracle row)", record, init="header-pose stacks", slice_weights=weights)
    add("true poses, corrupted left out", record, slice_weights=weights)
    add("true poses, no corrupted slices", clean)
    for part in ("in-plane", "through-plane", "rotation"):
        add(f"true poses, no corrupted slices, {part} motion only", motion_part(clean, center, part))
    return {"orientations": orientations, "breakdown": rows}


def breakdown_table(case: dict) -> str:
    lines = [
        "| row | srr started from | PSNR brain dB | SSIM brain | coverage p5 | wall s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in case["breakdown"]:
        lines.append(
            f"| {r['row']} | B-spline of {r['init']} | {r['psnr_masked']:.2f} | {r['ssim_masked']:.4f} | "
            f"{r['coverage_p5']:.2f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def table(case: dict) -> str:
    lines = [
        "| method | PSNR brain dB | SSIM brain | PSNR brain aligned dB | SSIM brain aligned | wall s | peak RAM MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in case["rows"]:
        lines.append(
            f"| {r['method']} | {r['psnr_masked']:.2f} | {r['ssim_masked']:.4f} | {r['psnr_masked_aligned']:.2f} | "
            f"{r['ssim_masked_aligned']:.4f} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def coverage_table(case: dict) -> str:
    lines = [
        "| oracle coverage / motion-free | share of brain | RMSE oracle | RMSE motion-free |",
        "|---|---:|---:|---:|",
    ]
    for b in case["coverage"]:
        lo, hi = b["relative_coverage"]
        share, oracle, free = 100 * b["brain_share"], b["rmse_oracle"], b["rmse_motion_free"]
        lines.append(f"| {lo:g} to {hi:g} | {share:.1f} % | {oracle:.2f} | {free:.2f} |")
    return "\n".join(lines)


def _motion_range(text: str) -> tuple[float, float]:
    """``"DEG,MM"`` -> (deg, mm), both >= 0; anything else is a one-line usage error."""
    try:
        deg, mm = (float(v) for v in text.split(","))
    except ValueError:
        deg = mm = -1.0
    if deg < 0 or mm < 0:
        raise argparse.ArgumentTypeError(f"expected DEG,MM with both >= 0 (e.g. 10,10), got {text!r}")
    return deg, mm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("volume", help="reference volume (e.g. ch2bet.nii.gz), or mni for nilearn's MNI152 template")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated motion, corruption and noise")
    p.add_argument("--json", help="write the tables, pose statistics and machine here")
    p.add_argument("--cases", default="3,2", help="3: axial+coronal+sagittal, 2: axial+sagittal (comma-separated)")
    p.add_argument("--breakdown", action="store_true", help="only the oracle's loss, one factor at a time")
    p.add_argument(
        "--motion", default="5,5", type=_motion_range, help="per-slice motion DEG,MM: uniform in +-DEG and +-MM"
    )
    args = p.parse_args(argv)
    deg, mm = args.motion
    base = replace(MOTION, motion_deg=deg, motion_mm=mm)
    if args.volume == "mni":
        from slicefield.data import mni152_t1_path

        args.volume = str(mni152_t1_path())
    truth = load_volume(args.volume)
    cases = {"3": ("axial", "coronal", "sagittal"), "2": ("axial", "sagittal")}
    simulation = to_jsonable(replace(base, seed=args.seed))
    out = {"command": sys.argv, "simulation": simulation, "cases": [], "environment": environment()}
    for key in args.cases.split(","):
        if args.breakdown:
            case = oracle_breakdown(
                truth, cases[key], seed=args.seed, simulation=base, log=lambda m: print(m, flush=True)
            )
            out["cases"].append(case)
            print(breakdown_table(case))
            if args.json:
                Path(args.json).write_text(json.dumps(to_jsonable(out), indent=1))
            continue
        case = run_case(truth, cases[key], seed=args.seed, simulation=base, log=lambda m: print(m, flush=True))
        out["cases"].append(case)
        print(table(case))
        print(coverage_table(case))
        print(json.dumps(case["poses"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(to_jsonable(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
