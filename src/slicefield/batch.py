"""Cohorts on dask.distributed: one task per subject (reconstruct -> evaluate -> report), resumable, fault-isolated.

A cohort is a list of :class:`Subject` (from a CSV manifest, :func:`read_manifest`, or a BIDS dataset,
:func:`discover_bids`). :func:`run_batch` sends one task per subject (:func:`run_subject`) to a Dask cluster (a
``LocalCluster`` on 127.0.0.1 by default, or any scheduler address), gathers one row per subject and writes the
results table and a cohort report. Output folder::

    out_dir/
      config.json, environment.json, log.txt, timings.json   the batch as a run directory (slicefield.runs)
      results.csv, results.parquet                            one row per subject (RESULT_COLUMNS)
      report.html                                             the cohort table, linking each subject's report
      subjects/<id>/                                          a run directory per finished subject:
        recon.nii.gz                                          the reconstruction (world mm RAS affine)
        config.json, environment.json, log.txt, timings.json, metrics.json, report.html, attempt.json
        done.json                                             written last: input hash, output checksums, row

Reliability rules:

- **Isolation.** A subject whose input is bad fails alone: its row says why in one line (the
  :class:`~slicefield.errors.SlicefieldError` text: file, problem, fix) and the other subjects go on.
- **Retries.** Transient errors (``OSError`` with an errno of :data:`TRANSIENT_ERRNOS`, ``MemoryError``,
  ``ConnectionError``, ``TimeoutError``) are raised to Dask, which re-runs the task up to ``retries`` times. A
  worker that dies mid-subject (killed, out of memory) makes the scheduler re-run the subject on another worker,
  up to ``allowed_failures`` deaths per subject. Bad input is not retried.
- **Complete or absent.** Every file is written atomically (temporary name, then rename) and ``done.json`` (the
  input hash, every output's size and SHA-256, the row) is written last. A subject folder without a valid
  ``done.json`` is incomplete and is emptied and recomputed by the next attempt; one that still holds
  ``attempt.json`` but neither ``done.json`` nor ``failed.json`` was interrupted (killed), which the next attempt
  counts (``interrupted_attempts``). A failed subject keeps ``failed.json`` (reason, traceback) and its log.
- **Resume.** With ``resume=True`` a subject is skipped when its :func:`input_hash` (SHA-256 of the *bytes* of
  every input file and JSON sidecar, plus the subject config and the slicefield version; paths and mtimes are not
  part of it, so moving or touching the data does not force a recompute) equals the one in its ``done.json`` and
  every output listed there still has the recorded size and SHA-256.
- **Memory.** Before reconstructing, a subject's peak memory is estimated (:func:`estimate_memory`) and the
  subject is refused with a one-line reason when it cannot fit the worker's memory limit (:func:`check_memory`).
- **Containment.** Subject ids are sanitised (:func:`sanitize_subject_id`), so no manifest entry can make the
  batch write outside ``out_dir``.
- **One batch per folder.** ``out_dir/.batch.lock`` is held (``flock``, released by the OS even on SIGKILL) while a
  batch runs; ``config.json`` marks a folder as a batch, which only ``resume=True`` may continue.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import __version__
from .errors import SlicefieldError
from .io.atomic import atomic_path, atomic_write
from .reconstruct import ALL_METHODS, FIELD_METHODS, ReconstructConfig
from .volume import PSF_KINDS, PSFKind, Stack, Volume

log = logging.getLogger(__name__)

#: Folder (inside out_dir) of the per-subject run directories.
SUBJECTS_DIR = "subjects"
#: The completion marker of a subject, written last.
DONE_MARKER = "done.json"
#: File name of a subject's reconstruction.
RECON_NAME = "recon.nii.gz"
#: Written first by every attempt (pid, host, start time, interrupted attempts before it).
ATTEMPT_FILE = "attempt.json"
#: Written when a subject fails: its reason and, for unexpected errors, the traceback.
FAILED_FILE = "failed.json"
#: Longest subject id (characters) after sanitising.
MAX_SUBJECT_ID = 128
#: Version of the input-hash document (bump when its content changes, so old batches are recomputed).
HASH_FORMAT = 1
#: Bytes read at a time when hashing files.
HASH_CHUNK_BYTES = 1 << 20
#: Separator of the stack paths in a manifest's ``stacks`` column.
MANIFEST_PATH_SEPARATOR = ";"
#: NIfTI file suffixes recognised in BIDS folders.
_NIFTI_SUFFIXES = (".nii.gz", ".nii")

#: errno values of failures that may go away by themselves (I/O hiccups, busy or stale network files).
TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.ECONNRESET, errno.EINTR}
)
#: errno values the user fixes on the output side (space, quota, permissions, read-only disk).
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

# Memory model of one subject (see estimate_memory). Calibrated on 2026-11-22 on the 2-core development machine by
# peak RSS growth (psutil, runs.Timer) of reconstruct + evaluate on 64^3 and 128^3 phantoms with three orthogonal
# 3 mm stacks: bspline 121 / 215 MB, srr 156 / 498 MB (fresh process each). The constants below over-estimate
# those four runs by 1.2-1.3x.
#: Libraries' first-use buffers, thread stacks and the chunked operator construction (bytes).
MEMORY_OVERHEAD_BYTES = 128 * 2**20
#: Bytes per target-grid voxel: output, B-spline sums, CG vectors, Huber weights, SSIM maps (float32 arrays).
MEMORY_BYTES_PER_VOXEL: dict[str, int] = {"bspline": 64, "srr": 64, "inr": 160, "irem": 160}
#: Bytes per fine-lattice point of the forward operator (sparse sampler: 8 nonzeros of float32 value and int32
#: column; the field methods keep a second, torch copy with int64 indices). The field-method values are a
#: rough upper bound, not calibrated; GPU memory is not estimated.
MEMORY_BYTES_PER_FINE_POINT: dict[str, int] = {"bspline": 0, "srr": 48, "inr": 160, "irem": 160}

#: Smallest LocalCluster memory limit per worker: a worker holds ~0.4 GiB of libraries (torch, scipy, SimpleITK)
#: before any subject, and Dask pauses a worker above 80 % of its limit and restarts it above 95 %.
MIN_WORKER_MEMORY_BYTES = 2**30

#: Environment of LocalCluster worker processes: one subject, one thread (parallelism comes from the subjects; the
#: Nanny already sets OMP/MKL/OpenBLAS to 1). Workers of an external cluster should be started with the same.
WORKER_ENV = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Subject:
    """One subject of a cohort: its stacks and an optional reference, as absolute paths."""

    id: str
    """Sanitised id: the name of its folder under ``subjects/`` (see :func:`sanitize_subject_id`)."""
    stacks: tuple[str, ...]
    """Stack files (NIfTI) or DICOM series folders; may be empty (the subject then fails with a reason)."""
    reference: str | None = None
    """Ground-truth NIfTI volume: the target grid, and the reference of the metrics."""
    label: str = ""
    """The id as the manifest or BIDS folder wrote it (before sanitising)."""


@dataclass(frozen=True)
class SubjectConfig:
    """What is done to each subject (part of the input hash: change it and subjects are recomputed)."""

    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    """Method and its options (``reconstruct.method``: bspline, srr, inr or irem)."""
    resolution: float | None = None
    """Isotropic voxel size (mm) of a target grid over the stacks' joint field of view, world RAS-aligned. None:
    the reference's grid when there is a reference, else the finest in-plane spacing of the stacks."""
    thickness: float | None = None
    """Slice thickness (mm) of every stack; None: each stack's JSON sidecar, else its slice spacing."""
    psf: PSFKind | None = None
    """Slice profile of every stack; None: the sidecar's, else gaussian."""
    use_qform: bool = False
    """Use each NIfTI's qform rather than its sform."""
    mask: Literal["auto", "none"] = "auto"
    """Metrics mask: auto = foreground of the reference (Otsu), none = whole volume."""
    report: bool = True
    """Write a report.html in each subject's folder."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the subjects run (not part of the input hash)."""

    scheduler: str | None = None
    """Address of an existing Dask scheduler (``tcp://host:8786``); None: start a LocalCluster on ``host``. Its
    workers must see out_dir and the inputs at the same paths."""
    workers: int = 2
    """LocalCluster: number of worker processes."""
    threads_per_worker: int = 1
    """LocalCluster: subjects run at the same time in one worker (they share its memory limit)."""
    memory_limit: str | int = "auto"
    """LocalCluster: memory limit per worker, bytes or a size such as ``"4GiB"``; ``"auto"``: RAM / workers."""
    retries: int = 2
    """Re-runs of a subject after a transient error (see the module docstring)."""
    allowed_failures: int = 3
    """LocalCluster: worker deaths tolerated while running one subject before it is given up."""
    host: str = "127.0.0.1"
    """LocalCluster: interface the scheduler, workers and (if on) dashboard bind to; loopback by default."""
    dashboard: bool = False
    """LocalCluster: serve the Dask dashboard (on ``host``, a free port; the link is logged)."""
    processes: bool = True
    """LocalCluster: workers are processes (True) or threads of this process (False, for tests)."""
    gpu: bool = False
    """Each subject needs one GPU: tasks ask for the Dask resource ``GPU=1`` (start external workers with
    ``--resources GPU=1``; a LocalCluster gives each worker one when CUDA is available)."""
    connect_timeout_s: float = 30.0
    """Seconds to wait for an existing scheduler."""


@dataclass(frozen=True)
class BatchConfig:
    """Options of :func:`run_batch`."""

    subject: SubjectConfig = field(default_factory=SubjectConfig)
    """What is done to each subject."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where subjects run."""
    resume: bool = False
    """Continue a batch in out_dir: skip subjects whose inputs, config and outputs are unchanged and complete.
    Without it, an out_dir that already holds a batch is refused."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one subject, before it starts (see :func:`estimate_memory`)."""

    bytes: int
    voxels: int
    """Target-grid voxels."""
    fine_points: int
    """Fine-lattice points of the forward operator, all stacks."""
    method: str


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    """One per subject, in input order (RESULT_COLUMNS)."""
    out_dir: Path
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]


#: Columns of the results table: name, pyarrow type name, meaning.
RESULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("subject", "string", "sanitised subject id (folder name under subjects/)"),
    ("status", "string", "ok or failed"),
    ("reason", "string", "one line: why the subject failed (empty when ok)"),
    ("skipped", "bool", "true: reused from a previous run (inputs, config and outputs unchanged)"),
    ("method", "string", "reconstruction method"),
    ("n_stacks", "int64", "stacks read"),
    ("grid", "string", "target grid shape, XxYxZ"),
    ("voxel_mm", "float64", "target grid voxel size (mm, smallest axis)"),
    ("memory_estimate_mb", "float64", "estimated peak memory (MiB) before the subject started"),
    ("psnr", "float64", "PSNR (dB) against the reference, whole volume"),
    ("psnr_masked", "float64", "PSNR (dB) inside the mask"),
    ("ssim", "float64", "SSIM, whole volume"),
    ("ssim_masked", "float64", "SSIM inside the mask"),
    ("nrmse", "float64", "NRMSE (euclidean), whole volume"),
    ("nrmse_masked", "float64", "NRMSE inside the mask"),
    ("seconds", "float64", "wall seconds of reconstruct + evaluate"),
    ("cpu_seconds", "float64", "CPU seconds of the worker process (all threads) during reconstruct + evaluate"),
    ("peak_rss_mb", "float64", "peak resident memory (MiB) of the worker process during the subject"),
    ("interrupted_attempts", "int64", "earlier attempts of this subject that were killed mid-way"),
    ("worker", "string", "host:pid of the process that computed it"),
    ("input_hash", "string", "SHA-256 of the inputs' bytes and the subject config"),
    ("output", "string", "subject folder, relative to out_dir"),
)


# ----------------------------------------------------------------------------------------------- inputs
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_subject_id(raw: str) -> str:
    """A subject id that is safe as one folder name: letters, digits, ``.``, ``_`` and ``-`` only.

    Runs of other characters (``/``, ``\\``, spaces, NUL, ...) become ``_``; leading and trailing dots, dashes and
    underscores are removed (so no ``.``, ``..`` or hidden folder); at most MAX_SUBJECT_ID characters. Raises
    SlicefieldError when nothing is left.
    """
    safe = _ID_UNSAFE.sub("_", raw).strip("._-")[:MAX_SUBJECT_ID].rstrip("._-")
    if not safe:
        raise SlicefieldError(
            f"subject id {raw!r} has no letters or digits", fix="use ids such as sub-01 (letters, digits, . _ -)"
        )
    return safe


def _unique(subjects: list[Subject], where: str | Path) -> list[Subject]:
    seen: dict[str, str] = {}
    for s in subjects:
        if s.id in seen:
            raise SlicefieldError(
                f"subjects {seen[s.id]!r} and {s.label!r} both map to the folder {s.id!r}",
                path=where,
                fix="give every subject a distinct id",
            )
        seen[s.id] = s.label
        if s.id != s.label:
            log.warning("subject id %r written as %r (only letters, digits, . _ - are kept)", s.label, s.id)
    return subjects


def read_manifest(path: str | Path) -> list[Subject]:
    """The subjects of a CSV manifest.

    Columns (header row, any order, names case-insensitive): ``subject``, ``stacks`` (stack files or DICOM folders
    separated by ``;``), optional ``reference``; other columns are ignored. Relative paths resolve against the
    manifest's folder. A row with no stacks still becomes a subject (it fails with a reason); rows that are
    entirely empty are skipped. Raises SlicefieldError (naming the line) for an unreadable file, missing columns,
    an empty subject id or two subjects with the same folder name.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise SlicefieldError("manifest not found", path=p, fix="check the path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise SlicefieldError(f"cannot read the manifest ({e})", path=p, fix="pass a UTF-8 CSV file") from e
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise SlicefieldError(f"not a valid CSV file ({e})", path=p, fix="check its quoting") from e
    header_at = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    if header_at is None:
        raise SlicefieldError("the manifest is empty", path=p, fix="write a header subject,stacks[,reference]")
    header = [c.strip().lower() for c in rows[header_at]]
    missing = [c for c in ("subject", "stacks") if c not in header]
    if missing:
        raise SlicefieldError(
            f"the manifest has no {' or '.join(missing)} column (header: {','.join(header)})",
            path=p,
            fix="start it with the header subject,stacks,reference",
        )
    col = {name: header.index(name) for name in ("subject", "stacks", "reference") if name in header}
    base = p.resolve().parent

    def cell(row: list[str], name: str) -> str:
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    def resolve(text: str) -> str:
        return str(base / Path(text).expanduser())

    subjects = []
    for line, row in enumerate(rows[header_at + 1 :], start=header_at + 2):
        if not any(c.strip() for c in row):
            continue
        label = cell(row, "subject")
        if not label:
            raise SlicefieldError(f"line {line}: empty subject id", path=p, fix="give every row a subject id")
        try:
            sid = sanitize_subject_id(label)
        except SlicefieldError as e:
            raise SlicefieldError(f"line {line}: {e.problem}", path=p, fix=e.fix) from e
        stacks = tuple(resolve(s.strip()) for s in cell(row, "stacks").split(MANIFEST_PATH_SEPARATOR) if s.strip())
        reference = cell(row, "reference")
        subjects.append(Subject(sid, stacks, resolve(reference) if reference else None, label))
    return _unique(subjects, p)


def _nifti_files(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and any(f.name.endswith(f"_{suffix}{ext}") for ext in _NIFTI_SUFFIXES)
    )


def discover_bids(root: str | Path, *, suffix: str = "T2w") -> list[Subject]:
    """The subjects of a BIDS dataset: ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` (one subject per session).

    Every matching file of a subject (or session) is a stack: the ``acq-`` (and ``run-``) entities tell them
    apart. Slice thickness and profile come from each file's JSON sidecar (``SliceThickness``) when present. A
    reference, when there is one, is the single ``*_<suffix>.nii[.gz]`` in the same place under
    ``derivatives/reference/`` (a slicefield convention, not BIDS). Subject ids are ``sub-X`` or ``sub-X_ses-Y``.
    A subject folder with no matching file still becomes a subject (it fails with a reason).
    """
    base = Path(root)
    if not base.is_dir():
        raise SlicefieldError("BIDS dataset folder not found", path=base, fix="check the path")
    if suffix not in ("T1w", "T2w", "PDw", "T2starw", "FLAIR"):
        raise SlicefieldError(f"unsupported BIDS suffix {suffix!r}", fix="use T2w or T1w")
    base = base.resolve()
    subjects = []
    for sub in sorted(d for d in base.glob("sub-*") if d.is_dir()):
        sessions = sorted(d for d in sub.glob("ses-*") if d.is_dir()) or [sub]
        for ses in sessions:
            rel = ses.relative_to(base)
            label = "_".join(rel.parts)
            stacks = tuple(str(f) for f in _nifti_files(ses / "anat", suffix))
            refs = _nifti_files(base / "derivatives" / "reference" / rel / "anat", suffix)
            if len(refs) > 1:
                log.warning("%s: %d reference candidates, none used", label, len(refs))
            reference = str(refs[0]) if len(refs) == 1 else None
            subjects.append(Subject(sanitize_subject_id(label), stacks, reference, label))
    if not subjects:
        raise SlicefieldError(
            "no sub-* folders", path=base, fix="pass a BIDS dataset (sub-*/anat/*_T2w.nii.gz) or a CSV manifest"
        )
    return _unique(subjects, base)


def load_subjects(path: str | Path, *, bids_suffix: str = "T2w") -> list[Subject]:
    """A folder is read as a BIDS dataset (:func:`discover_bids`), a file as a CSV manifest (:func:`read_manifest`)."""
    p = Path(path)
    if p.is_dir():
        return discover_bids(p, suffix=bids_suffix)
    return read_manifest(p)


# ----------------------------------------------------------------------------------------------- hashing
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _input_digest(path: str | Path) -> dict[str, Any]:
    """Content digest of one input: a file (+ its JSON sidecar) or a DICOM folder (every visible file)."""
    from .io.nifti import sidecar_path

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        return {"folder": [[f.name, _file_sha256(f)] for f in files]}
    if not p.is_file():
        raise SlicefieldError("file not found", path=p, fix="check the path (relative paths: to the manifest)")
    side = sidecar_path(p)
    return {"sha256": _file_sha256(p), "sidecar": _file_sha256(side) if side.is_file() and side != p else None}


def input_hash(subject: Subject, config: SubjectConfig) -> str:
    """SHA-256 (hex) of what determines a subject's outputs: the bytes of every stack (and JSON sidecar) and of the
    reference, in order, the subject config and the slicefield version. Paths and modification times are left out:
    moved or touched data is not recomputed, edited data is."""
    from .runs import to_jsonable

    doc = {
        "format": HASH_FORMAT,
        "slicefield": __version__,
        "config": to_jsonable(config),
        "stacks": [_input_digest(s) for s in subject.stacks],
        "reference": None if subject.reference is None else _input_digest(subject.reference),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- memory
def estimate_memory(stacks: Sequence[Stack], grid: Volume, *, method: str) -> MemoryEstimate:
    """Peak memory (bytes) of reconstructing ``stacks`` on ``grid`` with ``method`` and evaluating the result.

    ``MEMORY_OVERHEAD_BYTES + voxels * MEMORY_BYTES_PER_VOXEL[method] + fine points *
    MEMORY_BYTES_PER_FINE_POINT[method] + the stacks' own float32 arrays``, where the fine points are those of
    the forward operator's quadrature lattice (:func:`~slicefield.acquisition.operator.plan_groups`; planned
    here without building the sparse matrices). Calibration: see the constants.
    """
    from .acquisition.operator import plan_groups

    if method not in MEMORY_BYTES_PER_VOXEL:
        raise SlicefieldError(f"unknown method {method!r}", fix=f"use one of {', '.join(ALL_METHODS)}")
    voxels = int(np.prod(grid.shape))
    fine = 0
    if MEMORY_BYTES_PER_FINE_POINT[method]:
        fine = sum(int(np.prod(g.fine_shape)) for s in stacks for g in plan_groups(s, grid.spacing))
    stack_bytes = sum(2 * 4 * s.data.size for s in stacks)  # data and a float32 mask per stack
    total = (
        MEMORY_OVERHEAD_BYTES
        + voxels * MEMORY_BYTES_PER_VOXEL[method]
        + fine * MEMORY_BYTES_PER_FINE_POINT[method]
        + stack_bytes
    )
    return MemoryEstimate(bytes=int(total), voxels=voxels, fine_points=fine, method=method)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_memory(
    estimate: MemoryEstimate, *, limit_bytes: int | None, used_bytes: int = 0, concurrent: int = 1
) -> None:
    """Refuse (SlicefieldError) a subject whose estimate does not fit the worker's memory.

    limit_bytes: what the worker may use (None: no limit, nothing to check); used_bytes: what the worker process
    holds already; concurrent: subjects that may run at once in that worker (its threads), which share the rest.
    """
    if not limit_bytes:
        return
    budget = (limit_bytes - used_bytes) / max(1, concurrent)
    if estimate.bytes > budget:
        raise SlicefieldError(
            f"needs about {_mb(estimate.bytes)} ({estimate.method} on {estimate.voxels:,} voxels) but a worker has "
            f"{_mb(max(budget, 0))} free of the {_mb(limit_bytes)} it may use",
            fix="pass a coarser --resolution, or a larger --memory-limit with fewer --workers",
        )


def _worker_memory() -> tuple[int | None, int]:
    """(usable memory in bytes or None, threads) of the Dask worker running this code; (None, 1) outside one.

    Usable = the worker's limit times the fraction at which its nanny restarts it
    (``distributed.worker.memory.terminate``, 0.95 by default), so a subject that fits is not killed."""
    try:
        import dask
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None, 1
    limit = worker.memory_manager.memory_limit
    terminate = dask.config.get("distributed.worker.memory.terminate", 0.95) or 1.0
    return (None if not limit else int(limit * min(1.0, float(terminate)))), int(worker.state.nthreads)


# ----------------------------------------------------------------------------------------------- one subject
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, checked to be a direct child of ``folder`` (defence in depth for sanitised ids)."""
    target = folder / name
    if target.resolve().parent != folder.resolve() or name in ("", ".", ".."):
        raise SlicefieldError(f"subject folder {name!r} would leave {folder}", fix="use a plain subject id")
    return target


def _load_inputs(subject: Subject, config: SubjectConfig) -> tuple[list[Stack], Volume | None]:
    from .io import check_inputs, load_dicom_series, load_stack, load_volume

    if not subject.stacks:
        raise SlicefieldError(f"subject {subject.label or subject.id}: no stacks", fix="list its stack files")
    stacks = []
    for s in subject.stacks:
        p = Path(s)
        if p.is_dir():
            stacks.append(load_dicom_series(p, thickness=config.thickness, psf=config.psf or "gaussian"))
        else:
            stacks.append(load_stack(p, thickness=config.thickness, psf=config.psf, use_qform=config.use_qform))
    for warning in check_inputs(stacks):
        log.warning("%s: %s", subject.id, warning)
    reference = None if subject.reference is None else load_volume(subject.reference, use_qform=config.use_qform)
    return stacks, reference


def _target_grid(stacks: list[Stack], reference: Volume | None, config: SubjectConfig) -> Volume:
    from .baselines.grid import joint_grid

    if config.resolution is None and reference is not None:
        return Volume(np.zeros(reference.shape, np.float32), reference.affine)
    resolution = config.resolution if config.resolution is not None else min(min(s.spacing) for s in stacks)
    return joint_grid(stacks, resolution=resolution)


def _evaluate(reference: Volume, recon: Volume, config: SubjectConfig) -> dict[str, Any]:
    from .itk import resample
    from .metrics import evaluate, foreground_mask

    test = recon
    if recon.shape != reference.shape or not np.allclose(recon.affine, reference.affine, atol=1e-3):
        test = recon.with_data(
            resample(recon.data, recon.affine, shape=reference.shape, target_affine=reference.affine)
        )
    mask = foreground_mask(reference.data) if config.mask == "auto" else None
    return evaluate(reference.data, test.data, mask=mask)


def _file_records(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": _file_sha256(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name != DONE_MARKER
    }


def completed_row(folder: Path, digest: str) -> dict[str, Any] | None:
    """The stored row of a finished subject folder whose done.json matches ``digest`` and whose outputs are all
    present and unchanged (size and SHA-256); None otherwise."""
    marker = folder / DONE_MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("input_hash") != digest:
            return None
        for name, rec in done["files"].items():
            f = folder / name
            if not f.is_file() or f.stat().st_size != rec["bytes"] or _file_sha256(f) != rec["sha256"]:
                log.warning("%s: %s is missing or changed; recomputing", folder.name, name)
                return None
        floats = {name for name, kind, _ in RESULT_COLUMNS if kind == "float64"}
        return {k: float(v) if k in floats and isinstance(v, str) else v for k, v in done["row"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s: unreadable %s (%s); recomputing", folder.name, DONE_MARKER, e)
        return None


def _failed_row(subject: Subject, reason: str, *, digest: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name, _, _ in RESULT_COLUMNS}
    row.update(subject=subject.id, status="failed", reason=_one_line(reason), skipped=False, input_hash=digest)
    row["output"] = f"{SUBJECTS_DIR}/{subject.id}"
    return row


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, MemoryError | ConnectionError | TimeoutError):
        return True
    return isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS


def _prepare_folder(folder: Path) -> int:
    """Empty a subject folder for a new attempt; returns the interrupted attempts before this one.

    An earlier attempt that left ``attempt.json`` but neither ``done.json`` nor ``failed.json`` was killed."""
    interrupted = 0
    attempt = folder / ATTEMPT_FILE
    if attempt.is_file() and not (folder / DONE_MARKER).exists() and not (folder / FAILED_FILE).exists():
        try:
            interrupted = int(json.loads(attempt.read_text(encoding="utf-8")).get("interrupted_before", 0)) + 1
        except (OSError, ValueError, TypeError, AttributeError):
            interrupted = 1
    if folder.is_dir():
        (folder / DONE_MARKER).unlink(missing_ok=True)  # first, so a crash below leaves an incomplete folder
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return interrupted


def _compute_subject(
    subject: Subject, work: Path, *, config: SubjectConfig, digest: str, memory_limit_bytes: int | None
) -> dict[str, Any]:
    """Reconstruct (and evaluate) one subject into the run directory ``work``; returns its row."""
    from dataclasses import replace

    import psutil

    from .io import save_volume
    from .reconstruct import reconstruct
    from .report import write_report
    from .runs import RunDir, Timer, to_jsonable

    run = RunDir.create(
        work,
        config={"subject": asdict(subject), "config": to_jsonable(config), "input_hash": digest},
        command=None,
    )
    method = config.reconstruct.method
    with run:
        stacks, reference = _load_inputs(subject, config)
        grid = _target_grid(stacks, reference, config)
        estimate = estimate_memory(stacks, grid, method=method)
        limit, threads = (memory_limit_bytes, 1) if memory_limit_bytes is not None else _worker_memory()
        check_memory(estimate, limit_bytes=limit, used_bytes=psutil.Process().memory_info().rss, concurrent=threads)
        log.info(
            "%s: %d stacks, %s grid, %s, about %s", subject.id, len(stacks), grid.shape, method, _mb(estimate.bytes)
        )
        rc = config.reconstruct
        if method in FIELD_METHODS and rc.checkpoint_dir is None:
            rc = replace(rc, checkpoint_dir=str(work / "checkpoint"))
        cpu0 = time.process_time()
        with Timer() as timer:
            recon = reconstruct(stacks, grid, config=rc)
            metrics = _evaluate(reference, recon, config) if reference is not None else {}
        cpu = time.process_time() - cpu0
        save_volume(recon, work / RECON_NAME)
        run.record_timing("reconstruct_evaluate", timer.seconds)
        if metrics:
            run.update_metrics({"rows": [{"method": method, **metrics}]})
        if config.report:
            write_report(work, title=f"slicefield batch: {subject.id} ({method})")
    row: dict[str, Any] = {name: None for name, _, _ in RESULT_COLUMNS}
    row.update(
        subject=subject.id,
        status="ok",
        reason="",
        skipped=False,
        method=method,
        n_stacks=len(stacks),
        grid="x".join(str(n) for n in grid.shape),
        voxel_mm=float(np.min(grid.spacing)),
        memory_estimate_mb=estimate.bytes / 2**20,
        seconds=timer.seconds,
        cpu_seconds=cpu,
        peak_rss_mb=timer.peak_rss_mb,
        input_hash=digest,
        output=f"{SUBJECTS_DIR}/{subject.id}",
        **{k: metrics.get(k) for k in ("psnr", "psnr_masked", "ssim", "ssim_masked", "nrmse", "nrmse_masked")},
    )
    return row


def run_subject(
    subject: Subject,
    *,
    out_dir: str | Path,
    config: SubjectConfig,
    resume: bool = True,
    memory_limit_bytes: int | None = None,
) -> dict[str, Any]:
    """The task of one subject: skip it if done, else reconstruct, evaluate, write its folder; returns its row.

    out_dir: the batch folder (the subject goes to ``out_dir/subjects/<id>``). resume: reuse a complete folder
    with the same input hash (else recompute). memory_limit_bytes: the memory this subject may use; None: the
    running Dask worker's limit (no limit outside a worker). Bad input, a refused memory estimate and output
    errors (disk full, permissions) give a ``failed`` row with a one-line reason; transient errors are raised so
    Dask retries them (module docstring).
    """
    import traceback

    from .runs import to_jsonable

    folder = Path(out_dir) / SUBJECTS_DIR / subject.id
    digest = None
    started = False
    try:
        folder = _inside(Path(out_dir) / SUBJECTS_DIR, subject.id)
        digest = input_hash(subject, config)
        if resume and (row := completed_row(folder, digest)) is not None:
            return {**row, "skipped": True}
        interrupted = _prepare_folder(folder)
        started = True
        attempt = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "interrupted_before": interrupted,
        }
        atomic_write(folder / ATTEMPT_FILE, lambda p: p.write_text(json.dumps(attempt) + "\n"))
        row = _compute_subject(subject, folder, config=config, digest=digest, memory_limit_bytes=memory_limit_bytes)
        row.update(interrupted_attempts=interrupted, worker=f"{attempt['host']}:{attempt['pid']}")
        done = {"input_hash": digest, "files": _file_records(folder), "row": to_jsonable(row)}  # inf -> "inf"
        with atomic_path(folder / DONE_MARKER) as tmp:
            tmp.write_text(json.dumps(done, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return row
    except SlicefieldError as e:
        row, trace = _failed_row(subject, str(e), digest=digest), None
    except Exception as e:
        if _is_transient(e):
            if started:
                shutil.rmtree(folder, ignore_errors=True)  # a clean slate for Dask's retry
            raise
        if isinstance(e, OSError) and e.errno in _OUTPUT_ERRNOS:
            reason = f"{e.filename or folder}: cannot write ({e.strerror}); free space or fix the permissions"
            row, trace = _failed_row(subject, reason, digest=digest), None
        else:
            log.exception("%s: unexpected error", subject.id)
            reason = f"unexpected {type(e).__name__}: {e} (a bug? see {SUBJECTS_DIR}/{subject.id}/{FAILED_FILE})"
            row, trace = _failed_row(subject, reason, digest=digest), traceback.format_exc()
    if started:
        _record_failure(folder, row["reason"], trace)
    return row


def _record_failure(folder: Path, reason: str, trace: str | None) -> None:
    """Leave failed.json (and the log) in a failed subject's folder; remove any partial reconstruction."""
    (folder / RECON_NAME).unlink(missing_ok=True)
    doc = {"reason": reason, "traceback": trace}
    try:
        atomic_write(folder / FAILED_FILE, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
    except (SlicefieldError, OSError) as e:  # e.g. the disk is still full: the row keeps the reason
        log.warning("%s: cannot record the failure (%s)", folder.name, e)


# ----------------------------------------------------------------------------------------------- outputs
def write_results(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.parquet`` (RESULT_COLUMNS, one row per subject) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    names = [name for name, _, _ in RESULT_COLUMNS]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in names})
    text = buf.getvalue()
    csv_path = atomic_write(out / "results.csv", lambda p: p.write_text(text, encoding="utf-8", newline=""))
    types = {"string": pa.string(), "bool": pa.bool_(), "int64": pa.int64(), "float64": pa.float64()}
    schema = pa.schema([pa.field(name, types[kind]) for name, kind, _ in RESULT_COLUMNS])
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=schema)
    parquet_path = atomic_write(out / "results.parquet", lambda p: pq.write_table(table, p))
    return csv_path, parquet_path


def write_cohort_report(rows: list[dict[str, Any]], out_dir: str | Path, *, title: str = "slicefield batch") -> Path:
    """Write ``report.html``: a summary line and one table row per subject, linking each subject's report."""
    from .report import write_table_report

    ok = [r for r in rows if r["status"] == "ok"]
    psnr = [r["psnr_masked"] for r in ok if r.get("psnr_masked") is not None]
    summary = (
        f"{len(rows)} subjects: {len(ok)} ok ({sum(bool(r['skipped']) for r in ok)} reused from an earlier run), "
        f"{len(rows) - len(ok)} failed."
        + (f" Median brain PSNR {float(np.median(psnr)):.2f} dB over {len(psnr)} subjects." if psnr else "")
    )
    headers = ("subject", "status", "reused", "grid", "PSNR brain dB", "SSIM brain", "wall s", "peak RAM MiB", "reason")

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else spec.format(v)

    table = []
    links = []
    for r in rows:
        table.append(
            (
                r["subject"],
                r["status"],
                "yes" if r.get("skipped") else "",
                r.get("grid") or "-",
                fmt(r.get("psnr_masked"), "{:.2f}"),
                fmt(r.get("ssim_masked"), "{:.4f}"),
                fmt(r.get("seconds"), "{:.1f}"),
                fmt(r.get("peak_rss_mb"), "{:.0f}"),
                r.get("reason") or "",
            )
        )
        report = Path(out_dir) / SUBJECTS_DIR / r["subject"] / "report.html"
        links.append(f"{SUBJECTS_DIR}/{r['subject']}/report.html" if r["status"] == "ok" and report.is_file() else None)
    return write_table_report(
        Path(out_dir) / "report.html", title=title, summary=summary, headers=headers, rows=table, links=links
    )


# ----------------------------------------------------------------------------------------------- the batch
@contextmanager
def _batch_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir`` (released by the OS if the process dies, even by SIGKILL)."""
    path = out_dir / ".batch.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SlicefieldError(f"cannot write in the output folder ({e.strerror})", path=out_dir) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise SlicefieldError(
                "another slicefield batch is writing to this folder",
                path=out_dir,
                fix="wait for it, or use another --out-dir",
            ) from e
        yield
    finally:
        os.close(fd)


def check_cluster_config(config: ClusterConfig) -> None:
    """Raise a one-line SlicefieldError for cluster options that cannot work (checked before anything starts)."""
    if config.workers < 1 or config.threads_per_worker < 1:
        raise SlicefieldError("--workers and --threads-per-worker must be at least 1", fix="pass e.g. --workers 2")
    if config.retries < 0 or config.allowed_failures < 0:
        raise SlicefieldError("--retries and --allowed-failures must be 0 or more", fix="pass e.g. --retries 2")
    if config.memory_limit != "auto":
        from dask.utils import parse_bytes

        try:
            limit = parse_bytes(config.memory_limit)
            if limit <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError) as e:
            raise SlicefieldError(
                f"--memory-limit {config.memory_limit!r} is not a positive size", fix="pass e.g. --memory-limit 4GiB"
            ) from e
        if limit < MIN_WORKER_MEMORY_BYTES and config.scheduler is None:
            raise SlicefieldError(
                f"--memory-limit {config.memory_limit} is below the {_mb(MIN_WORKER_MEMORY_BYTES)} a worker needs "
                "for its libraries alone",
                fix="pass at least --memory-limit 1GiB (fewer --workers leave each more)",
            )


@contextmanager
def _client(config: ClusterConfig) -> Iterator[Any]:
    """A dask.distributed Client: to ``config.scheduler``, or to a new LocalCluster (closed on exit)."""
    from distributed import Client, LocalCluster

    if config.scheduler:
        try:
            client = Client(config.scheduler, timeout=config.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise SlicefieldError(
                f"cannot reach the Dask scheduler at {config.scheduler} ({_one_line(str(e)) or type(e).__name__})",
                fix="check the address and that the scheduler runs, or drop --scheduler for a local cluster",
            ) from e
        with client:
            yield client
        return
    resources = None
    if config.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SlicefieldError(
                "--gpu asked for, but CUDA is not available", fix="drop --gpu or run on a GPU machine"
            )
        resources = {"GPU": 1}
    scheduler_kwargs = {
        "allowed_failures": config.allowed_failures,
        "dashboard": config.dashboard,
        "dashboard_address": f"{config.host}:0",  # the scheduler's HTTP routes, on loopback and a free port
    }
    try:
        cluster = LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            host=config.host,
            protocol="tcp://",  # also for thread workers (whose default, inproc, takes no host)
            dashboard_address=f"{config.host}:0" if config.dashboard else None,
            scheduler_kwargs=scheduler_kwargs,
            memory_limit=config.memory_limit,
            resources=resources,
            silence_logs=logging.ERROR,
            **({"env": WORKER_ENV} if config.processes else {}),
        )
    except (OSError, ValueError, TimeoutError, RuntimeError) as e:
        raise SlicefieldError(
            f"cannot start a local Dask cluster ({_one_line(str(e)) or type(e).__name__})",
            fix="check --memory-limit and --workers",
        ) from e
    with cluster, Client(cluster) as client:
        if config.dashboard:
            log.info("Dask dashboard: %s", cluster.dashboard_link)
        yield client


@contextmanager
def _quiet_dask(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the ``distributed`` loggers of this process to ``level`` for the block (restored after)."""
    import distributed  # noqa: F401  (its import configures its loggers: do that first)

    logger = logging.getLogger("distributed")
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


def _row_from_exception(subject: Subject, e: BaseException, config: ClusterConfig) -> dict[str, Any]:
    from distributed.scheduler import KilledWorker

    if isinstance(e, KilledWorker):
        reason = (
            f"the worker running it died {config.allowed_failures + 1} times (killed, out of memory or crashed); "
            "see the worker logs"
        )
    else:
        reason = f"failed {config.retries + 1} times: {type(e).__name__}: {e}"
    return _failed_row(subject, reason)


def run_batch(
    subjects: Sequence[Subject],
    *,
    out_dir: str | Path,
    config: BatchConfig = BatchConfig(),
    command: list[str] | None = None,
    progress: ProgressFn | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> BatchResult:
    """Run every subject as one Dask task and write the results table and cohort report into ``out_dir``.

    progress: called as ``progress(done, total)`` as subjects finish. on_row: called with each subject's row as it
    arrives (finishing order). Returns the rows in input order. Raises SlicefieldError for batch-level problems
    (output folder not writable or locked by another batch, an earlier batch there without ``resume``, no
    scheduler); a subject's own failure is only a row.
    """
    from .runs import RunDir, to_jsonable

    if config.subject.reconstruct.method not in ALL_METHODS:
        raise SlicefieldError(
            f"unknown method {config.subject.reconstruct.method!r}", fix=f"use one of {', '.join(ALL_METHODS)}"
        )
    if config.subject.psf is not None and config.subject.psf not in PSF_KINDS:
        raise SlicefieldError(f"unknown psf {config.subject.psf!r}", fix=f"use one of {', '.join(PSF_KINDS)}")
    subjects = list(subjects)
    if not subjects:
        raise SlicefieldError("no subjects to run", fix="list subjects in the manifest or BIDS folder")
    if len({s.id for s in subjects}) != len(subjects):
        raise SlicefieldError("two subjects share an id", fix="give every subject a distinct id")
    check_cluster_config(config.cluster)
    out = Path(out_dir).resolve()
    try:
        (out / SUBJECTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlicefieldError(f"cannot create the output folder ({e.strerror})", path=out_dir) from e
    start = time.perf_counter()
    with _batch_lock(out):
        if (out / "config.json").exists() and not config.resume:
            raise SlicefieldError(
                "already holds a batch", path=out_dir, fix="pass --resume to continue it, or choose another --out-dir"
            )
        rows: dict[str, dict[str, Any]] = {}
        with _quiet_dask(), _client(config.cluster) as client:
            # config.json marks the folder as a batch: written once a cluster is there to run it
            record = {"batch": to_jsonable(config), "subjects": [asdict(s) for s in subjects]}
            run = RunDir.create(out, config=record, command=command)
            with run:  # the batch's log.txt, until the last subject is in
                _run_tasks(client, subjects, out, config, rows, progress=progress, on_row=on_row)
        ordered = [rows[s.id] for s in subjects]
        write_results(ordered, out)
        write_cohort_report(ordered, out)
        seconds = time.perf_counter() - start
        run.record_timing("batch", seconds)
    return BatchResult(rows=ordered, out_dir=out, seconds=seconds)


def _run_tasks(
    client: Any,
    subjects: list[Subject],
    out: Path,
    config: BatchConfig,
    rows: dict[str, dict[str, Any]],
    *,
    progress: ProgressFn | None,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Submit one task per subject and fill ``rows`` (id -> row) as they finish."""
    from distributed import as_completed

    log.info("batch of %d subjects on %s", len(subjects), client.scheduler.address)
    resources = {"GPU": 1} if config.cluster.gpu else None
    futures = {}
    for s in subjects:
        fut = client.submit(
            run_subject,
            s,
            out_dir=str(out),
            config=config.subject,
            resume=config.resume,
            key=f"slicefield-subject-{s.id}-{uuid.uuid4().hex[:8]}",
            retries=config.cluster.retries,
            resources=resources,
            pure=False,
        )
        futures[fut] = s
    for fut in as_completed(list(futures)):
        s = futures[fut]
        try:
            row = fut.result()
        except Exception as e:  # the task's final error, after retries; never takes the batch down
            row = _row_from_exception(s, e, config.cluster)
        rows[s.id] = row
        if row["status"] != "ok":
            log.warning("%s: failed: %s", s.id, row["reason"])
        if on_row is not None:
            on_row(row)
        if progress is not None:
            progress(len(rows), len(subjects))
        fut.release()
