"""SHA-256 digests of files and bytes: the one helper every checked file (weights, model files, export
folders, downloads, calibration images) is hashed with."""

from __future__ import annotations

import hashlib
import os
import re
from typing import Union

BLOCK = 1 << 20  # read 1 MiB at a time: any file size in constant memory
# A model file's header and an export's padim.json carry their own checksum: "sha256:<hex>" of their
# bytes with those 64 digits read as "0" (written as CHECKSUM_PLACEHOLDER, then filled in).
CHECKSUM_PREFIX = "sha256:"
CHECKSUM_PLACEHOLDER = CHECKSUM_PREFIX + "0" * 64
CHECKSUM_RE = re.compile(r"sha256:[0-9a-f]{64}")


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


def checksum_of(data, stored: str, within: Union[int, None] = None) -> str:
    """The checksum field ``data`` should carry: "sha256:<hex>" of ``data`` with ``stored``'s 64 digits
    (the last place they occur in ``data[:within]``, the header) read as "0". The one check of model
    files and export folders alike."""
    view = memoryview(data)
    where = bytes(view[:within] if within is not None else view).rfind(stored.encode())
    digest = hashlib.sha256()
    if where < 0:
        digest.update(view)
    else:
        start = where + len(CHECKSUM_PREFIX)
        digest.update(view[:start])
        digest.update(b"0" * 64)
        digest.update(view[start + 64 :])
    return CHECKSUM_PREFIX + digest.hexdigest()
