"""Atomic file writes: a crash mid-write leaves the previous file, never a truncated one.
Cache locks: two jobs of a sweep that need the same cache entry compute it once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from filelock import FileLock, Timeout

log = logging.getLogger("dpgen")


def _umask() -> int:
    # Reading the umask means setting it for a moment, which a thread creating a file at that
    # moment would see; on Linux the kernel reports it without that.
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(fileobj)`` to a temporary file beside ``path`` (the same filesystem,
    so the rename is atomic), fsync, rename, fsync the directory: readers see the old file or the
    new one, never half, and after a power loss the rename has not rolled back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _unfinished_writes(directory: Path, name: str = "*", recursive: bool = False) -> list[Path]:
    pattern = f".{name}.*.tmp"  # atomic_write's temporary names
    return sorted(directory.rglob(pattern) if recursive else directory.glob(pattern))


def remove_unfinished_writes(directory: str | os.PathLike, started_before: float) -> int:
    """Delete what killed writers left below ``directory``: :func:`atomic_write` temporaries (a
    partial checkpoint can be as large as the model) that were never renamed. Only those older
    than ``started_before`` (this attempt's start), so a write in progress by another rank of
    this attempt is never touched. Returns how many were removed."""
    stale = [p for p in _unfinished_writes(Path(directory), recursive=True) if p.stat().st_mtime < started_before]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the directory's entries (a rename, a new file) survive a power loss."""
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


@contextmanager
def cache_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``<path>.lock`` around "reuse the entry, else compute and save it atomically".

    A second job that wants the same entry waits here and then finds it saved, so a sweep
    computes each entry once. The lock is an OS file lock (released if the holder dies); the
    ``.lock`` file itself stays behind, empty and harmless.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for another job that is computing %s", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def build_once(path: str | os.PathLike, what: str, description: str, build: Callable[[], None]) -> None:
    """Reuse the cache entry ``path`` or, if no job has saved it yet, ``build()`` it (which
    saves it atomically), under :func:`cache_lock` so that a sweep builds each entry once."""
    with cache_lock(path, what):
        for stale in _unfinished_writes(Path(path).parent, Path(path).name):
            stale.unlink(missing_ok=True)  # under the entry's lock: no one else is writing it
        if Path(path).exists():
            log.info("%s: reusing cached %s %s", what, description, path)
            return
        build()
