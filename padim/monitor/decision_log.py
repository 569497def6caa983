"""What the service decided, kept on disk: an append-only JSON-lines decision log, the flagged images
for review, and operator feedback (issue 23, "a decision log").

DecisionLog, why each detail:
- one ``os.write`` of the whole batch's complete lines on an ``O_APPEND`` descriptor, then ``fsync``:
  a batch is on disk when ``write`` returns, and a process killed between batches leaves whole lines;
- Linux still cuts a write short, at a page boundary, when a fatal signal (kill -9) arrives while it
  copies a batch spanning pages (tests/test_decision_log.py saw it happen): the newest file then ends
  in part of a line, of a batch ``write`` never acknowledged. Opening the log truncates that torn
  tail (as a database recovers its journal), so after a restart every line of every file is whole
  JSON; the torn batch's whole first lines stay (decisions made, though never acknowledged). A short
  write for another reason (disk full) is undone at once and raised as ``DecisionLogError``;
- rotation by size: ``decisions-00001.jsonl``, ``decisions-00002.jsonl``, ...; a file is never
  rewritten once the next exists. A batch larger than ``max_bytes`` goes whole into a file of its own;
- ``json.dumps(allow_nan=False)`` after non-finite floats became null: no line a strict parser refuses;
- one writing process per folder (an exclusive ``flock`` on ``.lock``, freed by the kernel when the
  process dies); a lock around each write for the threads of that process.

FlaggedStore keeps images flagged anomalous (their bytes and a JSON sidecar), at most ``max_bytes``
together, oldest dropped first; each file is written atomically (``padim.files.atomic``: temporary + rename),
the sidecar last, so an image without its sidecar is an item a kill interrupted and is removed.

Operators' verdicts are counted by ``padim.monitor.feedback.OverrideCounter``.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from padim.files.atomic import atomic_write, describe_os_error, is_stale
from padim.errors import PadimError

try:
    import fcntl
except ImportError:  # Windows: no flock; the single-writer rule is then the user's
    fcntl = None

DEFAULT_MAX_BYTES = 64 * 2 ** 20
_LOG_NAME = re.compile(r"^decisions-(\d{5,})\.jsonl$")
_ITEM_NAME = re.compile(r"^(\d{10})-[A-Za-z0-9._-]+$")
VERDICTS, TRUTHS = ("good", "anomalous"), ("good", "defect")


class DecisionLogError(PadimError):
    """The decision log, the flagged-image folder or a feedback record cannot be used as asked."""


def clean(value):
    """``value`` with NumPy scalars and arrays as Python numbers and lists, tuples as lists, and every
    non-finite float (NaN, +-inf) as None: what ``json.dumps(allow_nan=False)`` accepts."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_lines(records: Iterable[dict]) -> bytes:
    """One JSON object per line, UTF-8, each ending in a newline (none inside: json escapes them)."""
    return b"".join(json.dumps(clean(r), allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()
                    + b"\n" for r in records)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _truncate_torn_tail(path: Path) -> int:
    """Cuts ``path`` after its last newline (nothing if it ends in one); returns the bytes removed."""
    with open(path, "r+b") as handle:
        size = end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            chunk = handle.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                end = start + at + 1
                break
            end = start
        if end < size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        return size - end


class DecisionLog:
    """``DecisionLog(folder, max_bytes)``; ``write(records)`` appends a batch (list of dicts) durably.

    Files: ``folder/decisions-NNNNN.jsonl``. ``torn_bytes``: bytes of an unacknowledged batch cut off
    when this log was opened (0 after a clean stop). ``close()`` or use as a context manager.
    """

    def __init__(self, folder, max_bytes: int = DEFAULT_MAX_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise DecisionLogError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self._lock = threading.Lock()
        self._fd = self._lock_fd = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            self._lock_fd = os.open(self.folder / ".lock", flags, 0o666)
            if fcntl is not None:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(self._lock_fd)
                    raise DecisionLogError(f"decision log folder {self.folder} is in use by another process") from None
            files = self.files()
            self.torn_bytes = _truncate_torn_tail(files[-1]) if files else 0
            self._number = int(_LOG_NAME.match(files[-1].name).group(1)) if files else 0
            if files:
                self._open(files[-1], create=False)
            else:
                self._next_file()
        except OSError as exc:
            self.close()
            raise DecisionLogError(f"cannot open decision log {self.folder}: {describe_os_error(exc)}") from None

    def files(self) -> List[Path]:
        """The log's files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _LOG_NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    @property
    def path(self) -> Path:
        """The file being appended to."""
        return self.folder / f"decisions-{self._number:05d}.jsonl"

    def _open(self, path: Path, create: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(path, flags, 0o666)
        self._size = os.fstat(self._fd).st_size
        if create:
            _fsync_folder(self.folder)  # the new name itself survives a power cut

    def _next_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._number += 1
        self._open(self.path, create=True)

    def write(self, records: Sequence[dict]) -> int:
        """Appends the batch as one write of complete lines, then fsync; returns the bytes written."""
        data = encode_lines(records)
        if not data:
            return 0
        with self._lock:
            if self._fd is None:
                raise DecisionLogError(f"decision log {self.folder} is closed")
            start = self._size
            try:
                if start > 0 and start + len(data) > self.max_bytes:
                    self._next_file()
                    start = 0
                written = os.write(self._fd, data)
                while written < len(data):  # cut short (a signal, a full disk): finish or undo below
                    written += os.write(self._fd, memoryview(data)[written:])
                os.fsync(self._fd)
            except OSError as exc:
                if self._fd is not None:
                    try:
                        os.ftruncate(self._fd, start)
                    except OSError:
                        pass
                raise DecisionLogError(f"cannot write decision log {self.path}: {describe_os_error(exc)}; "
                                       "the batch was not logged") from None
            self._size = start + len(data)
            return len(data)

    def close(self) -> None:
        with self._lock:
            for name in ("_fd", "_lock_fd"):
                fd = getattr(self, name, None)
                if fd is not None:
                    os.close(fd)  # closing the lock file's descriptor also frees the flock
                    setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FlaggedStore:
    """``FlaggedStore(folder, max_bytes)``; ``add(data, metadata, name)`` keeps one flagged image.

    Items: ``folder/NNNNNNNNNN-NAME`` (the image's bytes) and ``...-NAME.json`` (its metadata), numbered
    in arrival order across restarts. Images and sidecars together stay <= ``max_bytes``: adding drops
    the oldest items first; an item bigger than ``max_bytes`` alone is not kept (``add`` returns None).
    """

    def __init__(self, folder, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, float)) or not max_bytes > 0:
            raise DecisionLogError(f"max_bytes must be a positive number, got {max_bytes!r}")
        self.folder, self.max_bytes = Path(folder), max_bytes
        self._lock = threading.Lock()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._items = self._scan()
        except OSError as exc:
            raise DecisionLogError(f"cannot use flagged-image folder {self.folder}: {describe_os_error(exc)}") from None
        self._next = (max(self._items) + 1) if self._items else 1
        self._total = sum(size for _, _, size in self._items.values())

    def _scan(self) -> "OrderedDict[int, tuple]":
        """Complete items by number -> (image path, sidecar path, bytes); removes what a kill left half-made."""
        items, names = OrderedDict(), {p.name: p for p in self.folder.iterdir()}
        for name, path in sorted(names.items()):
            if name.startswith(".") and name.endswith(".tmp") and is_stale(path):
                path.unlink(missing_ok=True)  # a temporary of a write that was killed
            elif _ITEM_NAME.match(name) and not name.endswith(".json"):
                sidecar = names.get(name + ".json")
                if sidecar is None:
                    path.unlink(missing_ok=True)  # the image was written, its sidecar was not
                else:
                    items[int(name[:10])] = (path, sidecar, path.stat().st_size + sidecar.stat().st_size)
            elif _ITEM_NAME.match(name) and name[:-5] not in names:
                path.unlink(missing_ok=True)  # a sidecar whose image was dropped
        return OrderedDict(sorted(items.items()))

    @property
    def total_bytes(self) -> int:
        return self._total

    def items(self) -> List[Path]:
        """The kept images, oldest first."""
        with self._lock:
            return [image for image, _, _ in self._items.values()]

    def add(self, data: bytes, metadata: dict, name: str = "image.png") -> Optional[Path]:
        """Keeps ``data`` (an image file's bytes) under its ``name`` with ``metadata`` beside it;
        returns the image's path, or None when the item alone exceeds ``max_bytes``."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".")[-80:] or "image"
        safe += "_" if safe.endswith(".json") else ""  # a sidecar's name would be ambiguous
        sidecar_bytes = json.dumps(clean(metadata), allow_nan=False, ensure_ascii=False, indent=1).encode() + b"\n"
        size = len(data) + len(sidecar_bytes)
        if size > self.max_bytes:
            return None
        with self._lock:
            number, self._next = self._next, self._next + 1
            image = self.folder / f"{number:010d}-{safe}"
            sidecar = image.with_name(image.name + ".json")
            atomic_write(image, lambda f: f.write(data), DecisionLogError, "flagged image")
            atomic_write(sidecar, lambda f: f.write(sidecar_bytes), DecisionLogError, "flagged image sidecar")
            self._items[number] = (image, sidecar, size)
            self._total += size
            while self._total > self.max_bytes:
                self._drop(next(iter(self._items)))
            return image

    def remove(self, image: Path) -> None:
        """Drops the kept item whose image is ``image`` (nothing when it is not kept)."""
        with self._lock:
            for number, (kept, _, _) in list(self._items.items()):
                if kept == image:
                    self._drop(number)

    def metadata(self, image: Path) -> dict:
        """The sidecar of a kept image ({} when it cannot be read)."""
        try:
            return json.loads(Path(str(image) + ".json").read_text())
        except (OSError, ValueError):
            return {}

    def _drop(self, number: int) -> None:
        old_image, old_sidecar, old_size = self._items.pop(number)
        old_sidecar.unlink(missing_ok=True)  # sidecar first: an image left alone is removed at the next scan
        old_image.unlink(missing_ok=True)
        self._total -= old_size
