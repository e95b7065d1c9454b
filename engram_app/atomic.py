"""Writing files and folders so that a crash leaves the old one or the new one, never half of either.

Everything the app writes that a reader may open at any moment (a pack version, a checkpoint, the
converted model, an export, the worker's status file) is written beside its target under a name
of its own, then renamed into place: a rename within a folder is atomic on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move the finished folder ``tmp`` to ``folder`` by renames, replacing what was there.

    At every moment ``folder`` is either the old complete folder, absent (between two renames,
    with the old one kept beside it as ``.<name>.old``), or the new complete folder.
    """
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


@contextlib.contextmanager
def new_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``folder`` to fill; on success it replaces ``folder``, on any
    error (or interrupt) it is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def new_file(path: str | Path) -> Iterator[Path]:
    """Yield a path beside ``path`` to write; on success it replaces ``path``, on any error it is removed.

    Each call gets a name of its own, so two writers of the same file never write into each other's.
    The file is private to the user (0600, as ``mkstemp`` makes it): the data root holds their own text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with new_file(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))

