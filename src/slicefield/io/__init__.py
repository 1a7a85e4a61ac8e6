"""Reading and writing stacks and volumes: NIfTI (nibabel), DICOM series (pydicom), image folders; input checks.

Every coordinate is world mm RAS (see :mod:`slicefield.geometry`); DICOM LPS is converted on reading.
"""

from .atomic import atomic_path, atomic_write, check_output_path
from .checks import check_inputs, check_overlap, check_stack
from .dicom import load_dicom_series
from .images import load_image_folder
from .nifti import load_stack, load_volume, save_stack, save_volume, sidecar_path

__all__ = [
    "atomic_path",
    "atomic_write",
    "check_inputs",
    "check_output_path",
    "check_overlap",
    "check_stack",
    "load_dicom_series",
    "load_image_folder",
    "load_stack",
    "load_volume",
    "save_stack",
    "save_volume",
    "sidecar_path",
]
