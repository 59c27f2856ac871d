"""Output folders the user names (`--out`, `--report`, `--export`, ...), checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from conceptkit.errors import UsageError


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where a new folder would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: Path | str, option: str) -> Path:
    """The folder exists or can be created, and can be written: a bad one is refused before the work.

    Nothing is created here. The nearest existing folder on the path must be writable by this user
    and not on a read-only file system.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; choose a folder")
    probe = nearest_existing(path)
    if not probe.is_dir():
        raise UsageError(f"{option} {path}: {probe} is a file, so the folder cannot be created; choose another folder")
    read_only_fs = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only_fs or not os.access(probe, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if read_only_fs else "is not writable by you"
        raise UsageError(f"{option} {path}: folder {probe} {why}; choose another folder")
    return path
