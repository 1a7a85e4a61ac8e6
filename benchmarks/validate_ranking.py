"""Does the leave-one-stack-out ranking tell the truth? Simulated cases where the truth is known.

For each case: a real brain (downsampled), stacks simulated through the forward model, then per method
(1) ``leave_one_out`` on the stacks alone -> held-out PSNR brain (mean ± sd over folds) and its rank, and
(2) one reconstruction from all stacks on the truth's grid -> true PSNR brain (evaluate against the truth, mask =
``foreground_mask(truth)``, data range = truth max - min) and its rank. Both use the same grid and the same
``reconstruct()`` call. Prints one Markdown table, then the wall time of ``leave_one_out`` against one
reconstruction per method (the residual reconstruction included).

    .venv/bin/python benchmarks/validate_ranking.py [--methods bspline,srr,inr] [--cases anatomical,mni,colin,colin1]

``colin1`` is the 1 mm case of the issue's timing standard (Colin27 at 1 mm, three orthogonal 4 mm stacks, 1 %
noise: the neural-field benchmark's case); the others are downsampled so that every method runs in seconds.
"""

from __future__ import annotations

import argparse
import json
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
from slicefield.validate import ValidateConfig, _summarise, leave_one_out
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
        "colin1": Case("Colin27 1 mm, orthogonal, 4 mm, noise 1%", colin, 1, ORTHOGONAL, 4.0, 0.01, 0),
        "mni2": Case("MNI152 2 mm, oblique, 6 mm, noise 3%", str(mni152_t1_path()), 2, OBLIQUE, 6.0, 0.03, 4),
        # one stack: slice groups held out (the scheme for single real scans such as dipy's aniso_vox)
        "mni_one": Case(
            "MNI152 3 mm, one axial stack, 6 mm, noise 1%", str(mni152_t1_path()), 3, ("axial",), 6.0, 0.01, 5
        ),
        "colin_one": Case("Colin27 2 mm, one coronal stack, 5 mm, noise 1%", colin, 2, ("coronal",), 5.0, 0.01, 6),
    }


def _ranks(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=values.get, reverse=True)
    return {m: order.index(m) + 1 for m in values}


def _warm_up(methods: list[str]) -> None:
    """One tiny reconstruction per method, so that one-time imports (torch's optimiser pulls in torch._dynamo,
    seconds) are not charged to the first timed reconstruction."""
    truth = Volume(np.zeros((12, 12, 12), np.float32), np.eye(4))
    truth.data[3:9, 3:9, 3:9] = 1.0
    stacks, _ = simulate(truth, SimulationConfig(orientations=ORTHOGONAL, thickness=2.0, noise=0.0))
    for m in methods:
        reconstruct(stacks, truth, config=ReconstructConfig(method=m))


def _setup(case: Case) -> tuple[Volume, list, Volume, np.ndarray]:
    """The case's truth (downsampled, clipped at 0), its simulated stacks, the truth's empty grid, its brain mask."""
    truth = _downsample(load_volume(case.path), case.factor)
    truth = truth.with_data(np.clip(truth.data, 0, None))
    config = SimulationConfig(
        orientations=case.orientations, thickness=case.thickness, noise=case.noise, seed=case.seed
    )
    stacks, _ = simulate(truth, config)
    return truth, stacks, Volume(np.zeros(truth.shape, np.float32), truth.affine), foreground_mask(truth.data)


def run_case(case: Case, methods: list[str]) -> dict:
    truth, stacks, grid, mask = _setup(case)
    true_psnr, single_s = {}, {}
    for m in methods:
        t0 = time.perf_counter()
        out = reconstruct(stacks, grid, config=ReconstructConfig(method=m))
        single_s[m] = time.perf_counter() - t0
        true_psnr[m] = evaluate(truth.data, out.data, mask=mask)["psnr_masked"]
    t0 = time.perf_counter()
    result = leave_one_out(stacks, methods=methods, grid=grid, config=ValidateConfig())
    validate_s = time.perf_counter() - t0
    return {
        "case": case.name,
        "shape": list(truth.shape),
        "validate_s": validate_s,
        "single_s": single_s,
        "per_method_s": result.seconds,
        "true_psnr": true_psnr,
        "summary": result.summary,
        "scores": result.scores,
    }


def table_rows(record: dict) -> list[dict]:
    """Per method: LOSO and true PSNR, both ranks, and whether they agree; a disagreement inside a LOSO tie
    (the lead between the two methods below the tie threshold or not won in every fold) is marked as a tie."""
    methods = list(record["true_psnr"])
    summary = _summarise(methods, record["scores"], record["per_method_s"], {})  # best first, with leads and ties
    order = [r["method"] for r in summary]
    true_rank = _ranks(record["true_psnr"])
    rows = []
    for i, r in enumerate(summary):
        m = r["method"]
        if true_rank[m] == r["rank"]:
            agree = "yes"
        else:
            # the LOSO leads this method takes part in: over the next one, and the previous one's over it
            ties = [r["tie"]] + ([summary[i - 1]["tie"]] if i > 0 else [])
            leads = [x for x in (r, summary[i - 1] if i > 0 else None) if x is not None and x["lead_db"] is not None]
            if any(t for t in ties if t is not None):
                lead = min(leads, key=lambda x: abs(x["lead_db"]))["lead_db"]
                agree = f"tie (LOSO lead {lead:+.2f} dB)"
            else:
                agree = "NO"
        rows.append(
            {
                "case": record["case"],
                "shape": record.get("shape", []),
                "method": m,
                "loso": f"{r['psnr_masked']:.2f} ± {r['psnr_masked_sd']:.2f}",
                "true": f"{record['true_psnr'][m]:.2f}",
                "loso_rank": order.index(m) + 1,
                "true_rank": true_rank[m],
                "agree": agree,
            }
        )
    return rows


def print_tables(records: list[dict]) -> None:
    head = (
        "| case | grid | method | LOSO PSNR brain dB (mean ± sd) | true PSNR brain dB | LOSO rank | true rank | agree |"
    )
    print("\n" + head)
    print("|---|---|---|---:|---:|---:|---:|---|")
    for rec in records:
        for r in table_rows(rec):
            shape = "×".join(map(str, r["shape"]))
            print(
                f"| {r['case']} | {shape} | {r['method']} | {r['loso']} | {r['true']} | {r['loso_rank']} "
                f"| {r['true_rank']} | {r['agree']} |"
            )
    print("\n| case | method | one reconstruction s | validate s (3 folds + residual recon) | ratio |")
    print("|---|---|---:|---:|---:|")
    for t in records:
        for m, s in t["single_s"].items():
            v = t["per_method_s"][m]
            print(f"| {t['case']} | {m} | {s:.1f} | {v:.1f} | {v / s:.2f} |")
        total_single = sum(t["single_s"].values())
        print(
            f"| {t['case']} | all | {total_single:.1f} | {t['validate_s']:.1f} | {t['validate_s'] / total_single:.2f} |"
        )


def blind_check(case: Case, methods: list[str]) -> None:
    """Per fold and method: the noise RMS of the held-out stack, and the fold reconstruction's error RMS after the
    held-out stack's own acquisition model (against the noise-free held-out stack) and in 3D inside the brain."""
    from slicefield.acquisition.operator import StackOperator

    truth, stacks, grid, mask = _setup(case)
    print(
        "| fold | held-out noise RMS | " + " | ".join(f"{m}: error RMS after the held-out PSF / in 3D" for m in methods)
    )
    for k, held in enumerate(stacks):
        op = StackOperator(held, grid.shape, grid.affine)
        clean = op.forward(truth.data)
        cells = [f"{np.sqrt(np.mean((held.data - clean) ** 2)):.2f}"]
        for m in methods:
            r = reconstruct([s for j, s in enumerate(stacks) if j != k], grid, config=ReconstructConfig(method=m)).data
            seen = np.sqrt(np.mean((op.forward(r) - clean) ** 2))
            cells.append(f"{seen:.2f} / {np.sqrt(np.mean((r - truth.data)[mask] ** 2)):.2f}")
        print(f"| {k} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="bspline,srr,inr")
    p.add_argument("--cases", default="anatomical,mni,mni2,colin,colin1")
    p.add_argument("--json", help="also write every case's scores, summary and timings to this file")
    p.add_argument("--from-json", help="print the tables of a file written by --json (runs nothing)")
    p.add_argument("--blind", metavar="CASE", help="only: how much of each fold's error the held-out stack sees")
    args = p.parse_args()
    if args.blind:
        blind_check(cases()[args.blind], [m for m in args.methods.split(",") if m and m != "bspline"])
        return
    if args.from_json:
        print_tables(json.loads(Path(args.from_json).read_text()))
        return
    methods = [m for m in args.methods.split(",") if m]
    all_cases = cases()
    _warm_up(methods)
    records = []
    for key in args.cases.split(","):
        rec = run_case(all_cases[key], methods)
        records.append(rec)
        print(f"done {key}: validate {rec['validate_s']:.1f} s, one reconstruction each {rec['single_s']}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1, default=float))
        for row in table_rows(rec):
            print(
                f"  {row['method']}: LOSO {row['loso']} (rank {row['loso_rank']}), true {row['true']} "
                f"(rank {row['true_rank']}) {row['agree']}",
                flush=True,
            )
    print_tables(records)


if __name__ == "__main__":
    main()
