"""Throughput of ``slicefield batch``: 2 Dask workers against 1 on the same cohort (issue 9: target >= 1.7x).

Cohort: 20 subjects, each a 48^3 (1 mm) crop of nilearn's MNI152 T1 template at its own offset near the brain's
centre, acquired as three orthogonal 4 mm stacks (Gaussian PSF, 1 % Gaussian noise, seed = subject index), with the
crop as reference; reconstructed with ``srr`` on the reference grid and scored (the batch's full per-subject task:
hash, load, estimate, reconstruct, evaluate, write NIfTI + JSON + report, done.json).

Each measurement is one ``run_batch`` on an already started LocalCluster (1 or 2 worker processes, 1 thread each,
the worker environment of ``slicefield batch``, ``slicefield`` imported on every worker beforehand), into a fresh
output folder: the wall time is the batch's, from submitting the first subject to writing the results table. The
cluster start (the same for any cohort size) is timed separately. Runs alternate 1 and 2 workers; the medians are
compared. The 1-minute load average is printed with each run, and a machine check before each pair of runs says how
many cores were free (two pure-Python spins at once against one alone): other agents share this machine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_throughput.py [--subjects 20] [--repeats 3] [--side 48]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from slicefield.acquisition.simulate import SimulationConfig, apply_simulation, sample_simulation
from slicefield.batch import WORKER_ENV, BatchConfig, ClusterConfig, SubjectConfig, read_manifest, run_batch
from slicefield.data import mni152_t1_path
from slicefield.io import load_volume, save_stack, save_volume
from slicefield.reconstruct import ReconstructConfig
from slicefield.volume import Volume

#: Crop offsets (voxels) around the template's centre: subject k uses OFFSETS[k % len(OFFSETS)] * (1 + k // 8).
OFFSETS = ((0, 0, 0), (6, 0, 0), (-6, 0, 0), (0, 6, 0), (0, -6, 0), (0, 0, 6), (0, 0, -6), (4, 4, 4))


def build_cohort(folder: Path, *, subjects: int, side: int) -> Path:
    """Write the cohort's stacks, references and manifest.csv into ``folder``; returns the manifest."""
    mni = load_volume(mni152_t1_path())
    centre = np.array(mni.shape) // 2 - side // 2
    lines = ["subject,stacks,reference"]
    for k in range(subjects):
        lo = centre + np.array(OFFSETS[k % len(OFFSETS)]) * (1 + k // len(OFFSETS))
        sl = tuple(slice(int(a), int(a) + side) for a in lo)
        affine = mni.affine.copy()
        affine[:3, 3] = mni.affine[:3, :3] @ lo + mni.affine[:3, 3]
        ref = Volume(mni.data[sl].copy(), affine)
        sub = folder / f"sub-{k:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        stacks = apply_simulation(ref, sample_simulation(ref, SimulationConfig(thickness=4.0, noise=0.01, seed=k)))
        names = [save_stack(s, sub / f"{s.name}.nii.gz").relative_to(folder).as_posix() for s in stacks]
        save_volume(ref, sub / "reference.nii.gz")
        lines.append(f"sub-{k:02d},{';'.join(names)},sub-{k:02d}/reference.nii.gz")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


#: Pure-Python work units of the machine check (about 1-2 s on one free core).
SPIN = 15_000_000


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i & 7
    return time.perf_counter() - t0


def machine_check() -> float:
    """How many cores this process can get now: 2 * (one spin alone) / (two spins at once, longest). ~2 on an idle
    2-core machine, ~1 when another process keeps a core busy."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        alone = pool.apply(_spin, (SPIN,))
        both = max(pool.map(_spin, [SPIN, SPIN]))
    return 2 * alone / both


def _import_slicefield() -> int:
    import slicefield.batch  # noqa: F401  (torch, scipy, SimpleITK: loaded once per worker, before timing)

    return os.getpid()


def measure(manifest: Path, work: Path, *, workers: int, label: str) -> tuple[float, float]:
    """(cluster start s, batch wall s) of one run on a fresh ``workers``-process LocalCluster."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        memory_limit="4GiB",
        silence_logs=40,
        env=WORKER_ENV,  # as slicefield batch's own LocalCluster: one thread per subject
    )
    with cluster, Client(cluster) as client:
        client.run(_import_slicefield)
        started = time.perf_counter() - t0
        out = work / f"out-{label}"
        config = BatchConfig(
            subject=SubjectConfig(reconstruct=ReconstructConfig(method="srr")),
            cluster=ClusterConfig(scheduler=cluster.scheduler_address),
        )
        load = os.getloadavg()[0]
        t1 = time.perf_counter()
        result = run_batch(read_manifest(manifest), out_dir=out, config=config)
        wall = time.perf_counter() - t1
    failed = [r["subject"] for r in result.rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"subjects failed: {failed}")
    psnr = statistics.median(r["psnr_masked"] for r in result.rows)
    busy = sum(r["seconds"] for r in result.rows)
    cpu = sum(r["cpu_seconds"] for r in result.rows)
    print(
        f"{label:>10}: {workers} worker(s)  batch {wall:6.1f} s  ({len(result.rows) / wall:.2f} subjects/s)  "
        f"reconstruct+evaluate summed: wall {busy:.1f} s, CPU {cpu:.1f} s  cluster start {started:4.1f} s  "
        f"median brain PSNR {psnr:.2f} dB  load avg before {load:.2f}",
        flush=True,
    )
    shutil.rmtree(out)
    return started, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--side", type=int, default=48, help="crop side in voxels (1 mm)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", help="keep the cohort here (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="slicefield-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {platform.platform()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    manifest = build_cohort(work / "cohort", subjects=args.subjects, side=args.side)
    print(f"cohort: {args.subjects} subjects, {args.side}^3 crops of MNI152, 3 orthogonal 4 mm stacks, srr")
    walls: dict[int, list[float]] = {1: [], 2: []}
    checks = []
    for r in range(args.repeats):
        checks.append(machine_check())
        print(f"machine check before run {r + 1}: {checks[-1]:.2f} free cores (2 * spin alone / two spins at once)")
        for workers in (1, 2) if r % 2 == 0 else (2, 1):
            walls[workers].append(measure(manifest, work, workers=workers, label=f"run {r + 1}")[1])
    checks.append(machine_check())
    print(f"machine check after the last run: {checks[-1]:.2f} free cores")
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    print(f"median batch wall: 1 worker {one:.1f} s, 2 workers {two:.1f} s -> speed-up {one / two:.2f}x")
    print(f"all: 1 worker {[round(w, 1) for w in walls[1]]}, 2 workers {[round(w, 1) for w in walls[2]]}")
    if not args.work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
