"""Atomic file writing: a temporary file in the same folder, fsync, then rename.

A crash at any moment leaves either the previous file or the new one whole, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, IO, Iterator


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path``; on clean exit fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def non_folder_on_path(folder) -> "Path | None":
    """The first of ``folder`` and its parents that exists but is not a folder (a file where an
    output folder must go), or None when ``folder`` can be created or used."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            return None if part.is_dir() else part
    return None


def atomic_write(path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call ``write(file_object)`` on a temporary file and atomically move it to ``path``."""
    with atomic_open(path, mode) as f:
        write(f)


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
