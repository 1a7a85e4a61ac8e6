"""Run directories: everything a command computed, in one folder the report can read on its own.

Layout (see DESIGN.md, "Runs")::

    run/
      config.json        {"slicefield_version", "command", "config"}: everything needed to replay
      environment.json   python, platform, CPUs, package versions, torch device, UTC time, git commit
      metrics.json       {name: value}, merged by update_metrics
      timings.json       {name: wall seconds}, accumulated by record_timing
      log.txt            the ``slicefield`` logger while the RunDir is used as a context manager
      figures/           PNG figures (drawn by slicefield.report.make_figures)
      reference.nii.gz, recon_<method>.nii.gz, history_<method>.json, simulation.json, report.html
                         outputs, when the command has them (slicefield.report lists what the report reads)

JSON files are written atomically and strictly (no NaN/Infinity tokens: non-finite floats become the strings
``"nan"``, ``"inf"``, ``"-inf"``, which ``float()`` reads back).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from . import __version__
from .io.atomic import atomic_path

#: Packages whose versions go into environment.json (distribution names).
ENV_PACKAGES = ("slicefield", "torch", "numpy", "scipy", "nibabel", "SimpleITK")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ru_maxrss is in kilobytes on Linux and in bytes on macOS.
_MAXRSS_TO_MB = 1 / 1024**2 if sys.platform == "darwin" else 1 / 1024


def to_jsonable(obj: Any) -> Any:
    """A JSON-safe copy of ``obj``: dataclasses -> dict, numpy arrays/scalars -> lists/numbers, Path -> str,
    Enum -> value, tuples/sets -> lists, non-finite floats -> "nan"/"inf"/"-inf". Raises TypeError otherwise."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    if isinstance(obj, float | np.floating):
        x = float(obj)
        return x if math.isfinite(x) else str(x)
    if isinstance(obj, np.generic | np.ndarray) or hasattr(obj, "tolist"):  # numpy, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"cannot store a {type(obj).__name__} in JSON: {obj!r}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``getrusage(RUSAGE_SELF).ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_TO_MB


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall) and ``t.peak_rss_mb``.

    ``peak_rss_mb`` is the largest resident memory of the whole process (MB, CPU only) seen while the block ran,
    sampled every 20 ms by a background thread (psutil) plus once at each end.
    """

    def __init__(self, *, interval_s: float = 0.02) -> None:
        self.seconds = 0.0
        self.peak_rss_mb = 0.0
        self._interval = interval_s
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss_mb(self) -> float:
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_rss_mb = max(self.peak_rss_mb, self._rss_mb())

    def __enter__(self) -> Timer:
        self.peak_rss_mb = self._rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._rss_mb())


def _git_commit(folder: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``, or None (no git, not a checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"available": False}
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {"available": True, "cuda_available": cuda, "cuda_version": torch.version.cuda}
    if cuda:
        info["device_count"] = torch.cuda.device_count()
        info["device_name"] = torch.cuda.get_device_name(0)
    return info


def environment() -> dict[str, Any]:
    """What the run ran on: Python, OS, CPUs, package versions (None when missing), torch device, time, git."""
    versions: dict[str, str | None] = {}
    for name in ENV_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": versions,
        "torch": _torch_info(),
        "utc_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": _git_commit(Path(__file__).resolve().parent),
    }


class RunDir:
    """A run directory (see the module docstring). ``with run:`` copies the ``slicefield`` log into log.txt."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handler: logging.FileHandler | None = None
        self._old_level = logging.NOTSET

    @classmethod
    def create(cls, path: str | Path, *, config: Any, command: list[str] | None) -> RunDir:
        """Make the folder (and ``figures/``; an existing run folder is reused) and write config.json and
        environment.json. ``config``: a dict or dataclass; ``command``: the argv that started the run."""
        run = cls(path)
        run.figures.mkdir(parents=True, exist_ok=True)
        record = {"slicefield_version": __version__, "command": command, "config": config}
        run.write_json("config.json", record)
        run.write_json("environment.json", environment())
        return run

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def config(self) -> dict[str, Any]:
        """The stored config (the ``config`` entry of config.json)."""
        return self.read_json("config.json")["config"]

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` (made JSON-safe) to ``<run>/<name>`` atomically; returns the path."""
        text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
        with atomic_path(self.path / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return self.path / name

    def read_json(self, name: str, default: Any = None) -> Any:
        """The content of ``<run>/<name>``, or ``default`` if that file does not exist."""
        p = self.path / name
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else default

    def update_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``metrics`` into metrics.json (new values replace old ones); returns the merged dict."""
        merged = {**self.read_json("metrics.json", {}), **to_jsonable(metrics)}
        self.write_json("metrics.json", merged)
        return merged

    def record_timing(self, name: str, seconds: float) -> float:
        """Add ``seconds`` to ``name`` in timings.json (created on first use); returns the new total."""
        timings = self.read_json("timings.json", {})
        timings[name] = float(timings.get(name, 0.0)) + float(seconds)
        self.write_json("timings.json", timings)
        return timings[name]

    @contextmanager
    def timed(self, name: str) -> Iterator[Timer]:
        """``with run.timed("fit") as t:`` records the block's wall seconds under ``name`` (also on error)."""
        timer = Timer()
        try:
            with timer:
                yield timer
        finally:
            self.record_timing(name, timer.seconds)

    def __enter__(self) -> RunDir:
        if self._handler is not None:
            raise RuntimeError(f"run directory {self.path} is already capturing the log")
        self._handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        self._handler.setLevel(logging.INFO)
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger = logging.getLogger("slicefield")
        self._old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None):
        logger = logging.getLogger("slicefield")
        if exc is not None:
            logger.error("run failed: %s: %s", type(exc).__name__, exc)
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
        logger.setLevel(self._old_level)
