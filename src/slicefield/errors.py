"""User-facing errors: one line that names the file, the problem and the fix."""

from __future__ import annotations

from pathlib import Path


class SlicefieldError(Exception):
    """An error caused by the user's input or environment, reported as one line.

    The CLI prints ``str(error)`` on stderr and exits with status 2; library callers
    can catch it like any exception.
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        parts = [f"{self.path}: {problem}" if self.path else problem]
        if fix:
            parts.append(fix)
        super().__init__("; ".join(parts))
