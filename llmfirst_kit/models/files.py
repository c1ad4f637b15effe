"""Model files on disk: the cache directory, files inside installed packages, sha256 verified once,
chunked files assembled once (safely when several threads or processes ask for the same file at once).

The chunk packages are never imported: their files are found through ``importlib.metadata``. A file's
sha256 is verified once; the verdict is cached beside it (keyed by size and mtime) so later loads skip the
hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from .._fs import atomic_write, cache_dir, file_lock
from ..errors import ModelFileError


def package_file(dist_name: str, version: str, rel: str) -> Path:
    reinstall = f"pip install --force-reinstall '{dist_name}=={version}'"
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ModelFileError(f"package {dist_name} is not installed; run: {reinstall}") from None
    if dist.version != version:
        raise ModelFileError(f"package {dist_name} is version {dist.version}, the registry pins {version}; "
                             f"run: {reinstall}")
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise ModelFileError(f"file {rel} is missing from package {dist_name}; run: {reinstall}")
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verified" / f"{path.name}.{key}.json"


def cached_sha256(path: Path, *, compute: bool = True) -> str | None:
    """sha256 of a file, hashed once and remembered while the file's size and mtime stay the same."""
    st = path.stat()
    marker = _marker(path)
    try:
        data = json.loads(marker.read_text())
        if data["size"] == st.st_size and data["mtime_ns"] == st.st_mtime_ns:
            return data["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    if not compute:
        return None
    digest = sha256_of(path)
    atomic_write(marker, json.dumps({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                     "path": str(path)}))
    return digest


def forget_verdict(path: Path) -> None:
    _marker(path).unlink(missing_ok=True)


def assembled_path(file_name: str) -> Path:
    return cache_dir() / "models" / file_name


def assemble(file_name: str, size: int, parts: list[Path]) -> Path:
    """Concatenate ``parts`` into the cache once. Safe under concurrency: the first caller builds under a
    lock into a uniquely named temporary file and renames it into place; callers that waited find it built."""
    target = assembled_path(file_name)
    if target.is_file() and target.stat().st_size == size:
        return target
    with file_lock(cache_dir() / "locks" / f"{file_name}.lock"):
        if target.is_file() and target.stat().st_size == size:
            return target  # another thread or process built it while we waited
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            os.replace(tmp, target)  # atomic: a crash never leaves a half-written model under the final name
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # e.g. disk full: don't leave hundreds of MB behind
            raise
    return target
