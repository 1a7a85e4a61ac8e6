"""slicefield batch: manifests and BIDS, hashing and resume, memory refusal, faults on a loopback Dask cluster.

The cohort: 20 subjects of 24^3 1 mm phantoms (three orthogonal 3 mm stacks each, method srr), 3 of them corrupt.
Fault injection: a worker process SIGKILLed mid-subject, the whole batch process group SIGKILLed and resumed, a
full disk simulated by a write that raises ENOSPC, transient I/O errors. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest

from conftest import brain_phantom
from slicefield import batch
from slicefield.acquisition.simulate import SimulationConfig, apply_simulation, sample_simulation
from slicefield.batch import (
    BatchConfig,
    ClusterConfig,
    MemoryEstimate,
    Subject,
    SubjectConfig,
    check_memory,
    completed_row,
    discover_bids,
    estimate_memory,
    input_hash,
    read_manifest,
    run_batch,
    run_subject,
    sanitize_subject_id,
)
from slicefield.errors import SlicefieldError
from slicefield.io import save_stack, save_volume

SIDE = 24
N_SUBJECTS = 20
#: The deliberately corrupt subjects and a piece of the one-line reason each must get.
CORRUPT = {
    "sub-05": ("truncated", "cannot read as NIfTI"),
    "sub-11": ("nan", "voxels are NaN or Inf"),
    "sub-17": ("far", "does not overlap"),
}
#: Files whose bytes must be identical between an undisturbed run and a disturbed one.
CHECKED_FILES = ("recon.nii.gz", "metrics.json")
CONFIG = SubjectConfig()  # srr, reference grid, auto mask


# ----------------------------------------------------------------------------------------------- builders
def _make_subject(folder: Path, k: int, kind: str = "good") -> tuple[list[Path], Path]:
    """Simulated stacks and reference of subject k (intensity and noise vary with k); ``kind`` corrupts one."""
    folder.mkdir(parents=True, exist_ok=True)
    ref = brain_phantom(SIDE)
    ref = ref.with_data(ref.data * np.float32(1.0 + 0.03 * k))
    stacks = apply_simulation(ref, sample_simulation(ref, SimulationConfig(thickness=3.0, noise=0.01, seed=k)))
    paths = [save_stack(s, folder / f"{s.name}.nii.gz") for s in stacks]
    if kind == "truncated":
        raw = paths[1].read_bytes()
        paths[1].write_bytes(raw[: len(raw) // 2])
    elif kind == "nan":
        img = nib.load(paths[0])
        data = np.asarray(img.dataobj, np.float32).copy()
        data[3, 4, 2] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine, img.header), paths[0])
    elif kind == "far":
        img = nib.load(paths[2])
        affine = img.affine.copy()
        affine[0, 3] += 200.0  # the header puts this stack 200 mm away from the others
        out = nib.Nifti1Image(np.asarray(img.dataobj), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        nib.save(out, paths[2])
    return paths, save_volume(ref, folder / "reference.nii.gz")


def _build_cohort(root: Path) -> Path:
    """20 subjects under ``root/data`` and a manifest with paths relative to it; returns the manifest."""
    lines = ["subject,stacks,reference"]
    for k in range(N_SUBJECTS):
        sid = f"sub-{k:02d}"
        kind = CORRUPT.get(sid, ("good", ""))[0]
        stacks, ref = _make_subject(root / "data" / sid, k, kind)
        rel = ";".join(str(p.relative_to(root)) for p in stacks)
        lines.append(f"{sid},{rel},{ref.relative_to(root)}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _checksums(out_dir: Path, subjects: list[str]) -> dict[str, str]:
    return {
        f"{s}/{name}": hashlib.sha256((out_dir / "subjects" / s / name).read_bytes()).hexdigest()
        for s in subjects
        for name in CHECKED_FILES
    }


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _good(rows: list[dict]) -> list[str]:
    return [r["subject"] for r in rows if r["subject"] not in CORRUPT]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return _build_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def cluster():
    """A 2-worker process LocalCluster on loopback, shared by the tests of this module."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"allowed_failures": 3, "dashboard": False, "dashboard_address": "127.0.0.1:0"},
        memory_limit="4GiB",
        silence_logs=40,
    ) as c:
        yield c


def _config(cluster, **changes) -> BatchConfig:
    return BatchConfig(subject=CONFIG, cluster=ClusterConfig(scheduler=cluster.scheduler_address), **changes)


@pytest.fixture(scope="module")
def clean_run(cohort, cluster, tmp_path_factory):
    """The undisturbed batch: its rows and the checksums of its outputs."""
    out = tmp_path_factory.mktemp("clean") / "out"
    result = run_batch(read_manifest(cohort), out_dir=out, config=_config(cluster))
    return result, _checksums(out, _good(result.rows))


# ----------------------------------------------------------------------------------------------- inputs
def test_sanitize_subject_id_keeps_outputs_inside():
    assert sanitize_subject_id("sub-01") == "sub-01"
    assert sanitize_subject_id("../../etc/passwd") == "etc_passwd"
    assert sanitize_subject_id("a/b\\c d\x00e") == "a_b_c_d_e"
    assert sanitize_subject_id(".hidden") == "hidden"
    assert len(sanitize_subject_id("x" * 500)) == batch.MAX_SUBJECT_ID
    for bad in ("..", ".", "/", "  ", "***"):
        with pytest.raises(SlicefieldError, match="no letters or digits"):
            sanitize_subject_id(bad)


def test_manifest_paths_relative_to_its_folder_and_ids_sanitised(tmp_path):
    (tmp_path / "m").mkdir()
    text = (
        "\ufeffSubject,Stacks,Reference,notes\n"
        'sub-01,"a.nii.gz; b/c.nii.gz",ref.nii.gz,"x, y"\n'
        "\n"
        "../../escape,/abs/s.nii.gz,,\n"
        "sub-03,,,\n"
    )
    (tmp_path / "m" / "manifest.csv").write_text(text, encoding="utf-8")
    subjects = read_manifest(tmp_path / "m" / "manifest.csv")
    base = (tmp_path / "m").resolve()
    assert [s.id for s in subjects] == ["sub-01", "escape", "sub-03"]
    assert subjects[0].stacks == (str(base / "a.nii.gz"), str(base / "b" / "c.nii.gz"))
    assert subjects[0].reference == str(base / "ref.nii.gz")
    assert subjects[1].stacks == ("/abs/s.nii.gz",) and subjects[1].reference is None
    assert subjects[1].label == "../../escape"
    assert subjects[2].stacks == ()  # becomes a failed subject, not a batch error


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "manifest is empty"),
        ("id,files\nsub-01,a.nii.gz\n", "no subject or stacks column"),
        ("subject,stacks\n,a.nii.gz\n", "line 2: empty subject id"),
        ("subject,stacks\nsub/01,a.nii.gz\nsub 01,b.nii.gz\n", "both map to the folder 'sub_01'"),
        ("subject,stacks\n..,a.nii.gz\n", "line 2: subject id '..' has no letters"),
    ],
    ids=["empty", "no_columns", "empty_id", "duplicate_after_sanitising", "dot_dot"],
)
def test_manifest_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(SlicefieldError, match=message) as err:
        read_manifest(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_bids_sessions_and_acq_entities_become_stacks(tmp_path):
    def touch(rel: str) -> Path:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        return p

    a1 = touch("sub-01/anat/sub-01_acq-axial_T2w.nii.gz")
    a2 = touch("sub-01/anat/sub-01_acq-coronal_T2w.nii.gz")
    touch("sub-01/anat/sub-01_T1w.nii.gz")  # another contrast: not a stack
    touch("sub-01/anat/sub-01_acq-axial_T2w.json")
    b1 = touch("sub-02/ses-1/anat/sub-02_ses-1_acq-ax_T2w.nii")
    b2 = touch("sub-02/ses-2/anat/sub-02_ses-2_acq-ax_T2w.nii.gz")
    ref = touch("derivatives/reference/sub-02/ses-2/anat/sub-02_ses-2_T2w.nii.gz")
    (tmp_path / "sub-03").mkdir()  # no anat: a subject that will fail with a reason
    touch("README")
    subjects = {s.id: s for s in discover_bids(tmp_path)}
    assert list(subjects) == ["sub-01", "sub-02_ses-1", "sub-02_ses-2", "sub-03"]
    assert subjects["sub-01"].stacks == (str(a1.resolve()), str(a2.resolve()))
    assert subjects["sub-01"].reference is None
    assert subjects["sub-02_ses-1"].stacks == (str(b1.resolve()),)
    assert subjects["sub-02_ses-2"].stacks == (str(b2.resolve()),)
    assert subjects["sub-02_ses-2"].reference == str(ref.resolve())
    assert subjects["sub-03"].stacks == ()
    t1 = discover_bids(tmp_path, suffix="T1w")
    assert t1[0].stacks == (str((tmp_path / "sub-01/anat/sub-01_T1w.nii.gz").resolve()),)
    with pytest.raises(SlicefieldError, match="no sub-"):
        discover_bids(tmp_path / "sub-03")


def test_input_hash_follows_bytes_and_config_not_paths_or_mtimes(tmp_path):
    stacks, ref = _make_subject(tmp_path / "a", 0)
    subject = Subject("s", tuple(map(str, stacks)), str(ref), "s")
    h = input_hash(subject, CONFIG)
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in [*stacks, ref, *(p.with_name(p.name.replace(".nii.gz", ".json")) for p in stacks)]:
        (moved / p.name).write_bytes(p.read_bytes())
    moved_subject = Subject("s", tuple(str(moved / p.name) for p in stacks), str(moved / ref.name), "s")
    assert input_hash(moved_subject, CONFIG) == h
    os.utime(stacks[0], (1, 1))
    assert input_hash(subject, CONFIG) == h
    assert input_hash(subject, replace(CONFIG, resolution=2.0)) != h
    sidecar = stacks[0].with_name(stacks[0].name.replace(".nii.gz", ".json"))
    doc = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**doc, "SliceThickness": 2.5}))
    assert input_hash(subject, CONFIG) != h  # the sidecar sets the slice thickness, so it counts
    sidecar.write_text(json.dumps(doc))
    raw = bytearray(gzip.decompress(ref.read_bytes()))
    raw[-1] ^= 1
    ref.write_bytes(gzip.compress(bytes(raw)))
    assert input_hash(subject, CONFIG) != h


# ----------------------------------------------------------------------------------------------- one subject
def test_run_subject_outputs_done_marker_and_skip(tmp_path):
    stacks, ref = _make_subject(tmp_path / "in", 1)
    subject = Subject("sub-01", tuple(map(str, stacks)), str(ref), "sub-01")
    config = replace(CONFIG, reconstruct=replace(CONFIG.reconstruct, method="bspline"))
    row = run_subject(subject, out_dir=tmp_path / "out", config=config)
    folder = tmp_path / "out" / "subjects" / "sub-01"
    assert row["status"] == "ok" and row["skipped"] is False and row["psnr_masked"] > 20
    assert row["grid"] == "24x24x24" and row["n_stacks"] == 3 and row["interrupted_attempts"] == 0
    assert row["cpu_seconds"] > 0 and row["memory_estimate_mb"] > batch.MEMORY_OVERHEAD_BYTES / 2**20
    done = json.loads((folder / "done.json").read_text())
    assert done["input_hash"] == row["input_hash"] and "recon.nii.gz" in done["files"]
    assert {"report.html", "metrics.json", "log.txt", "config.json"} <= set(done["files"])
    assert not list(folder.rglob(".tmp-*"))
    again = run_subject(subject, out_dir=tmp_path / "out", config=config)
    assert again["skipped"] is True and again["psnr"] == row["psnr"]
    # a changed output is noticed: the subject is recomputed, not trusted
    recon = folder / "recon.nii.gz"
    recon.write_bytes(recon.read_bytes()[:-10])
    assert completed_row(folder, row["input_hash"]) is None
    third = run_subject(subject, out_dir=tmp_path / "out", config=config)
    assert third["skipped"] is False and third["psnr"] == row["psnr"]
    # a killed attempt (attempt.json, no done.json or failed.json) is counted by the next one
    (folder / "done.json").unlink()
    fourth = run_subject(subject, out_dir=tmp_path / "out", config=config)
    assert fourth["interrupted_attempts"] == 1


def test_done_marker_is_strict_json_and_reads_non_finite_metrics_back(tmp_path):
    """A perfect reconstruction has PSNR = inf: done.json stores it as "inf" (no NaN/Infinity tokens)."""
    folder = tmp_path / "sub-01"
    folder.mkdir()
    (folder / "recon.nii.gz").write_bytes(b"abc")
    files = {"recon.nii.gz": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}
    row = {"subject": "sub-01", "status": "ok", "psnr": "inf", "psnr_masked": 41.5, "grid": "2x2x2"}
    (folder / "done.json").write_text(json.dumps({"input_hash": "h", "files": files, "row": row}))
    back = completed_row(folder, "h")
    assert back["psnr"] == float("inf") and back["psnr_masked"] == 41.5 and back["grid"] == "2x2x2"
    assert completed_row(folder, "other hash") is None
    (folder / "done.json").write_text("{truncated")
    assert completed_row(folder, "h") is None


def test_subject_id_that_escapes_is_refused_without_writing(tmp_path):
    stacks, _ = _make_subject(tmp_path / "in", 2)
    out = tmp_path / "deep" / "out"
    row = run_subject(Subject("../../evil", tuple(map(str, stacks))), out_dir=out, config=CONFIG)
    assert row["status"] == "failed" and "would leave" in row["reason"]
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


def test_no_stacks_and_missing_file_fail_with_one_line(tmp_path):
    row = run_subject(Subject("sub-09", ()), out_dir=tmp_path, config=CONFIG)
    assert row["status"] == "failed" and row["reason"] == "subject sub-09: no stacks; list its stack files"
    row = run_subject(Subject("sub-10", (str(tmp_path / "nope.nii.gz"),)), out_dir=tmp_path, config=CONFIG)
    assert row["status"] == "failed" and "nope.nii.gz: file not found" in row["reason"]


# ----------------------------------------------------------------------------------------------- memory
def test_memory_estimate_bounds_numpy_peak_and_refuses_when_too_big(tmp_path):
    import tracemalloc

    from slicefield.metrics import evaluate, foreground_mask
    from slicefield.reconstruct import ReconstructConfig, reconstruct
    from slicefield.volume import Volume

    ref = brain_phantom(40)
    stacks = apply_simulation(ref, sample_simulation(ref, SimulationConfig(thickness=3.0, noise=0.01, seed=3)))
    grid = Volume(np.zeros(ref.shape, np.float32), ref.affine)
    est = estimate_memory(stacks, grid, method="srr")
    assert est.voxels == 40**3 and est.fine_points > est.voxels
    tracemalloc.start()
    try:
        out = reconstruct(stacks, grid, config=ReconstructConfig(method="srr"))
        evaluate(ref.data, out.data, mask=foreground_mask(ref.data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # numpy/scipy arrays are what grows with the grid; the estimate covers them with the fixed overhead on top
    assert peak < est.bytes - batch.MEMORY_OVERHEAD_BYTES < 4 * peak
    assert estimate_memory(stacks, grid, method="bspline").bytes < est.bytes

    est = MemoryEstimate(bytes=900 * 2**20, voxels=10**6, fine_points=0, method="srr")
    check_memory(est, limit_bytes=None)
    check_memory(est, limit_bytes=2 * 2**30, used_bytes=2**30)
    with pytest.raises(SlicefieldError, match=r"needs about 900 MiB .* 512 MiB free of the 2,048 MiB it may use"):
        check_memory(est, limit_bytes=2 * 2**30, used_bytes=2**30, concurrent=2)

    paths, reference = _make_subject(tmp_path / "in", 4)
    subject = Subject("big", tuple(map(str, paths)), str(reference))
    row = run_subject(subject, out_dir=tmp_path / "out", config=CONFIG, memory_limit_bytes=64 * 2**20)
    assert row["status"] == "failed" and "needs about" in row["reason"] and "--resolution" in row["reason"]
    assert not (tmp_path / "out" / "subjects" / "big" / "recon.nii.gz").exists()
    assert (tmp_path / "out" / "subjects" / "big" / "failed.json").is_file()


def test_worker_memory_limit_is_read_inside_a_worker(cluster):
    from distributed import Client

    with Client(cluster) as client:
        limits = {client.submit(batch._worker_memory, pure=False).result() for _ in range(2)}
    assert limits == {(int(4 * 2**30 * 0.95), 1)}  # up to where the nanny would restart the worker
    assert batch._worker_memory() == (None, 1)  # not inside a worker: no limit to check


# ----------------------------------------------------------------------------------------------- the cohort
def test_cohort_corrupt_subjects_fail_alone(cohort, clean_run):
    result, _ = clean_run
    rows = {r["subject"]: r for r in result.rows}
    assert list(rows) == [f"sub-{k:02d}" for k in range(N_SUBJECTS)]
    for sid, r in rows.items():
        if sid in CORRUPT:
            assert r["status"] == "failed" and CORRUPT[sid][1] in r["reason"], (sid, r["reason"])
            assert "\n" not in r["reason"] and r["psnr"] is None
            assert not (result.out_dir / "subjects" / sid / "done.json").exists()
        else:
            assert r["status"] == "ok" and r["reason"] == "" and r["psnr_masked"] > 20, (sid, r["reason"])
            assert (result.out_dir / "subjects" / sid / "done.json").is_file()
    # the same rows in CSV and Parquet, and a cohort report that lists every subject and reason
    import csv

    import pyarrow.parquet as pq

    table = pq.read_table(result.out_dir / "results.parquet").to_pylist()
    with (result.out_dir / "results.csv").open(newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["subject"] for r in table] == [r["subject"] for r in csv_rows] == list(rows)
    assert [r["reason"] for r in table] == [r["reason"] for r in csv_rows] == [r["reason"] for r in rows.values()]
    assert np.allclose(
        [r["psnr"] for r in table if r["status"] == "ok"], [float(r["psnr"]) for r in csv_rows if r["psnr"]]
    )
    page = (result.out_dir / "report.html").read_text()
    assert "17 ok" in page and "3 failed" in page and "does not overlap" in page
    assert page.count("href='subjects/") == 17


def test_sigkill_a_worker_mid_subject_all_subjects_finish(cohort, cluster, clean_run, tmp_path):
    """One worker process is SIGKILLed while it computes a subject: Dask re-runs it elsewhere, outputs unchanged."""
    out = tmp_path / "out"
    killed: dict[str, int] = {}  # subject -> pid of the worker killed while computing it
    stop = threading.Event()

    def finished_by(folder: Path, pid: int) -> bool:
        try:
            return json.loads((folder / "done.json").read_text())["row"]["worker"].endswith(f":{pid}")
        except (OSError, ValueError, KeyError):
            return False

    def killer() -> None:
        subjects = out / "subjects"
        while not stop.is_set() and not killed:
            finished = list(subjects.glob("*/done.json"))
            for attempt in subjects.glob("*/attempt.json") if finished else ():
                folder = attempt.parent
                if folder.name in CORRUPT or (folder / "done.json").exists() or (folder / "failed.json").exists():
                    continue
                try:
                    pid = json.loads(attempt.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                os.kill(pid, signal.SIGKILL)
                while not _dead(pid):
                    time.sleep(0.005)
                if not finished_by(folder, pid):  # else it finished in the instant before the kill: try again
                    killed[folder.name] = pid
                break
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = run_batch(read_manifest(cohort), out_dir=out, config=_config(cluster))
    finally:
        stop.set()
        thread.join()
    assert killed, "no worker was killed mid-subject: the batch finished first"
    ((sid, pid),) = killed.items()
    rows = {r["subject"]: r for r in result.rows}
    assert [s for s, r in rows.items() if r["status"] == "ok"] == _good(result.rows)
    assert rows[sid]["interrupted_attempts"] == 1 and not rows[sid]["worker"].endswith(f":{pid}")
    assert _checksums(out, _good(result.rows)) == clean_run[1]


def test_sigkill_whole_batch_then_resume_identical_and_not_recomputed(cohort, cluster, clean_run, tmp_path):
    """The batch process and its workers are SIGKILLed; --resume finishes the rest, finished subjects untouched."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slicefield.cli", "-q", "batch", str(cohort), "--out-dir", str(out)]
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd + ["--workers", "2"], env=env, start_new_session=True, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("subjects/*/done.json"))) < 3:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.01)
        listening = set()  # every socket the batch and its cluster listen on: loopback only
        for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                conns = process.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            listening |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
        os.killpg(proc.pid, signal.SIGKILL)  # the batch process and its cluster (scheduler, nannies, workers)
        assert listening == {"127.0.0.1"}, listening
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = {p.parent.name: p.parent for p in out.glob("subjects/*/done.json")}
    assert 3 <= len(finished) < N_SUBJECTS - len(CORRUPT), "killed too late to test resuming"
    stamps = {sid: {f.name: f.stat().st_mtime_ns for f in d.iterdir() if f.is_file()} for sid, d in finished.items()}

    with pytest.raises(SlicefieldError, match="already holds a batch; pass --resume"):
        run_batch(read_manifest(cohort), out_dir=out, config=_config(cluster))
    result = run_batch(read_manifest(cohort), out_dir=out, config=_config(cluster, resume=True))
    rows = {r["subject"]: r for r in result.rows}
    assert [s for s, r in rows.items() if r["status"] == "ok"] == _good(result.rows)
    assert {s for s, r in rows.items() if r["skipped"]} == set(finished)
    for sid, before in stamps.items():
        after = {f.name: f.stat().st_mtime_ns for f in finished[sid].iterdir() if f.is_file()}
        assert after == before, f"{sid} was rewritten"
    assert _checksums(out, _good(result.rows)) == clean_run[1]
    assert not list(out.rglob(".tmp-*"))
    again = run_batch(read_manifest(cohort), out_dir=out, config=_config(cluster, resume=True))
    assert all(r["skipped"] for r in again.rows if r["status"] == "ok")  # idempotent: nothing left to do


# ----------------------------------------------------------------------------------------------- threads cluster
@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> list[Subject]:
    root = tmp_path_factory.mktemp("small")
    subjects = []
    for k in range(3):
        stacks, ref = _make_subject(root / f"s{k}", 10 + k)
        subjects.append(Subject(f"sub-{k}", tuple(map(str, stacks)), str(ref), f"sub-{k}"))
    return subjects


def _threads(**changes) -> BatchConfig:
    """One in-process worker (threads), so monkeypatched faults reach the subjects; bspline for speed."""
    subject = replace(CONFIG, reconstruct=replace(CONFIG.reconstruct, method="bspline"))
    cluster = ClusterConfig(workers=1, processes=False, memory_limit="64GiB", retries=2)
    return BatchConfig(subject=subject, cluster=cluster, **changes)


def test_disk_full_is_recorded_then_resumed(small_cohort, tmp_path, monkeypatch):
    real_save = nib.save

    def full_disk(img, filename, *args, **kwargs):
        if "sub-1" in str(filename):
            Path(filename).write_bytes(b"\x1f\x8b partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save(img, filename, *args, **kwargs)

    monkeypatch.setattr(nib, "save", full_disk)
    out = tmp_path / "out"
    result = run_batch(small_cohort, out_dir=out, config=_threads())
    rows = {r["subject"]: r for r in result.rows}
    assert rows["sub-0"]["status"] == rows["sub-2"]["status"] == "ok"
    reason = rows["sub-1"]["reason"]
    assert rows["sub-1"]["status"] == "failed" and "recon.nii.gz: cannot write (No space left on device)" in reason
    assert str(out / "subjects" / "sub-1") in reason and "\n" not in reason
    folder = out / "subjects" / "sub-1"
    assert not (folder / "done.json").exists() and not (folder / "recon.nii.gz").exists()
    assert not list(folder.glob(".tmp-*")) and (folder / "failed.json").is_file()

    monkeypatch.setattr(nib, "save", real_save)  # space freed: resume finishes it, the others are reused
    result = run_batch(small_cohort, out_dir=out, config=_threads(resume=True))
    assert [(r["status"], r["skipped"]) for r in result.rows] == [("ok", True), ("ok", False), ("ok", True)]

    import pyarrow.parquet as pq

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", no_space)
    with pytest.raises(SlicefieldError, match=r"results.parquet: cannot write \(No space left on device\)"):
        run_batch(small_cohort, out_dir=out, config=_threads(resume=True))
    assert not list(out.glob(".tmp-*"))


def test_transient_errors_are_retried_bad_input_is_not(small_cohort, tmp_path, monkeypatch):
    import slicefield.io as sio

    real_load = sio.load_stack
    calls: dict[str, int] = {}

    def flaky(path, **kwargs):
        key = Path(path).parent.name
        calls[key] = calls.get(key, 0) + 1
        if key == "s0" and calls[key] == 1:
            raise OSError(errno.EIO, "Input/output error (simulated)", str(path))
        if key == "s1":
            raise OSError(errno.ESTALE, "Stale file handle (simulated)", str(path))
        if key == "s2":
            raise SlicefieldError("bad header (simulated)", path=path, fix="fix it")
        return real_load(path, **kwargs)

    monkeypatch.setattr(sio, "load_stack", flaky)
    result = run_batch(small_cohort, out_dir=tmp_path / "out", config=_threads())
    rows = {r["subject"]: r for r in result.rows}
    assert rows["sub-0"]["status"] == "ok" and calls["s0"] == 1 + 3  # failed once, retried, then 3 stacks read
    assert rows["sub-1"]["status"] == "failed" and calls["s1"] == 3  # 1 try + 2 retries
    assert rows["sub-1"]["reason"].startswith("failed 3 times: OSError: [Errno 116] Stale file handle")
    assert rows["sub-2"]["status"] == "failed" and calls["s2"] == 1  # bad input: not retried
    assert "bad header (simulated); fix it" in rows["sub-2"]["reason"]


def test_gpu_subjects_land_on_gpu_workers(small_cohort, tmp_path):
    """With gpu=True every subject task asks for the Dask resource GPU=1, so only a worker offering it runs one."""
    from distributed import Client, Scheduler, SpecCluster, Worker, get_task_stream

    options = {"nthreads": 1, "host": "127.0.0.1", "memory_limit": "64GiB"}
    spec = {
        "cpu": {"cls": Worker, "options": options},
        "gpu": {"cls": Worker, "options": {**options, "resources": {"GPU": 1}}},
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0"},
    }
    with SpecCluster(workers=spec, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        gpu_worker = next(a for a, w in client.scheduler_info()["workers"].items() if w["resources"])
        config = replace(_threads(), cluster=ClusterConfig(scheduler=cluster.scheduler_address, gpu=True))
        with get_task_stream(client) as stream:
            result = run_batch(small_cohort, out_dir=tmp_path / "out", config=config)
    assert [r["status"] for r in result.rows] == ["ok"] * 3
    workers = {t["worker"] for t in stream.data if t["key"].startswith("slicefield-subject-")}
    assert workers == {gpu_worker}


def test_unreachable_scheduler_and_locked_folder_are_batch_errors(small_cohort, tmp_path):
    import fcntl

    config = BatchConfig(cluster=ClusterConfig(scheduler="tcp://127.0.0.1:9", connect_timeout_s=1.0))
    start = time.monotonic()
    with pytest.raises(SlicefieldError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        run_batch(small_cohort, out_dir=tmp_path / "a", config=config)
    assert time.monotonic() - start < 20
    out = tmp_path / "b"
    out.mkdir()
    with (out / ".batch.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(SlicefieldError, match="another slicefield batch is writing to this folder"):
            run_batch(small_cohort, out_dir=out, config=config)


def test_cli_batch_option_errors_are_one_line(tmp_path, capsys):
    from slicefield.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,stacks\nsub-01,a.nii.gz\n")
    cases = [
        (["--method", "magic"], "unknown --method 'magic'"),
        (["--resolution", "0"], "--resolution must be a positive number"),
        (["--memory-limit", "lots"], "--memory-limit 'lots' is not a positive size"),
        (["--memory-limit", "300MB"], "--memory-limit 300MB is below the 1,024 MiB a worker needs"),
        (["--workers", "0"], "--workers and --threads-per-worker must be at least 1"),
    ]
    for extra, message in cases:
        assert main(["batch", str(manifest), "--out-dir", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("slicefield: error:") and message in err[0], err
    assert main(["batch", str(tmp_path / "missing.csv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing.csv: manifest not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- fuzzing (slow)
def _seed_nifti() -> bytes:
    """A valid uncompressed NIfTI-1 stack: 8 x 8 x 4 float32, 1 x 1 x 3 mm, sform = qform."""
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    img = nib.Nifti1Image(np.arange(256, dtype=np.float32).reshape(8, 8, 4), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img.to_bytes()


def _mutations(seed_len: int, header_len: int):
    from hypothesis import strategies as st

    position = st.one_of(st.integers(0, header_len - 1), st.integers(0, seed_len - 1))
    return st.tuples(
        st.lists(st.tuples(position, st.integers(0, 255)), max_size=12),
        st.one_of(st.none(), st.integers(0, seed_len)),
    )


def _mutate(seed: bytes, mutation) -> bytes:
    flips, cut = mutation
    raw = bytearray(seed)
    for pos, value in flips:
        raw[pos] = value
    return bytes(raw if cut is None else raw[:cut])


def _loads_or_refuses(load, path: Path) -> None:
    """``load(path)`` returns a finite, well-formed result or raises a one-line SlicefieldError; nothing else."""
    try:
        out = load(path)
    except SlicefieldError as e:
        assert "\n" not in str(e)
        return
    assert np.isfinite(out.data).all()
    affines = out.slice_to_world if hasattr(out, "slice_to_world") else out.affine
    assert np.isfinite(affines).all()


@pytest.mark.parametrize(
    "kind, mutation, message",
    [
        ("nifti", ([(259, 64)], None), "invalid sform or qform in the header"),  # quaternion of norm > 1
        ("nifti", ([(111, 95)], None), "cannot read as NIfTI"),  # a huge dimension: OverflowError in memmap
        ("dicom", ([], 141), "cannot read DICOM file"),  # meta header cut: BytesLengthException
        ("dicom", ([], 152), "cannot read DICOM file"),  # struct.error
        ("dicom", ([(251, 0)], None), "cannot read DICOM file"),  # unknown VR: NotImplementedError
    ],
    ids=["quaternion", "huge_dim", "dicom_meta_cut", "dicom_struct", "dicom_unknown_vr"],
)
def test_loader_crashes_found_by_fuzzing_are_one_line_errors(tmp_path, kind, mutation, message):
    """The shrunk examples the fuzz tests below found (each used to escape as a raw library exception)."""
    import pydicom.data

    from slicefield.io import load_dicom_series, load_volume

    if kind == "nifti":
        path, seed, load = tmp_path / "f.nii", _seed_nifti(), load_volume
    else:
        path = tmp_path / "IM0001.dcm"
        seed = Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes()
        load = load_dicom_series
    path.write_bytes(_mutate(seed, mutation))
    with pytest.raises(SlicefieldError, match=message) as err:
        load(path)
    assert "\n" not in str(err.value) and path.name in str(err.value)


@pytest.mark.slow
def test_fuzz_nifti_loaders_load_or_refuse(tmp_path_factory):
    """Byte flips (mostly in the 352-byte header) and truncations of a valid NIfTI, plain and gzipped."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from slicefield.io import load_stack, load_volume

    folder = tmp_path_factory.mktemp("fuzz_nifti")
    seed = _seed_nifti()
    seed_gz = gzip.compress(seed, mtime=0)

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutation=_mutations(len(seed), 352), gz=st.booleans(), as_stack=st.booleans())
    def check(mutation, gz, as_stack):
        path = folder / ("f.nii.gz" if gz else "f.nii")
        path.write_bytes(gzip.compress(_mutate(seed, mutation), mtime=0) if gz else _mutate(seed, mutation))
        _loads_or_refuses(load_stack if as_stack else load_volume, path)

    check()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutation=_mutations(len(seed_gz), 20))
    def check_gzip_stream(mutation):
        path = folder / "g.nii.gz"
        path.write_bytes(_mutate(seed_gz, mutation))
        _loads_or_refuses(load_volume, path)

    check_gzip_stream()


@pytest.mark.slow
def test_fuzz_sidecar_values_load_or_refuse(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from slicefield.io import load_stack

    folder = tmp_path_factory.mktemp("fuzz_sidecar")
    (folder / "s.nii").write_bytes(_seed_nifti())
    values = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.lists(st.integers())
    )

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        doc=st.one_of(
            st.dictionaries(
                st.sampled_from(["SliceThickness", "SlicefieldPSF", "SliceEncodingDirection", "Other"]), values
            ),
            values,
        ),
        raw=st.one_of(st.none(), st.binary(max_size=40)),
    )
    def check(doc, raw):
        side = folder / "s.json"
        side.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        _loads_or_refuses(load_stack, folder / "s.nii")

    check()


@pytest.mark.slow
def test_fuzz_dicom_loader_loads_or_refuses(tmp_path_factory):
    """Byte flips and truncations of pydicom's shipped MR_small.dcm (header region first)."""
    import pydicom.data
    from hypothesis import HealthCheck, given, settings

    from slicefield.io import load_dicom_series

    seed = Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes()
    folder = tmp_path_factory.mktemp("fuzz_dicom")

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutation=_mutations(len(seed), 1200))
    def check(mutation):
        path = folder / "IM0001.dcm"
        path.write_bytes(_mutate(seed, mutation))
        _loads_or_refuses(lambda p: load_dicom_series([p]), path)

    check()


@pytest.mark.slow
def test_fuzz_manifest_and_ids_stay_inside(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder = tmp_path_factory.mktemp("fuzz_manifest")
    cells = st.text(alphabet=st.sampled_from(list("ab.-_/\\ ;,\"'\n\r\x00é.")), max_size=12)

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        header=st.sampled_from(["subject,stacks,reference", "Subject,Stacks", "stacks,subject", "x,y"]),
        rows=st.lists(st.lists(cells, max_size=4), max_size=6),
        raw=st.one_of(st.none(), st.binary(max_size=60)),
    )
    def check(header, rows, raw):
        import csv as csv_module
        import io as io_module

        buf = io_module.StringIO()
        csv_module.writer(buf).writerows([header.split(","), *rows])
        path = folder / "manifest.csv"
        path.write_bytes(raw if raw is not None else buf.getvalue().encode())
        try:
            subjects = read_manifest(path)
        except SlicefieldError as e:
            assert "\n" not in str(e)
            return
        ids = [s.id for s in subjects]
        assert len(set(ids)) == len(ids)
        for sid in ids:
            assert sid and sid == sanitize_subject_id(sid) and not sid.startswith(".")
            assert (folder / "subjects" / sid).resolve().parent == (folder / "subjects").resolve()

    check()


def test_bids_subject_end_to_end_uses_sidecar_thickness(tmp_path):
    """A BIDS dataset built from simulated stacks: discovered, then one subject run (no cluster needed)."""
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "derivatives" / "reference" / "sub-01" / "anat").mkdir(parents=True)
    stacks, ref = _make_subject(tmp_path / "sim", 5)
    for s in stacks:
        acq = s.name.split("_")[2].split(".")[0]  # stack_0_axial.nii.gz -> axial
        s.rename(root / "sub-01" / "anat" / f"sub-01_acq-{acq}_T2w.nii.gz")
        s.with_name(s.name.replace(".nii.gz", ".json")).rename(root / "sub-01" / "anat" / f"sub-01_acq-{acq}_T2w.json")
    ref.rename(root / "derivatives" / "reference" / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    (subject,) = discover_bids(root)
    assert [Path(p).name for p in subject.stacks] == [
        "sub-01_acq-axial_T2w.nii.gz",
        "sub-01_acq-coronal_T2w.nii.gz",
        "sub-01_acq-sagittal_T2w.nii.gz",
    ]
    row = run_subject(subject, out_dir=tmp_path / "out", config=CONFIG)
    assert row["status"] == "ok" and row["n_stacks"] == 3 and row["psnr_masked"] > 20
    log = (tmp_path / "out" / "subjects" / "sub-01" / "log.txt").read_text()
    assert "sidecar" not in row["reason"] and "sub-01: 3 stacks" in log


def test_cli_batch_on_a_scheduler_exit_status_and_resume(cluster, small_cohort, tmp_path, caplog):
    from slicefield.cli import main

    lines = ["subject,stacks,reference"]
    lines += [f"{s.id},{';'.join(s.stacks)},{s.reference}" for s in small_cohort[:2]]
    lines.append("sub-lost,missing/stack.nii.gz,")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    args = ["-q", "batch", str(tmp_path / "manifest.csv"), "--out-dir", str(tmp_path / "out")]
    args += ["--scheduler", cluster.scheduler_address, "--method", "bspline"]
    assert main(args) == 1  # finished, but a subject failed
    assert "sub-lost: failed:" in caplog.text  # the reason is logged as the subject comes back
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [(r["subject"], r["status"], r["skipped"]) for r in rows] == [
        ("sub-0", "ok", False),
        ("sub-1", "ok", False),
        ("sub-lost", "failed", False),
    ]
    assert main([*args, "--resume"]) == 1
    rows = pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()
    assert [r["skipped"] for r in rows] == [True, True, False]
    assert rows[2]["reason"].endswith(
        "missing/stack.nii.gz: file not found; check the path (relative paths: to the manifest)"
    )
