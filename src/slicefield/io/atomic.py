"""Atomic file output: write to a temporary file beside the target, rename it on success.

A crash or an exception while writing never leaves a partial output file: the temporary file is removed
and the target (if it existed) is left as it was.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SlicefieldError

#: errno values of write failures the user can fix (permissions, read-only or full disk).
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _check_target(path: Path) -> None:
    parent = path.parent
    if not parent.exists():
        raise SlicefieldError(
            f"output folder {str(parent)!r} does not exist", path=path, fix="create it first or choose another path"
        )
    if not parent.is_dir():
        raise SlicefieldError(f"{str(parent)!r} is not a folder", path=path, fix="choose another output path")
    if path.is_dir():
        raise SlicefieldError("is a folder, not a file", path=path, fix="give an output file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SlicefieldError(
            f"output folder {str(parent)!r} is not writable",
            path=path,
            fix="choose another output folder or fix its permissions",
        )


def check_output_path(path: str | Path) -> Path:
    """Raise a one-line SlicefieldError now if ``path`` cannot be written (missing or read-only folder, a folder).

    Call it before long work, so a bad ``-o`` fails in a second instead of after the reconstruction.
    """
    target = Path(path)
    _check_target(target)
    return target


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only if the block succeeds.

    The temporary name ends with the target's full name (``.tmp-<hex>-brain.nii.gz``), so suffixes such as
    ``.nii.gz`` that select the format (and gzip compression in nibabel) are kept. On any exception the
    temporary file is removed and the exception propagates; permission and disk-full errors become a
    :class:`SlicefieldError` naming the target.
    """
    target = Path(path)
    _check_target(target)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}-{target.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"atomic write to {target} produced no file")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in _USER_ERRNOS:
            raise SlicefieldError(
                f"cannot write ({e.strerror})", path=target, fix="check the folder's permissions and free space"
            ) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write_fn: Callable[[Path], object]) -> Path:
    """Call ``write_fn(tmp_path)`` and rename the result onto ``path`` only on success; returns ``path``.

    See :func:`atomic_path`. Example: ``atomic_write("out.nii.gz", lambda p: nib.save(img, p))``.
    """
    with atomic_path(path) as tmp:
        write_fn(tmp)
    return Path(path)
