"""Size vs PSNR of field compression (.sfz) against gzip'ed NIfTI and two simple lossy baselines; prints a table.

Usage: python benchmarks/representations_compress.py VOLUME.nii.gz [--targets 30,35,40,45] [--voxel-targets 40]
       [--json OUT.json]

Rows:
- ``nifti float32 .gz``: the volume saved as float32 NIfTI by nibabel (gzip level 6 by nibabel's default): lossless;
- ``quantised b-bit + gzip``: every voxel quantised to b bits (offset/scale), gzip'ed (lossy baseline 1);
- ``downsampled x2 + 8-bit + gzip``: 2x2x2 block means, 8 bits, gzip'ed; decoded by trilinear upsampling
  (lossy baseline 2);
- ``sfz pyramid @ T dB``: ``slicefield compress --target-psnr T`` (the default pyramid field,
  :func:`slicefield.compress.compress_volume`);
- ``sfz voxel @ T dB``: ``slicefield compress --target-psnr T --fields voxel`` (the least-squares voxel field).

PSNR: data range = volume max - min; "all" over every voxel (what --target-psnr means), "brain" inside
``foreground_mask`` (Otsu). Encode/decode seconds are wall times on the machine it runs on.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from slicefield.compress import CompressConfig, compress_volume, decode_sfz, dequantise, quantise
from slicefield.io import load_volume
from slicefield.metrics import foreground_mask, psnr


def _gzip_nifti_bytes(data: np.ndarray, affine: np.ndarray) -> int:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), p)
        return p.stat().st_size


def _row(name: str, nbytes: int, ref: np.ndarray, dec: np.ndarray | None, mask, rng, enc_s, dec_s, raw_gz) -> dict:
    return {
        "method": name,
        "bytes": nbytes,
        "ratio_vs_gzip_f32": raw_gz / nbytes,
        "psnr_all": float("inf") if dec is None else psnr(ref, dec, data_range=rng),
        "psnr_brain": float("inf") if dec is None else psnr(ref, dec, data_range=rng, mask=mask),
        "encode_s": enc_s,
        "decode_s": dec_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume")
    ap.add_argument("--targets", default="30,35,40,45")
    ap.add_argument("--voxel-targets", default="40", help="targets of the voxel field rows ('' for none)")
    ap.add_argument("--bits", default="3,4,5,6")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    vol = load_volume(args.volume)
    v = vol.data
    rng = float(v.max() - v.min())
    mask = foreground_mask(v)
    rows = []
    t = time.perf_counter()
    raw_gz = _gzip_nifti_bytes(v, vol.affine)
    rows.append(_row("nifti float32 .gz (lossless)", raw_gz, v, None, mask, rng, time.perf_counter() - t, None, raw_gz))
    for b in (int(x) for x in args.bits.split(",")):
        t = time.perf_counter()
        q, lo, hi = quantise(v, b)
        blob = gzip.compress(q.astype(np.uint8 if b <= 8 else np.uint16).tobytes(), 6)
        enc = time.perf_counter() - t
        t = time.perf_counter()
        back = np.frombuffer(gzip.decompress(blob), np.uint8 if b <= 8 else np.uint16).reshape(v.shape)
        dec = dequantise(back.astype(np.int64), b, lo, hi)
        rows.append(
            _row(f"quantised {b}-bit + gzip", len(blob), v, dec, mask, rng, enc, time.perf_counter() - t, raw_gz)
        )
    t = time.perf_counter()
    small = F.avg_pool3d(torch.from_numpy(v)[None, None], 2, ceil_mode=True)[0, 0].numpy()
    q, lo, hi = quantise(small, 8)
    blob = gzip.compress(q.astype(np.uint8).tobytes(), 6)
    enc = time.perf_counter() - t
    t = time.perf_counter()
    g = torch.from_numpy(dequantise(np.frombuffer(gzip.decompress(blob), np.uint8).reshape(small.shape), 8, lo, hi))
    # block means sit at block centres: upsample with align_corners=False (centre-aligned)
    dec = F.interpolate(g[None, None], scale_factor=2, mode="trilinear", align_corners=False)[0, 0].numpy()
    dec = dec[: v.shape[0], : v.shape[1], : v.shape[2]]
    rows.append(
        _row("downsampled x2 + 8-bit + gzip", len(blob), v, dec, mask, rng, enc, time.perf_counter() - t, raw_gz)
    )
    runs = [("pyramid", float(x)) for x in args.targets.split(",") if x]
    runs += [("voxel", float(x)) for x in args.voxel_targets.split(",") if x]
    for field, target in runs:
        res = compress_volume(vol, config=CompressConfig(target_psnr_db=target, fields=(field,)))
        t = time.perf_counter()
        back = decode_sfz(res.data)
        dec_s = time.perf_counter() - t
        name = f"sfz {field} @ {target:g} dB ({res.describe()}{'' if res.met_target else ', MISSED'})"
        rows.append(_row(name, len(res.data), v, back.data, mask, rng, res.seconds, dec_s, raw_gz))
    out = io.StringIO()
    out.write("| method | size kB | vs gzip float32 | PSNR all dB | PSNR brain dB | encode s | decode s |\n")
    out.write("|---|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        dec = "-" if r["decode_s"] is None else f"{r['decode_s']:.1f}"
        out.write(
            f"| {r['method']} | {r['bytes'] / 1e3:.1f} | {r['ratio_vs_gzip_f32']:.1f}x | {r['psnr_all']:.2f} | "
            f"{r['psnr_brain']:.2f} | {r['encode_s']:.1f} | {dec} |\n"
        )
    print(out.getvalue())
    if args.json:
        env = {"python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
               "cpus": os.cpu_count(), "load_avg": os.getloadavg()}  # fmt: skip
        doc = {"command": sys.argv, "rows": rows, "environment": env}
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
