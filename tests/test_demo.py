"""The demo's pipeline end to end, on a small real T1 (nibabel's anatomical.nii) instead of MNI152 to stay quick."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import pytest

from slicefield import demo
from slicefield.cli import main

SMALL_T1 = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.mark.skipif(not SMALL_T1.is_file(), reason="nibabel's test data is not installed")
def test_demo_writes_run_directory_table_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("slicefield.data.mni152_t1_path", lambda: SMALL_T1)
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| bspline") or line.startswith("| srr")]
    assert len(rows) == 2
    for name in ("config.json", "environment.json", "metrics.json", "timings.json", "report.html"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    by_method = {r["method"]: r for r in metrics["rows"]}
    assert by_method["srr"]["psnr_masked"] > by_method["bspline"]["psnr_masked"]
    assert (out / "recon_srr.nii.gz").is_file() and len(list((out / "stacks").glob("*.nii.gz"))) == 3
    assert f"report: {(out / 'report.html').resolve()}" in printed  # the demo ends by naming its report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2  # figures embedded, no external files
    assert demo.DEMO_METHODS == ("bspline", "srr")
