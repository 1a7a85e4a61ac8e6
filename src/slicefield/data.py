"""Real brain data that ships inside installed pip packages (no download at run time)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import SlicefieldError

#: nilearn's MNI152 2009a T1 template, 1 mm, skull-stripped (an average of many subjects).
MNI152_T1 = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def packaged_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package."""
    try:
        path = Path(str(resources.files(package).joinpath(relative)))
    except ModuleNotFoundError as e:
        raise SlicefieldError(f"package {package!r} is not installed", fix=f"pip install {package}") from e
    if not path.is_file():
        raise SlicefieldError(f"{relative} is missing from the installed {package}", fix=f"reinstall {package}")
    return path


def mni152_t1_path() -> Path:
    """The MNI152 T1 1 mm template shipped in nilearn's wheel."""
    return packaged_file(*MNI152_T1)
