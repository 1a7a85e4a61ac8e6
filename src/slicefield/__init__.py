"""slicefield: 3D reconstruction of brain MRI from 2D slice stacks."""

from .errors import SlicefieldError
from .volume import Stack, Volume

__version__ = "0.1.0"
__all__ = ["SlicefieldError", "Stack", "Volume", "__version__"]
