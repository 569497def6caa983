"""Atomic file writes: a temporary file next to the target, flushed to disk, then renamed over it.

Why each detail:
- the rename is atomic, so a reader (or a crash, or a full disk) sees the old file or the new one,
  never half of one;
- the temporary is created with mode 0666 through ``os.open``, so the kernel applies the user's umask
  exactly as for any other file they create (``tempfile.mkstemp`` would force 0600);
- its name records this host and process (``.NAME.<host>-<pid>-<random>.tmp``): two writers never
  share a temporary, and the next write can tell a temporary left by a killed process (its pid is
  gone on this host) from one that another writer is still filling;
- a write that fails (no space left, file-size limit, read-only disk) removes its temporary and
  becomes one ``PadimError`` line naming the path; the old file is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Callable, Sequence, Tuple, Type

from padim.errors import PadimError

# A temporary older than this is stale whoever wrote it: a live writer touches its file far more often.
STALE_SECONDS = 3600.0

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def temporary_name(path: Path) -> Path:
    """``.NAME.<host>-<pid>-<random>.tmp`` next to ``path``."""
    return path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a nonsense pid): assume alive, leave the file alone
    return True


def is_stale(temporary: Path, now: float = None) -> bool:
    """True for a temporary whose writer is certainly gone: written on this host by a pid that no
    longer runs, or not modified for ``STALE_SECONDS`` (a writer on another host sharing the folder)."""
    try:
        age = (time.time() if now is None else now) - temporary.stat().st_mtime
    except OSError:
        return False
    if age > STALE_SECONDS:
        return True
    parts = temporary.name[: -len(".tmp")].rsplit(".", 1)[-1].split("-")
    if len(parts) != 3 or parts[0] != _host_tag() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    return pid != os.getpid() and not _pid_alive(pid)


def remove_stale_temporaries(path: Path) -> int:
    """Removes stale ``.NAME.*.tmp`` files next to ``path`` (see ``is_stale``); returns how many."""
    removed = 0
    try:
        candidates = list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))
    except OSError:
        return 0
    for temporary in candidates:
        if temporary.is_file() and not temporary.is_symlink() and is_stale(temporary):
            try:
                temporary.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def describe_os_error(exc: OSError) -> str:
    """A short reason for a failed write, with the words a user searches for."""
    if exc.errno in _SPACE_ERRNOS:
        return "no space left on the device"
    if exc.errno == errno.EFBIG:
        return "file too large (no space left under the file-size limit)"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def atomic_write(path, write: Callable[[object], None], error: Type[PadimError] = PadimError,
                 what: str = "file") -> None:
    """Writes ``path`` through ``write(binary_file)`` into a temporary, then renames it over ``path``.

    Any OSError (full disk, size limit, permissions) removes the temporary and raises ``error`` with
    one line; the previous ``path`` is left as it was. Other exceptions (bugs) propagate, also after
    removing the temporary.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = temporary_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise error(f"cannot write {what} {path}: {describe_os_error(exc)}; "
                    f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_together(writes: Sequence[Tuple[os.PathLike, Callable[[Path], None]]]) -> None:
    """Writes several files all or none: each ``save(staging_path)`` writes a temporary next to its
    target (itself atomically), and only when every one succeeded are they renamed over their
    targets. A failure (full disk, file-size limit) removes the temporaries and leaves every target
    as it was: a model and its statistics never disagree."""
    staged = []
    try:
        for target, save in writes:
            target = Path(target)
            staging = temporary_name(target)
            staged.append((staging, target))
            save(staging)
        for staging, target in staged:
            os.replace(staging, target)
        staged = []
    finally:
        for staging, _ in staged:
            try:
                os.unlink(staging)
            except OSError:
                pass
