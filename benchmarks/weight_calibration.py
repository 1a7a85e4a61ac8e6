"""Calibrate and check SRR's noise-adaptive regularisation weight (``SRRConfig(weight=None)``).

For a 100x120x100 crop of a 1 mm brain, stacks are simulated at several noise levels and protocols; SRR runs with
fixed weights and with the automatic one. Prints one line per case (brain-masked PSNR against the truth).

    python benchmarks/weight_calibration.py ../shared/data/ch2bet.nii.gz   # calibration volume (Colin27)
    python benchmarks/weight_calibration.py mni                            # check on nilearn's MNI152
"""

from __future__ import annotations

import sys

import numpy as np

from slicefield.acquisition.operator import StackOperator
from slicefield.acquisition.simulate import SimulationConfig, simulate
from slicefield.baselines.bspline import bspline_average
from slicefield.baselines.srr import SRRConfig, auto_weight, srr
from slicefield.data import mni152_t1_path
from slicefield.io import load_volume
from slicefield.metrics import foreground_mask, psnr
from slicefield.volume import Volume

OBLIQUE = ("axial@10,5,0", "coronal@-8,0,12", "sagittal@0,10,-6")
ORTHO = ("axial", "coronal", "sagittal")
CASES = [
    (0.005, "gaussian", ORTHO),
    (0.01, "gaussian", ORTHO),
    (0.03, "rician", ORTHO),
    (0.005, "gaussian", OBLIQUE),
    (0.02, "gaussian", ("axial", "sagittal")),
]


def crop(volume: Volume, start: tuple[int, int, int], size: tuple[int, int, int]) -> Volume:
    affine = volume.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(start, float)
    sl = tuple(slice(a, a + n) for a, n in zip(start, size, strict=True))
    return Volume(volume.data[sl], affine)


def main(source: str) -> None:
    full = load_volume(mni152_t1_path() if source == "mni" else source)
    v = crop(full, (45, 55, 45) if source == "mni" else (40, 50, 40), (100, 120, 100))
    mask = foreground_mask(v.data)
    rng = float(v.data.max() - v.data.min())
    for noise, kind, orient in CASES:
        stacks, _ = simulate(v, SimulationConfig(noise=noise, noise_kind=kind, orientations=orient))
        init = bspline_average(stacks, v)
        ops = [StackOperator(s, v.shape, v.affine) for s in stacks]
        fixed = {
            w: psnr(
                v.data, srr(stacks, v, init=init, operators=ops, config=SRRConfig(weight=w)), data_range=rng, mask=mask
            )
            for w in (0.02, 0.05, 0.1, 0.2)
        }
        auto = psnr(v.data, srr(stacks, v, init=init, operators=ops), data_range=rng, mask=mask)
        cells = " ".join(f"{w:g}:{p:.2f}" for w, p in fixed.items())
        print(
            f"{source} noise {noise:.3f} {kind:8s} {len(orient)} stacks{' oblique' if orient == OBLIQUE else ''}: "
            f"bspline {psnr(v.data, init, data_range=rng, mask=mask):.2f} | fixed {cells} | "
            f"auto {auto_weight(stacks):.3f}:{auto:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mni")
