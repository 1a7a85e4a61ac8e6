"""Benchmark of label-map -> T1 synthesis (issue 6): per-plane SPADE volumes vs their 3D fusion, on held-out
deformations of the MNI152 template.

    .venv/bin/python benchmarks/synth.py [--preset tiny] [--steps N] [--fusion-steps N] [--train 6] [--test 2]
        [--voxel-mm 2] [--device cpu] [--threads 1] [--pair LABELS.nii.gz T1.nii.gz]

Data (no network): nilearn's MNI152 2009a T1 and labels from its GM/WM maps (slicefield.synth.labels.mni152_pair),
resampled to a 2 mm grid (``--voxel-mm``; T1 linear, labels nearest); ``--pair`` reads that (labels, T1) pair from
files instead, for machines without nilearn or SimpleITK (write it with ``--save-pair DIR``). Training pairs:
``--train`` random affine + elastic deformations with intensity variation (seed 0); held-out pairs: ``--test`` more
drawn with seed 1000, never seen in training. Metrics in the held-out label map's brain (label > 0), each volume
normalised to [0, 1] by its 99.5th percentile there: SSIM, PSNR, MSE, per-axis gradient energy ratio to the real
volume and the relative gradient error per axis; "through-plane" = worst axis' gradient error (lower is better).
Rows: each plane's volume, their plain mean (the untrained fusion's identity-like path), the fused volume, and
"oracle: true anatomy" (the template moved by the held-out pair's true deformation without its random gamma / gain /
bias change: the ceiling for any generator, since a label map cannot predict that change); mean ± std over held-out
pairs.

Prints one table; writes benchmarks/results/synth.json (rows, config, timings, machine; ``--out``) and
synth_profiles.png beside it.
Runs on one CPU thread by default (``--threads``); ``--device cuda`` trains and generates on the GPU (TF32 convs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from slicefield.itk import resample
from slicefield.runs import environment, to_jsonable
from slicefield.synth import augment
from slicefield.synth import model as synth_model
from slicefield.synth.evaluate import AXES, evaluate_volumes, format_rows, profiles_figure
from slicefield.synth.labels import mni152_pair
from slicefield.volume import Volume

#: Voxel size (mm) of the benchmark grid.
VOXEL_MM = 2.0
#: Seeds of the training and held-out deformations (disjoint random streams).
TRAIN_SEED = 0
TEST_SEED = 1000
RESULTS = Path(__file__).resolve().parent / "results"
#: Reference row: the true anatomy without the held-out intensity change (what a perfect generator could reach).
ORACLE = "oracle: true anatomy"


def mni_pair_at(voxel_mm: float) -> tuple[Volume, Volume]:
    labels, t1 = mni152_pair()
    affine = t1.affine.copy()
    affine[:3, :3] *= voxel_mm / np.linalg.norm(t1.affine[:3, 0])
    shape = tuple(int(np.ceil(n / voxel_mm)) for n in t1.shape)
    img = resample(t1.data, t1.affine, shape=shape, target_affine=affine, interpolation="linear")
    lab = resample(labels.data, labels.affine, shape=shape, target_affine=affine, interpolation="nearest")
    return Volume(lab, affine), Volume(np.clip(img, 0, None), affine)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=tuple(synth_model.PRESETS))
    ap.add_argument("--steps", type=int, help="generator steps per plane (default: the preset's)")
    ap.add_argument("--fusion-steps", type=int, help="fusion CNN steps (default: the preset's)")
    ap.add_argument("--train", type=int, default=6, help="training deformations")
    ap.add_argument("--test", type=int, default=2, help="held-out deformations")
    ap.add_argument("--fusion-holdout", type=int, default=0, help="training pairs kept for the fusion CNN only")
    ap.add_argument("--batch", type=int, help="generator batch size (default: the preset's)")
    ap.add_argument("--voxel-mm", type=float, default=VOXEL_MM, help="grid voxel size (mm)")
    ap.add_argument("--pair", nargs=2, metavar=("LABELS", "T1"), help="precomputed (labels, T1) pair on the grid")
    ap.add_argument("--save-pair", metavar="DIR", help="write the (labels, T1) pair on the grid to DIR and stop")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(RESULTS / "synth.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if args.pair:
        from slicefield.io import load_volume

        labels, t1 = (load_volume(f) for f in args.pair)
    else:
        labels, t1 = mni_pair_at(args.voxel_mm)
    if args.save_pair:
        from slicefield.io import save_volume

        Path(args.save_pair).mkdir(parents=True, exist_ok=True)
        save_volume(labels, Path(args.save_pair) / f"mni_labels_{args.voxel_mm:g}mm.nii.gz")
        save_volume(t1, Path(args.save_pair) / f"mni_t1_{args.voxel_mm:g}mm.nii.gz")
        return 0
    train_pairs = augment.population(labels, t1, n=args.train, seed=TRAIN_SEED)
    test_pairs = augment.population(labels, t1, n=args.test, seed=TEST_SEED)
    timings["data_s"] = time.perf_counter() - t0

    config = synth_model.preset(args.preset)
    if args.steps:
        config = replace(config, gan=replace(config.gan, steps=args.steps))
    config = replace(config, fusion_holdout=args.fusion_holdout, device=args.device)
    if args.batch:
        config = replace(config, gan=replace(config.gan, batch_size=args.batch))
    if args.fusion_steps:
        config = replace(config, fusion=replace(config.fusion, steps=args.fusion_steps))

    stage_s: dict[str, float] = {}

    def progress(name: str):
        t = time.perf_counter()
        shown = [-1]

        def cb(done: int, total: int) -> None:
            stage_s[name] = time.perf_counter() - t
            q = 4 * done // total
            if q != shown[0]:
                shown[0] = q
                print(f"  {name}: {done}/{total} {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)

        return cb

    t0 = time.perf_counter()
    model = synth_model.train([(lab, img) for lab, img, _ in train_pairs], config, progress=progress)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_volume: list[list[dict]] = []
    first = None
    for lab, img, d in test_pairs:
        out = synth_model.generate(model, lab, device=args.device)
        mean = np.mean([v.data for v in out.planes.values()], axis=0)
        # the ceiling: the real anatomy (the template moved by the true deformation) without the held-out pair's
        # random intensity change (gamma, gain, bias), which no label map can predict
        oracle = augment.deform_image(t1, replace(d, gamma=1.0, gain=1.0, bias=np.zeros_like(d.bias)))
        volumes = {**out.planes, "mean of planes": lab.with_data(mean), "fused": out.fused, ORACLE: oracle}
        per_volume.append(evaluate_volumes(volumes, img, mask=lab.data > 0))
        if first is None:
            first = (volumes, img, lab)
    timings["generate_and_evaluate_s"] = time.perf_counter() - t0

    rows = []
    keys = [k for k in per_volume[0][0] if k != "volume"]
    for i, row in enumerate(per_volume[0]):
        agg = {"volume": row["volume"]}
        for k in keys:
            vals = np.array([pv[i][k] for pv in per_volume])
            agg[k] = float(vals.mean())
            agg[f"{k}_std"] = float(vals.std())
        rows.append(agg)
    timings["total_s"] = time.perf_counter() - t_start

    print(f"synthesis benchmark: preset {args.preset}, {args.train} training / {args.test} held-out deformations")
    print(f"of MNI152 at {args.voxel_mm:g} mm; mean over held-out pairs (std of SSIM / PSNR in brackets)")
    table = format_rows(rows).splitlines()
    print(table[0])
    for line, r in zip(table[1:], rows, strict=True):
        print(f"{line}   (±{r['ssim_std']:.4f} / ±{r['psnr_std']:.2f})")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))

    volumes, img, lab = first
    profiles_figure(
        {k: v for k, v in volumes.items() if k not in ("mean of planes", ORACLE)},
        img,
        Path(args.out).with_name(Path(args.out).stem + "_profiles.png"),
        mask=lab.data > 0,
        title="held-out pair 1: real vs per-plane vs fused (normalised)",
    )
    doc = {
        "command": ["python", "benchmarks/synth.py", *(argv if argv is not None else sys.argv[1:])],
        "voxel_mm": args.voxel_mm,
        "train": args.train,
        "test": args.test,
        "config": config.to_json(),
        "rows": rows,
        "per_volume": per_volume,
        "axes": AXES,
        "final_losses": {k: v[-1] for k, v in model.history.items() if v},
        "timings": timings,
        "stage_s": stage_s,
        "environment": environment(),
    }
    Path(args.out).write_text(json.dumps(to_jsonable(doc), indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
