"""Tests for slicefield.runs: run-directory files, JSON conversion, timings, log capture, Timer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from slicefield.runs import RunDir, Timer, peak_rss_mb, to_jsonable


@dataclass
class _Cfg:
    lr: float = 1e-3
    out: Path = Path("out/recon.nii.gz")
    spacing: np.ndarray = field(default_factory=lambda: np.array([0.8, 0.8, 3.0]))
    steps: np.int64 = np.int64(200)
    sizes: tuple[int, ...] = (16, 32)


def test_create_writes_valid_json_files(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", config={"fit": _Cfg(), "seed": 0}, command=["slicefield", "fit", "a.nii"])
    assert run.figures.is_dir()
    for name in ("config.json", "environment.json"):
        json.loads((run.path / name).read_text())  # strictly valid JSON
    env = run.read_json("environment.json")
    assert env["packages"]["numpy"] == np.__version__
    assert {"python", "platform", "cpu_count", "torch", "utc_time", "git"} <= set(env)
    assert "cuda_available" in env["torch"] or env["torch"] == {"available": False}
    assert not list(run.path.glob(".tmp-*")), "atomic writes left a temporary file"


def test_config_round_trips(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", config={"fit": _Cfg(), "seed": 0}, command=["slicefield", "fit"])
    again = RunDir(run.path)
    assert again.config == {
        "fit": {"lr": 1e-3, "out": "out/recon.nii.gz", "spacing": [0.8, 0.8, 3.0], "steps": 200, "sizes": [16, 32]},
        "seed": 0,
    }
    assert again.read_json("config.json")["command"] == ["slicefield", "fit"]
    assert RunDir(run.path).config == json.loads(json.dumps(to_jsonable({"fit": _Cfg(), "seed": 0})))


def test_to_jsonable_non_finite_and_unknown() -> None:
    assert to_jsonable({"psnr": np.float32(np.inf), "x": float("nan"), 1: np.bool_(True)}) == {
        "psnr": "inf",
        "x": "nan",
        "1": True,
    }
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"bad": object()})


def test_timings_accumulate_and_metrics_merge(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", config={}, command=None)
    run.record_timing("fit", 1.5)
    run.record_timing("fit", 2.0)
    run.record_timing("load", 0.25)
    with run.timed("fit") as t:
        pass
    timings = json.loads((run.path / "timings.json").read_text())
    assert timings["fit"] == pytest.approx(3.5 + t.seconds)
    assert timings["load"] == 0.25
    run.update_metrics({"psnr": np.float64(31.0)})
    assert run.update_metrics({"ssim": 0.9, "psnr": 32.0}) == {"psnr": 32.0, "ssim": 0.9}
    assert run.read_json("metrics.json") == {"psnr": 32.0, "ssim": 0.9}


def test_log_captured_only_inside_with_block(tmp_path: Path) -> None:
    log = logging.getLogger("slicefield.test_runs")
    run = RunDir.create(tmp_path / "run", config={}, command=None)
    log.info("before")
    with run:
        log.info("inside %d", 1)
        log.debug("too detailed")
    log.info("after")
    text = (run.path / "log.txt").read_text()
    assert "inside 1" in text
    assert "before" not in text and "after" not in text and "too detailed" not in text
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("slicefield").handlers)


def test_log_records_failure(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "run", config={}, command=None)
    with pytest.raises(ZeroDivisionError), run:
        1 / 0  # noqa: B018
    assert "ZeroDivisionError" in (run.path / "log.txt").read_text()


def test_timer_measures_time_and_memory() -> None:
    with Timer() as t:
        big = np.ones(64 * 1024**2 // 8)  # 64 MB, touched
        big += 1
    assert t.seconds > 0
    assert t.peak_rss_mb >= 64
    assert peak_rss_mb() >= 64
