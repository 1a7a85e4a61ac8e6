"""``slicefield view``: a browser viewer for NIfTI volumes on 127.0.0.1 (NiiVue, bundled as a static asset).

The page shows the volume(s) in three planes plus a 3D render, with overlays and synced crosshairs; a plain
2D-canvas page stands in where WebGL2 is missing. See :mod:`slicefield.viewer.server` for what is served.
"""

from .server import LOOPBACK, ViewerConfig, ViewerServer, serve

__all__ = ["LOOPBACK", "ViewerConfig", "ViewerServer", "serve"]
