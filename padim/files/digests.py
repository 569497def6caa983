"""SHA-256 digests of files and bytes: the one helper every checked file (weights, model files, export
folders, downloads, calibration images) is hashed with."""

from __future__ import annotations

import hashlib
import os
from typing import Union

BLOCK = 1 << 20  # read 1 MiB at a time: any file size in constant memory


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks. Raises OSError (``paths.NotRegularFile`` for a
    FIFO or a device: never opened in a way that blocks)."""
    from padim.files.paths import open_regular

    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """The hex SHA-256 of bytes already in memory (a model file read once: hashed and loaded from the
    same bytes)."""
    return hashlib.sha256(data).hexdigest()
