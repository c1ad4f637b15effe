"""File-system helpers with one copy each: atomic writes, cross-process locks, UTC timestamps, the cache directory."""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .settings import settings


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one: a
    uniquely named temporary file in the same directory (so two writers never share one), fsync'ed, then
    renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes and threads (``flock`` on a file opened per call,
    so two threads of one process exclude each other too). Blocks until it is free. The lock file stays:
    removing it would let a third caller lock a new file while the second still holds the old one."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cache_dir() -> Path:
    """The kit's cache (``$LLMFIRST_CACHE``, default ``~/.cache/llmfirst_kit``): model files, engine verdicts,
    calibration priors."""
    root = settings().cache.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
