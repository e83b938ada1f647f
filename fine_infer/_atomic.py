"""Crash-safe file writes: write beside the target, fsync, rename. A failure leaves the old file intact.

A writer's temp file (or a bundle's temp folder) is named ``.NAME.<pid>.<host>.<rand><suffix>`` beside its
destination ``NAME``: a kill at the wrong moment leaves it behind, and :func:`remove_stale_temps` (one destination) or
:func:`remove_stale_temps_in` (every name in a folder) remove those left by writers that no longer run. A temp is
removed only when its writer is known dead: it was written on this host (``<host>``, a hash of the host name) and its
pid is not alive, or the pid is this process's own but the temp is not one this process is writing (a restarted
container often reuses the killed server's pid). A temp of another host, of a live process, or of a name this scheme
did not make is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import BinaryIO, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = _current_umask()
FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK
TMP = ".tmp"

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<host>[0-9a-f]{8})\.[0-9a-f]{8}(?P<suffix>\.[a-z]+)$")
_IN_FLIGHT: set[str] = set()  # names of the temps this process is writing now (never stale, whatever its pid)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` (a file name, no folder) has the form of a writer's temp (``.NAME.<pid>.<host>.<rand>.tmp``)."""
    return _TEMP.match(name) is not None


def temp_name(name: str, suffix: str = TMP, pid: int | None = None) -> str:
    """A fresh temp name for destination ``name``: ``.NAME.<pid>.<host>.<rand><suffix>`` (``pid`` default: ours)."""
    return f".{name}.{os.getpid() if pid is None else pid}.{_HOST}.{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def in_flight(path: Path) -> Iterator[Path]:
    """Mark ``path`` (a temp this process creates) as being written, so no sweep of this process removes it."""
    key = Path(path).name  # unique: 32 random bits; a name, so any spelling of the folder matches
    _IN_FLIGHT.add(key)
    try:
        yield path
    finally:
        _IN_FLIGHT.discard(key)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id we could judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _stale(entry: Path, name: str | None, suffixes: tuple[str, ...]) -> bool:
    m = _TEMP.match(entry.name)
    if m is None or m["suffix"] not in suffixes or m["host"] != _HOST or (name is not None and m["name"] != name):
        return False
    pid = int(m["pid"])
    if pid == os.getpid():
        return entry.name not in _IN_FLIGHT
    return not _pid_alive(pid)


def _sweep(folder: Path, name: str | None, suffixes: tuple[str, ...]) -> list[Path]:
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not _stale(entry, name, suffixes):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def remove_stale_temps(path: str | Path, suffixes: tuple[str, ...] = (TMP,)) -> list[Path]:
    """Remove the temps of destination ``path`` (``.NAME.<pid>.<host>.<rand><suffix>`` beside it) that writers which
    no longer run left behind; returns what was removed. Call it before writing ``path`` again."""
    path = Path(path)
    return _sweep(path.parent, path.name, tuple(suffixes))


def remove_stale_temps_in(folder: str | Path, suffixes: tuple[str, ...] = (TMP,)) -> list[Path]:
    """Like :func:`remove_stale_temps` for the temps of every name in ``folder`` (not below it)."""
    return _sweep(Path(folder), None, tuple(suffixes))


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file in ``path``'s folder for binary writing; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is untouched. A kill leaves the temp file behind:
    :func:`remove_stale_temps` removes it later. A ``path`` that is a symlink is replaced by the file (never written
    through); one that is a folder, device, pipe or socket is refused (:class:`OSError`), as is a parent that is a
    file."""
    path = Path(path)
    _check_destination(path)
    tmp = path.parent / temp_name(path.name)
    with in_flight(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _check_destination(path: Path) -> None:
    """Refuse to rename over anything but a regular file or a link, and create the parent folders."""
    if not path.is_symlink() and path.exists() and not path.is_file():
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file (a folder, device or pipe); "
                              "write to a file path instead", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(errno.ENOTDIR, "is not a folder: a file of that name is in the way",
                                 str(next(p for p in path.parents if p.exists() and not p.is_dir()))) from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
