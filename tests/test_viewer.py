"""The viewer's server (slicefield.viewer) without a browser: what it serves, what it refuses, how it stops."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from slicefield.cli import main
from slicefield.errors import SlicefieldError
from slicefield.figures import default_window
from slicefield.io import load_volume, save_volume
from slicefield.viewer import LOOPBACK, ViewerConfig, ViewerServer
from slicefield.viewer.server import OVERLAY_THRESHOLD, STATIC_DIR, STATIC_FILES
from slicefield.volume import Volume

#: World position (mm RAS) of the bright voxel in the LPS-ordered test volume.
BRIGHT_MM = np.array([6.0, -9.0, 4.0])


def _lps_volume() -> Volume:
    """A 30 x 34 x 20, 2 mm volume stored in LPS array order with one bright 3^3 block centred at BRIGHT_MM."""
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = [30.0, 33.0, -20.0]
    data = np.full((30, 34, 20), 10.0, np.float32)
    ijk = np.round(np.linalg.solve(affine[:3, :3], BRIGHT_MM - affine[:3, 3])).astype(int)
    data[ijk[0] - 1 : ijk[0] + 2, ijk[1] - 1 : ijk[1] + 2, ijk[2] - 1 : ijk[2] + 2] = 100.0
    return Volume(data, affine)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("view")
    vol = _lps_volume()
    out = {
        "hr": save_volume(vol, d / "hr.nii.gz"),
        "srr": save_volume(vol.with_data(vol.data * 0.5), d / "srr.nii"),
        "secret": d / "secret.txt",
    }
    out["secret"].write_text("not to be served\n")
    return out


def _get(server: ViewerServer, path: str, *, host: str | None = None) -> tuple[int, bytes, str]:
    """A raw GET (the path is sent exactly as given, not normalised)."""
    conn = http.client.HTTPConnection(LOOPBACK, server.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Content-Type") or ""
    finally:
        conn.close()


def test_serves_page_scripts_and_the_given_volumes(files: dict[str, Path]) -> None:
    with ViewerServer(files["hr"], [files["srr"]]) as server:
        assert server.url.startswith(f"http://{LOOPBACK}:") and server.port > 0
        status, body, ctype = _get(server, "/")
        assert status == 200 and ctype.startswith("text/html") and b"/static/niivue.umd.js" in body
        for name in STATIC_FILES:
            status, body, ctype = _get(server, f"/static/{name}")
            assert status == 200 and body == (STATIC_DIR / name).read_bytes(), name
        status, body, _ = _get(server, "/volumes.json")
        info = json.loads(body)
        assert [v["name"] for v in info["volumes"]] == ["hr.nii.gz", "srr.nii"]
        assert info["volumes"][0]["colormap"] == "gray" and info["volumes"][1]["opacity"] == 0.5
        for v, path in zip(info["volumes"], (files["hr"], files["srr"]), strict=True):
            status, body, _ = _get(server, v["url"])
            assert status == 200 and body == path.read_bytes()
            assert v["window"] == pytest.approx(default_window(load_volume(path)))  # the report's window
        base, overlay = info["volumes"]
        assert base["cal_min"] == base["window"][0]
        lo, hi = overlay["window"]
        assert overlay["cal_min"] == pytest.approx(lo + OVERLAY_THRESHOLD * (hi - lo)) and overlay["cal_max"] == hi


@pytest.mark.parametrize(
    "path",
    [
        "/../pyproject.toml",
        "/static/../server.py",
        "/static/..%2Fserver.py",
        "/static/%2e%2e/__init__.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/volume/0/../../secret.txt",
        "/volume/0/..%2Fsecret.txt",
        "/volume/0/secret.txt",
        "/volume/2/hr.nii.gz",
        "/volume/0/",
        "/static/",
        "/static/index.html/..",
        "//etc/passwd",
        "/fallback/5.u8",
    ],
)
def test_nothing_but_the_given_files(files: dict[str, Path], path: str) -> None:
    with ViewerServer(files["hr"], [files["srr"]]) as server:
        status, body, _ = _get(server, path)
        assert status == 404, path
        assert b"not to be served" not in body and b"root:" not in body


def test_loopback_only_and_host_guard(files: dict[str, Path]) -> None:
    with ViewerServer(files["hr"]) as a, ViewerServer(files["hr"]) as b:
        assert a._httpd is not None and a._httpd.server_address[0] == LOOPBACK
        assert a.port != b.port  # port 0: a free port each
        assert _get(a, "/volumes.json", host="evil.example:80")[0] == 403
        assert _get(a, "/volumes.json", host=f"localhost:{a.port}")[0] == 200


def test_stop_closes_the_port(files: dict[str, Path]) -> None:
    server = ViewerServer(files["hr"]).start()
    port = server.port
    assert server.running
    server.stop()
    assert not server.running
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{LOOPBACK}:{port}/", timeout=2)
    server.stop()  # idempotent


def test_fallback_volume_is_world_aligned(files: dict[str, Path]) -> None:
    """The 2D page's data: RAS display grid, x fastest; the bright block lands at its world position."""
    with ViewerServer(files["hr"]) as server:
        info = json.loads(_get(server, "/volumes.json")[1])
        status, body, _ = _get(server, info["volumes"][0]["fallback"])
    g = info["grid"]
    nx, ny, nz = g["shape"]
    assert status == 200 and len(body) == nx * ny * nz
    data = np.frombuffer(body, np.uint8).reshape(nz, ny, nx)
    z, y, x = np.unravel_index(np.argmax(data), data.shape)
    world = np.array(g["lo_mm"]) + (np.array([x, y, z]) + 0.5) * g["pixel_mm"]
    assert np.abs(world - BRIGHT_MM).max() <= 2.0 + g["pixel_mm"]  # within the block's half-width + a pixel
    assert data.max() == 255 and np.median(data) < 128


def test_bad_inputs_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SlicefieldError, match="NIfTI volumes only"):
        ViewerServer(files["secret"])
    with pytest.raises(SlicefieldError, match="no such file"):
        ViewerServer(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(SlicefieldError, match="not a readable NIfTI"):
        ViewerServer(bad)
    with pytest.raises(SlicefieldError, match="opacity"):
        ViewerServer(files["hr"], config=ViewerConfig(overlay_opacity=2.0))


def test_bundled_niivue_matches_its_record() -> None:
    record = json.loads((STATIC_DIR / "niivue.json").read_text())
    data = (STATIC_DIR / "niivue.umd.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert record["package"] == "@niivue/niivue" and record["license"] == "BSD-2-Clause"
    assert "BSD 2-Clause" in (STATIC_DIR / record["license_file"]).read_text()


def test_cli_view_timeout(files: dict[str, Path], capsys) -> None:
    start = time.monotonic()
    assert main(["view", str(files["hr"]), "--overlay", str(files["srr"]), "--no-browser", "--timeout", "0.3"]) == 0
    assert time.monotonic() - start < 5
    assert f"http://{LOOPBACK}:" in capsys.readouterr().out
    assert main(["-q", "view", str(files["secret"]), "--no-browser", "--timeout", "1"]) == 2


def test_cli_view_serves_until_ctrl_c(files: dict[str, Path]) -> None:
    """A real process: prints its address, serves, and exits 0 on SIGINT (Ctrl-C)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "slicefield.cli", "view", str(files["hr"]), "--no-browser", "--timeout", "60"]
    # As from a terminal: SIGINT at its default disposition in the child. A parent started in the background by a
    # non-interactive shell ignores SIGINT, children inherit that, and Python then leaves Ctrl-C ignored.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = proc.stdout.readline()
        url = line.split()[2]
        with urllib.request.urlopen(url + "volumes.json", timeout=10) as resp:
            assert json.loads(resp.read())["volumes"][0]["name"] == "hr.nii.gz"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = f"no exit 10 s after SIGINT; stderr: {proc.communicate()[1][-2000:]}"
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
