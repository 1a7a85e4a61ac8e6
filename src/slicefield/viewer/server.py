"""A loopback-only HTTP server for the viewer page: the page, its bundled scripts and the given volumes, nothing else.

Every URL it answers is fixed when the server is built (a dict from path to content); a request for any other path
gets 404, and no part of a request path is ever joined to a folder, so nothing outside the given files can be
read (``..``, encoded or not, only ever misses the dict). It binds to 127.0.0.1 only and answers only requests whose
``Host`` is that address or ``localhost`` on its port (a DNS-rebinding guard). It runs ``http.server`` in a
background thread; :meth:`ViewerServer.stop` shuts it down and closes the socket.

Routes::

    /                         the page (static/index.html)
    /volumes.json             the layers: name, url, colormap, opacity, and the fallback page's display grid
    /static/<file>            niivue.umd.js, viewer.js, fallback.js, viewer.css
    /volume/<k>/<file name>   layer k's NIfTI file, unchanged (NiiVue reads it)
    /fallback/<k>.u8          layer k resampled on the base layer's RAS display grid, uint8, x fastest
                              (for the 2D-canvas page when WebGL is missing; made on first request)
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import SlicefieldError

log = logging.getLogger(__name__)

#: The only address the server listens on.
LOOPBACK = "127.0.0.1"
#: The page's files, shipped as package data.
STATIC_DIR = Path(__file__).parent / "static"
#: Files under /static/ (name -> content type).
STATIC_FILES = {
    "niivue.umd.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "fallback.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
#: Fallback page: most display voxels along one world axis (uint8 volume of at most 192^3 = 7 MB per layer).
FALLBACK_MAX_VOXELS = 192
#: NIfTI file name endings the viewer accepts.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Overlays are transparent below this fraction of their grey-level window (so background noise is not painted).
OVERLAY_THRESHOLD = 0.1
#: Colormaps offered for overlays (NiiVue names; the fallback page tints with the same hue).
OVERLAY_COLORMAPS = ("warm", "red", "green", "blue", "gray")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ViewerConfig:
    """Options of :class:`ViewerServer` and :func:`serve`."""

    port: int = 0
    """TCP port on 127.0.0.1; 0 lets the system pick a free one."""
    overlay_colormap: str = "warm"
    """Colormap of overlays: one of OVERLAY_COLORMAPS."""
    overlay_opacity: float = 0.5
    """Initial opacity of overlays in [0, 1] (a slider on the page changes it)."""
    layout: Literal["overlay", "side"] = "overlay"
    """overlay: one view, overlays blended on the base; side: a view per volume, crosshairs synced."""


@dataclass(frozen=True)
class _Layer:
    path: Path
    name: str
    url: str
    colormap: str
    opacity: float


def _check_nifti(path: Path) -> Path:
    if not path.is_file():
        raise SlicefieldError("no such file", path=path, fix="check the path")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise SlicefieldError("the viewer shows NIfTI volumes only", path=path, fix="pass a .nii or .nii.gz file")
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for a bad file
        raise SlicefieldError(f"not a readable NIfTI file ({e})", path=path, fix="check the file") from e
    if len(img.shape) < 3:
        raise SlicefieldError(f"not a 3D volume (shape {img.shape})", path=path, fix="pass a 3D NIfTI volume")
    return path


class ViewerServer:
    """Serve the viewer page for ``base`` (and ``overlays``) on 127.0.0.1; ``with ViewerServer(...) as s:``
    starts it and stops it. ``s.url`` is the page's address."""

    def __init__(
        self, base: str | Path, overlays: Sequence[str | Path] = (), *, config: ViewerConfig = ViewerConfig()
    ) -> None:
        if config.overlay_colormap not in OVERLAY_COLORMAPS:
            raise SlicefieldError(
                f"unknown overlay colormap {config.overlay_colormap!r}",
                fix=f"use one of {', '.join(OVERLAY_COLORMAPS)}",
            )
        if not 0.0 <= config.overlay_opacity <= 1.0:
            raise SlicefieldError(f"overlay opacity must be in [0, 1], got {config.overlay_opacity}", fix="e.g. 0.5")
        if config.layout not in ("overlay", "side"):
            raise SlicefieldError(f"unknown layout {config.layout!r}", fix="use overlay or side")
        if not 0 <= config.port <= 65535:
            raise SlicefieldError(f"port must be in 0..65535, got {config.port}", fix="pass --port 0 for a free one")
        paths = [_check_nifti(Path(p)) for p in (base, *overlays)]
        self.config = config
        self.layers = [
            _Layer(
                path=p,
                name=p.name,
                url=f"/volume/{k}/{urllib.parse.quote(p.name)}",
                colormap="gray" if k == 0 else config.overlay_colormap,
                opacity=1.0 if k == 0 else config.overlay_opacity,
            )
            for k, p in enumerate(paths)
        ]
        self._fallback: dict[int, bytes] = {}
        self._windows: dict[int, tuple[float, float]] = {}
        self._lock = threading.RLock()
        self._grid: Any = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.routes = self._routes()

    # ------------------------------------------------------------------------------------------- content
    def _routes(self) -> dict[str, Callable[[], tuple[bytes | Path, str]]]:
        """Every path the server answers (already URL-decoded), and how to make its content."""
        routes: dict[str, Callable[[], tuple[bytes | Path, str]]] = {
            "/": lambda: (STATIC_DIR / "index.html", "text/html; charset=utf-8"),
            "/index.html": lambda: (STATIC_DIR / "index.html", "text/html; charset=utf-8"),
            "/volumes.json": lambda: (json.dumps(self.describe()).encode(), "application/json"),
        }
        for name, ctype in STATIC_FILES.items():
            routes[f"/static/{name}"] = lambda name=name, ctype=ctype: (STATIC_DIR / name, ctype)
        for k, layer in enumerate(self.layers):
            routes[urllib.parse.unquote(layer.url)] = lambda layer=layer: (layer.path, "application/octet-stream")
            routes[f"/fallback/{k}.u8"] = lambda k=k: (self.fallback_data(k), "application/octet-stream")
        return routes

    def display_grid(self):
        """The fallback page's RAS display grid: covering the base volume, at most FALLBACK_MAX_VOXELS per axis."""
        if self._grid is None:
            import nibabel as nib

            from ..figures import DisplayGrid

            img = nib.load(str(self.layers[0].path))  # the header only: shape and affine
            shape, affine = img.shape[:3], img.affine
            grid = DisplayGrid.covering_grid(shape, affine)
            pixel = max(grid.pixel_mm, float(grid.extent_mm.max()) / FALLBACK_MAX_VOXELS)
            self._grid = DisplayGrid.covering_grid(shape, affine, pixel_mm=pixel)
        return self._grid

    def window(self, k: int) -> tuple[float, float]:
        """Grey-level window ``(low, high)`` of layer ``k``: the report's (figures.default_window), read once."""
        with self._lock:
            if k not in self._windows:
                from ..figures import default_window
                from ..io import load_volume

                self._windows[k] = default_window(load_volume(self.layers[k].path))
            return self._windows[k]

    def _read_windows(self) -> None:
        try:
            for k in range(len(self.layers)):
                self.window(k)
        except (OSError, SlicefieldError, ValueError) as e:  # reported again when the page asks
            log.debug("view: reading windows failed: %s", e)

    def describe(self) -> dict[str, Any]:
        """What the page loads (served as /volumes.json). window: the grey-level window (the report's);
        cal_min/cal_max: the displayed range as an overlay (NiiVue's names): from OVERLAY_THRESHOLD of the window,
        below which an overlay is transparent (the base layer: its window)."""
        grid = self.display_grid()
        volumes = []
        for k, layer in enumerate(self.layers):
            lo, hi = self.window(k)
            threshold = 0.0 if k == 0 else OVERLAY_THRESHOLD
            volumes.append(
                {
                    "name": layer.name,
                    "url": layer.url,
                    "colormap": layer.colormap,
                    "opacity": layer.opacity,
                    "window": [lo, hi],
                    "cal_min": lo + threshold * (hi - lo),
                    "cal_max": hi,
                    "fallback": f"/fallback/{k}.u8",
                    "fallback_threshold": round(255 * threshold),
                }
            )
        return {
            "layout": self.config.layout,
            "volumes": volumes,
            "grid": {
                "shape": list(grid.shape),
                "lo_mm": [float(v) for v in grid.lo],
                "pixel_mm": grid.pixel_mm,
                "order": "x fastest, then y, then z (world RAS); values 0-255 = window 1st-99.5th percentile",
            },
        }

    def fallback_data(self, k: int) -> bytes:
        """Layer ``k`` linearly resampled on :meth:`display_grid`, windowed to uint8 (0 outside the volume)."""
        with self._lock:
            if k not in self._fallback:
                from ..figures import sample_world
                from ..io import load_volume

                grid = self.display_grid()
                volume = load_volume(self.layers[k].path)
                x, y, z = (grid.axis(a) for a in range(3))
                pts = np.stack(np.meshgrid(x, y, z, indexing="ij"), axis=-1)  # (nx, ny, nz, 3)
                values = sample_world(volume, pts)
                lo, hi = self.window(k)
                scaled = np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0) * 255.0
                self._fallback[k] = np.ascontiguousarray(scaled.round().astype(np.uint8).transpose(2, 1, 0)).tobytes()
            return self._fallback[k]

    # ------------------------------------------------------------------------------------------- serving
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the viewer server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def start(self) -> ViewerServer:
        """Bind 127.0.0.1:port and serve in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("the viewer server is already running")
        try:
            self._httpd = ThreadingHTTPServer((LOOPBACK, self.config.port), _handler(self))
        except OSError as e:
            raise SlicefieldError(
                f"cannot listen on {LOOPBACK}:{self.config.port} ({e.strerror})", fix="pass --port 0 for a free port"
            ) from e
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="slicefield-view", daemon=True
        )
        self._thread.start()
        # read the volumes' windows while the browser starts (the first /volumes.json waits for them)
        threading.Thread(target=self._read_windows, name="slicefield-view-windows", daemon=True).start()
        log.info("viewer serving %s on %s", ", ".join(layer.name for layer in self.layers), self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(server: ViewerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "slicefield-view"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            log.debug("view: %s - %s", self.address_string(), format % args)

        def _host_ok(self) -> bool:
            host = self.headers.get("Host")
            return host is None or host in (f"{LOOPBACK}:{server.port}", f"localhost:{server.port}")

        def _answer(self, *, body: bool) -> None:
            if not self._host_ok():
                self.send_error(HTTPStatus.FORBIDDEN, "unexpected Host header")
                return
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            make = server.routes.get(path)
            if make is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            try:
                content, ctype = make()
            except (OSError, SlicefieldError, ValueError) as e:
                log.warning("view: %s failed: %s", path, e)
                self.send_error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e).splitlines()[0])
                return
            size = content.stat().st_size if isinstance(content, Path) else len(content)
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if not body:
                return
            try:
                if isinstance(content, Path):
                    with content.open("rb") as f:
                        shutil.copyfileobj(f, self.wfile, _CHUNK)
                else:
                    self.wfile.write(content)
            except (BrokenPipeError, ConnectionResetError):
                log.debug("view: client closed the connection during %s", path)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

    return Handler


def serve(
    base: str | Path,
    overlays: Sequence[str | Path] = (),
    *,
    config: ViewerConfig = ViewerConfig(),
    open_browser: bool = True,
    timeout_s: float | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve the viewer until Ctrl-C (KeyboardInterrupt, caught: a normal stop) or ``timeout_s`` seconds.

    open_browser: open the page in the default browser; on_ready: called with the page's URL once serving."""
    import time
    import webbrowser

    server = ViewerServer(base, overlays, config=config)
    with server:
        if on_ready is not None:
            on_ready(server.url)
        if open_browser:
            webbrowser.open(server.url)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic())))
        except KeyboardInterrupt:
            log.info("viewer stopped")
