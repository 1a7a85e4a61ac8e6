"""Views of a head: cameras on an orbit, DRR / MIP / emission rendering, and a volume fitted to sparse views.

Pipeline: :mod:`.cameras` (orbits, intrinsics, extrinsics in world mm RAS) -> :mod:`.render` (ray marching a
Volume or any field) -> :mod:`.io` (views folder: PNG, float arrays, cameras.json, turntable GIF) ->
:mod:`.projector` (sparse and matrix-free line-integral operators) -> :mod:`.fit` (CGLS/SIRT start, FISTA with
x >= 0, carving and TV; held-out views; export on the subject's grid) -> :mod:`.pipeline` (the CLI's commands as
library calls); :mod:`.checks` catches wrong geometry first; :mod:`slicefield.fid` scores view sets.
"""

from .cameras import Camera, OrbitConfig, orbit
from .checks import check_cameras, check_volume_units
from .fit import ViewFit, ViewFitConfig, fit_views
from .io import Views, read_views, write_views
from .render import RenderConfig, model_field, render_field, render_volume

__all__ = [
    "Camera",
    "OrbitConfig",
    "RenderConfig",
    "ViewFit",
    "ViewFitConfig",
    "Views",
    "check_cameras",
    "check_volume_units",
    "fit_views",
    "model_field",
    "orbit",
    "read_views",
    "render_field",
    "render_volume",
    "write_views",
]
