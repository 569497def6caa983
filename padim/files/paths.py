"""What a path is, in words, and opening a regular file for reading without ever blocking.

Every file padim reads by name (images, masks, model files) is checked here first, so that a FIFO,
a socket or a device given as a path is refused in one line saying what it is, never opened:
opening a FIFO for reading blocks until a writer comes, and ``/dev/zero`` or ``/dev/urandom`` never
end. The same words serve the command line and the Python API (``padim.pipeline.sources``,
``padim.files.decode``, ``padim.files.safetensors_io``). Torch-free, standard library only.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO, Optional

# st_mode type -> what such a path is
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFile(OSError):
    """A path that is there but is not a regular file (a FIFO, a device, ...): ``str()`` says which,
    as words that follow the path ("is a FIFO, not a regular file")."""

    def __init__(self, why: str):
        super().__init__(why)
        self.strerror = why

    def __str__(self) -> str:
        return self.strerror


def kind_of_mode(mode: int) -> str:
    """"a regular file", "a folder", "a FIFO", "a socket", "a character device", "a block device"
    or "a special file", for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def not_regular(path: os.PathLike) -> Optional[str]:
    """None when ``path`` is a regular file (symbolic links followed); else why not, as words that
    follow the path: "does not exist", "is a broken link", "is a folder, not a regular file", "is a
    FIFO, not a regular file", "is a character device, not a regular file", ..., or "cannot be read
    (<reason>)". Only looks (``os.stat``): never opens the path."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken link" if os.path.islink(path) else "does not exist"
    except (OSError, ValueError) as exc:  # no permission on a folder above, a name too long, a NUL byte
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    return None if stat.S_ISREG(mode) else f"is {kind_of_mode(mode)}, not a regular file"


def open_regular(path: os.PathLike) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: refuses anything else with ``NotRegularFile``
    without blocking, also when the path is replaced by a FIFO between a check and the open (the file
    is opened non-blocking, then what was opened is looked at). Other failures raise the usual
    OSError (FileNotFoundError, PermissionError, ...)."""
    why = not_regular(path)
    if why is not None and why.startswith("is "):
        raise NotRegularFile(why)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"is {kind_of_mode(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # no effect on a regular file's reads; as open() would leave it
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
