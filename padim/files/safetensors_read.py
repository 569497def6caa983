"""Reading a safetensors file once into memory, its header checked before anything else is read.

``read_file`` reads a model (or statistics) file into a ``ModelBytes``: the whole file, in memory, with
its (device, inode, size, mtime) signature; ``read_header`` checks a header (from a file, reading
only the header, or from those bytes): every tensor's dtype, shape and byte range agree and exactly
tile the rest of the file, so a damaged or hostile header can never make padim allocate more than
the file holds; ``tensors_of`` then makes the tensors from the bytes. Nothing keeps the file open
or mapped: once read, writing, replacing or truncating the file changes nothing that was loaded
from it (a memory-mapped file changes under a loaded model, and a truncated one kills the process
with SIGBUS). ``padim.files.safetensors_io`` is the checked reader built on this.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch

from padim.errors import ModelFileError
from padim.files.paths import NotRegularFile, not_regular, open_regular

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit

# safetensors dtype names <-> torch dtypes (those padim writes, and a few it may meet)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class ModelBytes(os.PathLike):
    """A model file's bytes, read into memory once (``read_file``): what a loaded model is built from
    and what its ``sha256`` is of, so a model never changes under the SHA-256 it was loaded as, and a
    file written or truncated afterwards changes nothing that was loaded from it.

    Path-like (its file's path, for messages): every loader that takes a model file's path takes it
    and reads these bytes instead of the file (``load``, ``read_header``, ``read_metadata``, so
    ``padim.files.modelfile.read`` and ``PaDiM.load``). data: the whole file (bytearray);
    signature: the file's (device, inode, size, mtime in ns) when it was read."""

    def __init__(self, path, data: bytearray, signature: tuple):
        self.path, self.data, self.signature = Path(path), data, signature

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"ModelBytes({str(self.path)!r}, {len(self.data)} bytes)"

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 (hex) of the bytes: what ``sha256sum`` printed for the file when it was read."""
        return hashlib.sha256(self.data).hexdigest()


def _signature(stat: os.stat_result) -> tuple:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read_file(path) -> ModelBytes:
    """Reads a model file into memory, once (a ``ModelBytes`` is returned as it is).

    The path must be a regular file (a FIFO, a device or a folder is refused in one line saying what
    it is, never opened); its header is checked against its size before the rest is read (so a
    file that is not a model is refused before it is read into memory), and a file whose size or
    modification time changes while it is read is refused ("still being written?")."""
    if isinstance(path, ModelBytes):
        return path
    path = Path(path)
    with _opened(path) as handle:
        before = os.fstat(handle.fileno())
        _header_from(handle.read(8), handle.read, before.st_size, path)  # before the bytes are read
        data = bytearray(before.st_size)
        handle.seek(0)
        view, done = memoryview(data), 0
        while done < len(data):
            got = handle.readinto(view[done:])
            if not got:
                break
            done += got
        extra = handle.read(1)
        after = os.fstat(handle.fileno())
    if done != len(data) or extra or _signature(after) != _signature(before):
        raise ModelFileError(f"model file {path} changed while it was read (still being written?)")
    return ModelBytes(path, data, _signature(before))


def read_header(path) -> Tuple[dict, int]:
    """The safetensors header of ``path`` (a path or ``ModelBytes``) and its length in bytes, after
    checking that every tensor's dtype, shape and byte range agree and exactly tile the rest of the
    file. From a path, reads only the header."""
    if isinstance(path, ModelBytes):
        data = memoryview(path.data)
        return _header_from(bytes(data[:8]), lambda n: bytes(data[8 : 8 + n]), len(data), path.path)
    path = Path(path)
    with _opened(path) as handle:
        return _header_from(handle.read(8), handle.read, os.fstat(handle.fileno()).st_size, path)


@contextlib.contextmanager
def _opened(path: Path):
    """``path`` open for reading as a model file: anything but a regular file (never opened), or a
    read error while it is open, is a one-line ModelFileError saying which."""
    why = not_regular(path)
    if why is not None:
        raise ModelFileError(f"model file {path} {why}")
    try:
        with open_regular(path) as handle:
            yield handle
    except NotRegularFile as exc:
        raise ModelFileError(f"model file {path} {exc}") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _header_from(head: bytes, read: Callable[[int], bytes], size: int, path: Path) -> Tuple[dict, int]:
    """The header checks of ``read_header``: ``head`` the file's first 8 bytes, ``read(n)`` the next n,
    ``size`` the file's size."""
    corrupted = f"model file {path} is truncated, corrupted or not a safetensors file"
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
        raise ModelFileError(f"{corrupted} (header length {n} does not fit a {size}-byte file)")
    try:
        header = json.loads(read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{corrupted} (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{corrupted} (its header is not a JSON object)")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ModelFileError(f"{corrupted} (its metadata is not a map of strings)")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(f"{corrupted} (tensor {name!r} has a malformed entry)")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (entry["dtype"] not in DTYPES or not isinstance(shape, list) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(_is_count(v) for v in shape + offsets)):
            raise ModelFileError(f"{corrupted} (tensor {name!r} has a bad dtype, shape or offsets)")
        nbytes = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ModelFileError(f"{corrupted} (tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes)")
        ranges.append(tuple(offsets))
    position = 0
    for start, stop in sorted(ranges):
        if start != position:
            raise ModelFileError(f"{corrupted} (tensor byte ranges overlap or leave gaps)")
        position = stop
    if 8 + n + position != size:
        raise ModelFileError(f"{corrupted} (its tensors need {8 + n + position} bytes, the file has {size})")
    return header, n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 50)


def tensors_of(data: bytearray, header: dict, header_bytes: int) -> Dict[str, torch.Tensor]:
    """The tensors of a checked header, as views of ``data`` (a tensor whose bytes are not aligned
    to its element size is copied): nothing is read from the file again."""
    raw = torch.frombuffer(data, dtype=torch.uint8)  # (file size,), shares data's memory
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, (start, stop) = DTYPES[entry["dtype"]], entry["data_offsets"]
        begin = 8 + header_bytes + start
        if stop == start:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        piece = raw[begin : 8 + header_bytes + stop]
        if begin % dtype.itemsize:
            piece = piece.clone()
        tensors[name] = piece.view(dtype).reshape(entry["shape"])
    return tensors
