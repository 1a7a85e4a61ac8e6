"""A self-contained HTML report of a run directory: the metrics table and every figure, embedded (no network)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .benchmark import COLUMNS
from .io.atomic import atomic_write

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
    "code{background:#f4f4f4;padding:1px 4px}"
)


def _table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for r in rows:
        cells = ["-" if r.get(k) is None else f.format(r[k]) for k, _, f in COLUMNS]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


#: What the metrics table shows, unless a run says otherwise.
DEFAULT_CAPTION = (
    "PSNR/SSIM/NRMSE against the known reference; <em>brain</em> = inside the reference's automatic "
    "foreground mask; data range = reference max - min. Wall seconds and peak resident memory per method."
)


def write_report(
    run_dir: str | Path, path: str | Path | None = None, *, title: str = "slicefield run", caption: str | None = None
) -> Path:
    """Write ``report.html`` (or ``path``) for a run directory; reads only files inside the run directory.

    caption: HTML explaining the metrics table (default DEFAULT_CAPTION, for runs scored against a reference)."""
    run = Path(run_dir)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_STYLE}</style>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    if config.get("command"):
        parts.append(f"<p>Command: <code>{html.escape(' '.join(config['command']))}</code></p>")
    if metrics.get("rows"):
        parts.append("<h2>Metrics</h2>" + _table(metrics["rows"]))
        parts.append(f"<p>{DEFAULT_CAPTION if caption is None else caption}</p>")
    for png in sorted((run / "figures").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(
            f"<h2>{html.escape(png.stem.replace('_', ' '))}</h2><img alt='{png.stem}' "
            f"src='data:image/png;base64,{data}'>"
        )
    out = Path(path) if path is not None else run / "report.html"
    text = "\n".join(parts)
    atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    return out
