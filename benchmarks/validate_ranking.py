"""Does the leave-one-stack-out ranking tell the truth? Simulated cases where the truth is known.

For each case: a real brain (downsampled), stacks simulated through the forward model, then per method
(1) ``leave_one_out`` on the stacks alone -> held-out PSNR brain (mean ± sd over folds) and its rank, and
(2) one reconstruction from all stacks on the truth's grid -> true PSNR brain (evaluate against the truth, mask =
``foreground_mask(truth)``, data range = truth max - min) and its rank. Both use the same grid and the same
``reconstruct()`` call. Prints one Markdown table, then the wall time of ``leave_one_out`` against one
reconstruction per method (the residual reconstruction included).

    .venv/bin/python benchmarks/validate_ranking.py [--methods bspline,srr] [--cases colin,mni,anatomical]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.data import mni152_t1_path
from slicefield.io import load_volume
from slicefield.metrics import evaluate, foreground_mask
from slicefield.reconstruct import ReconstructConfig, reconstruct
from slicefield.validate import ValidateConfig, leave_one_out
from slicefield.volume import Volume

COLIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ch2bet.nii.gz"
OBLIQUE = ("axial@10,5,0", "coronal@-8,0,12", "sagittal@0,10,-6")
ORTHOGONAL = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    factor: int
    """Integer downsampling factor (Gaussian anti-aliasing, then every factor-th voxel)."""
    orientations: tuple[str, ...]
    thickness: float
    noise: float
    seed: int


def _downsample(volume: Volume, factor: int) -> Volume:
    if factor == 1:
        return volume
    data = ndimage.gaussian_filter(volume.data, 0.5 * factor)[::factor, ::factor, ::factor]
    affine = volume.affine.copy()
    affine[:3, :3] *= factor
    return Volume(data.astype(np.float32), affine)


def cases() -> dict[str, Case]:
    anatomical = str(Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii")
    colin = str(COLIN.resolve())
    return {
        "colin": Case("Colin27 3 mm, orthogonal, 6 mm, noise 0.5%", colin, 3, ORTHOGONAL, 6.0, 0.005, 1),
        "mni": Case("MNI152 3 mm, oblique, 6 mm, noise 2%", str(mni152_t1_path()), 3, OBLIQUE, 6.0, 0.02, 2),
        "anatomical": Case("nibabel T1 2 mm, oblique, 5 mm, noise 1%", anatomical, 1, OBLIQUE, 5.0, 0.01, 3),
    }


def _ranks(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=values.get, reverse=True)
    return {m: order.index(m) + 1 for m in values}


def run_case(case: Case, methods: list[str]) -> tuple[list[dict], dict]:
    truth = _downsample(load_volume(case.path), case.factor)
    truth = truth.with_data(np.clip(truth.data, 0, None))
    config = SimulationConfig(
        orientations=case.orientations, thickness=case.thickness, noise=case.noise, seed=case.seed
    )
    stacks, _ = simulate(truth, config)
    grid = Volume(np.zeros(truth.shape, np.float32), truth.affine)
    mask = foreground_mask(truth.data)
    true_psnr, single_s = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        out = reconstruct(stacks, grid, config=ReconstructConfig(method=m))
        single_s[m] = time.perf_counter() - t0
        true_psnr[m] = evaluate(truth.data, out.data, mask=mask)["psnr_masked"]
    t0 = time.perf_counter()
    result = leave_one_out(stacks, methods=methods, grid=grid, config=ValidateConfig())
    validate_s = time.perf_counter() - t0
    loso = {r["method"]: r for r in result.summary}
    loso_rank = _ranks({m: loso[m]["psnr_masked"] for m in methods})
    true_rank = _ranks(true_psnr)
    rows = [
        {
            "case": case.name,
            "shape": truth.shape,
            "method": m,
            "loso": f"{loso[m]['psnr_masked']:.2f} ± {loso[m]['psnr_masked_sd']:.2f}",
            "true": f"{true_psnr[m]:.2f}",
            "loso_rank": loso_rank[m],
            "true_rank": true_rank[m],
            "agree": "yes" if loso_rank[m] == true_rank[m] else "NO",
        }
        for m in methods
    ]
    timing = {"case": case.name, "validate_s": validate_s, "single_s": single_s, "per_method_s": result.seconds}
    return rows, timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="bspline,srr")
    p.add_argument("--cases", default="anatomical,mni,colin")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    all_cases = cases()
    rows, timings = [], []
    for key in args.cases.split(","):
        r, t = run_case(all_cases[key], methods)
        rows += r
        timings.append(t)
        print(f"done {key}: {t}", flush=True)
    head = (
        "| case | grid | method | LOSO PSNR brain dB (mean ± sd) | true PSNR brain dB | LOSO rank | true rank | agree |"
    )
    print("\n" + head)
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        shape = "×".join(map(str, r["shape"]))
        print(
            f"| {r['case']} | {shape} | {r['method']} | {r['loso']} | {r['true']} | {r['loso_rank']} "
            f"| {r['true_rank']} | {r['agree']} |"
        )
    print("\n| case | method | one reconstruction s | validate s (3 folds + residual recon) | ratio |")
    print("|---|---|---:|---:|---:|")
    for t in timings:
        for m, s in t["single_s"].items():
            v = t["per_method_s"][m]
            print(f"| {t['case']} | {m} | {s:.1f} | {v:.1f} | {v / s:.2f} |")
        total_single = sum(t["single_s"].values())
        print(
            f"| {t['case']} | all | {total_single:.1f} | {t['validate_s']:.1f} | {t['validate_s'] / total_single:.2f} |"
        )


if __name__ == "__main__":
    main()
