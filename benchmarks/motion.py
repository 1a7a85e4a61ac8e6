"""Motion benchmark (issue 4): per-slice motion and corrupted slices on a known volume, with and without correction.

Usage: ``python benchmarks/motion.py ../shared/data/ch2bet.nii.gz --json benchmarks/results/colin_motion.json``
(held-out check: ``python benchmarks/motion.py mni --seed 1 --cases 3``).

Acquisition (``slicefield simulate``'s model): three orthogonal 4 mm stacks (Gaussian PSF, 1 mm in-plane), Gaussian
noise 1 % of the maximum, per-slice rigid motion uniform in +-5 deg about each world axis (about the volume centre)
and +-5 mm along each, 5 % of the slices corrupted (signal dropout band, stripes or ghost); seed 0. Then the same
with two stacks (axial + sagittal). Rows, each reconstructed on the reference grid:

- ``srr, motion-free``: the same acquisition without motion or corrupted slices (the target);
- ``bspline`` / ``srr, no correction``: the moving acquisition, header poses;
- ``srr, --motion slice --reject-outliers``: :func:`slicefield.motion.svr.reconstruct_with_motion`, defaults;
- ``srr, true poses (oracle)``: the moving acquisition with the simulator's poses and the corrupted slices left
  out: what perfect motion estimation and outlier rejection could give.

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

from slicefield.acquisition.simulate import SimulationConfig, SimulationRecord, apply_simulation, sample_simulation
from slicefield.baselines.bspline import bspline_average
from slicefield.baselines.srr import srr
from slicefield.io import load_volume
from slicefield.itk import resample
from slicefield.metrics import evaluate, foreground_mask
from slicefield.motion.register import RegistrationConfig, rigid_register
from slicefield.motion.svr import MotionConfig, MotionResult, reconstruct_with_motion
from slicefield.motion.transforms import pose_errors, rigid_about, slice_center
from slicefield.runs import Timer, environment, to_jsonable
from slicefield.volume import Stack, Volume

MOTION = SimulationConfig(noise=0.01, motion_deg=5.0, motion_mm=5.0, corrupt_fraction=0.05, seed=0)
#: Slices with fewer foreground pixels are left out of the pose-error statistics (nothing to register).
MIN_PIXELS = 100


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


def run_case(truth: Volume, orientations: tuple[str, ...], *, seed: int = 0, log) -> dict:
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

    config = replace(MOTION, orientations=orientations, seed=seed)
    t0 = time.perf_counter()
    free = apply_simulation(
        truth, sample_simulation(truth, replace(config, motion_deg=0, motion_mm=0, corrupt_fraction=0))
    )
    record = sample_simulation(truth, config)
    moving = apply_simulation(truth, record)
    log(f"{orientations}: simulated in {time.perf_counter() - t0:.0f} s")
    add("srr, motion-free", lambda: srr(free, grid, init=bspline_average(free, grid)))
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
    add("srr, true poses (oracle)", lambda: srr(posed, grid, init=bspline_average(moving, grid), slice_weights=weights))
    stats = pose_statistics(moving, record, result[0])
    log(f"  {stats}")
    return {"orientations": orientations, "rows": rows, "poses": stats, "rounds": result[0].rounds}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("volume", help="reference volume (e.g. ch2bet.nii.gz), or mni for nilearn's MNI152 template")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated motion, corruption and noise")
    p.add_argument("--json", help="write the tables, pose statistics and machine here")
    p.add_argument("--cases", default="3,2", help="3: axial+coronal+sagittal, 2: axial+sagittal (comma-separated)")
    args = p.parse_args(argv)
    if args.volume == "mni":
        from slicefield.data import mni152_t1_path

        args.volume = str(mni152_t1_path())
    truth = load_volume(args.volume)
    cases = {"3": ("axial", "coronal", "sagittal"), "2": ("axial", "sagittal")}
    simulation = to_jsonable(replace(MOTION, seed=args.seed))
    out = {"command": sys.argv, "simulation": simulation, "cases": [], "environment": environment()}
    for key in args.cases.split(","):
        case = run_case(truth, cases[key], seed=args.seed, log=lambda m: print(m, flush=True))
        out["cases"].append(case)
        print(table(case))
        print(json.dumps(case["poses"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(to_jsonable(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
