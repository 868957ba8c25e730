"""SHA-256 of files: the one reader of a file's digest (checkpoint hash names, cache shard
checksums, the checkpoints a run starts from)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """The hexadecimal SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | Path) -> str:
    """:func:`file_sha256`, remembered per (path, size, modification time) within the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = file_sha256(path)
    return _FILE_DIGESTS[key]
