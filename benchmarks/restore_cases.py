"""The CPU default `inr` (srr warm start + self-supervised restoration) against `srr` on several held-out cases.

Usage: python benchmarks/restore_cases.py [--cases colin1,mni1,colin,mni,anatomical,mni2,colin2] [--json OUT.json]

Cases are those of ``benchmarks/validate_ranking.py`` (truth downsampled, stacks simulated with its seed) plus
``mni1`` (MNI152 1 mm, orthogonal 4 mm, 1 %) and ``colin2`` (Colin27 2 mm, orthogonal 8 mm, 1 %). Brain PSNR /
SSIM inside the truth's Otsu mask, data range = truth max - min. One process, one case after another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import validate_ranking as vr  # noqa: E402

from slicefield.fit.engine import FitConfig, fit_field  # noqa: E402
from slicefield.metrics import evaluate  # noqa: E402
from slicefield.reconstruct import ReconstructConfig, reconstruct  # noqa: E402


def all_cases() -> dict[str, vr.Case]:
    cases = vr.cases()
    mni, colin = cases["mni"].path, cases["colin"].path
    cases["mni1"] = vr.Case("MNI152 1 mm, orthogonal, 4 mm, noise 1%", mni, 1, vr.ORTHOGONAL, 4.0, 0.01, 5)
    cases["colin2"] = vr.Case("Colin27 2 mm, orthogonal, 8 mm, noise 1%", colin, 2, vr.ORTHOGONAL, 8.0, 0.01, 7)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="colin1,mni1,colin,mni,anatomical,mni2,colin2")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cases = all_cases()
    rows = []
    print("| case | srr dB | inr dB | inr − srr | srr SSIM | inr SSIM | restoration | srr s | inr s |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for key in args.cases.split(","):
        case = cases[key]
        truth, stacks, grid, mask = vr._setup(case)
        t = time.perf_counter()
        x = reconstruct(stacks, grid, config=ReconstructConfig(method="srr"))
        t_srr = time.perf_counter() - t
        t = time.perf_counter()
        fitted = fit_field(stacks, grid, config=FitConfig())
        t_inr = time.perf_counter() - t
        a = evaluate(truth.data, x.data, mask=mask)
        b = evaluate(truth.data, fitted.volume.data, mask=mask)
        info = fitted.restore or {}
        used = "applied" if info.get("used") else "declined"
        what = f"{used} (validation {info.get('validation_gain_db', float('nan')):+.2f} dB)"
        row = {"case": key, "name": case.name, "srr": a, "inr": b, "restore": info, "srr_s": t_srr, "inr_s": t_inr}
        rows.append(row)
        d = b["psnr_masked"] - a["psnr_masked"]
        cells = [f"{a['psnr_masked']:.2f}", f"{b['psnr_masked']:.2f}", f"{d:+.2f}", f"{a['ssim_masked']:.4f}"]
        cells += [f"{b['ssim_masked']:.4f}", what, f"{t_srr:.0f}", f"{t_inr:.0f}"]
        print(f"| {case.name} | {' | '.join(cells)} |", flush=True)
    if args.json:
        env = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
               "cpus": os.cpu_count(), "load_avg": os.getloadavg()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"command": sys.argv, "rows": rows, "environment": env}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
