"""Where a command writes: checked before any work (a folder that exists or can be made, writable, on
a real file system), and never onto one of its own inputs or another of its outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

from padim.errors import PadimError

# File systems that hold no user files: writing there fails, or worse, does something else.
PSEUDO_FILE_SYSTEMS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "configfs", "pstore", "bpf", "efivarfs", "fusectl", "mqueue", "autofs",
                       "binfmt_misc", "hugetlbfs", "rpc_pipefs", "nsfs"}


def _file_system_type(path: Path) -> Optional[str]:
    """The type of the file system holding the existing ``path`` (longest mount point), from
    /proc/self/mounts; None when that cannot be read."""
    try:
        with open("/proc/self/mounts") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    best, kind = "", None
    text = str(path)
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (text == point or text.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _existing_ancestor(path: Path) -> Path:
    current = path
    while not os.path.lexists(current):
        if current.parent == current:
            break
        current = current.parent
    return current


def _check_writable_folder(folder: Path, option: str, shown: Path) -> None:
    """``folder`` exists or can be created: its nearest existing ancestor is a writable folder on a
    real file system."""
    existing = _existing_ancestor(folder)
    if not existing.is_dir():
        raise PadimError(f"{option} {shown}: {existing} is a file, not a folder")
    resolved = existing.resolve()
    kind = _file_system_type(resolved)
    if kind in PSEUDO_FILE_SYSTEMS or (kind is None and str(resolved).split("/")[1:2] in (["proc"], ["sys"])):
        raise PadimError(f"{option} {shown}: {resolved} is on the {kind or 'pseudo'} file system, which holds no files")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PadimError(f"{option} {shown}: {existing} is not writable (read-only folder or file system)")
    if existing == folder:  # it exists: try what the write will do, a new file in it
        probe = folder / f".padim-write-test-{os.getpid()}.tmp"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            from padim.files.atomic import describe_os_error

            raise PadimError(f"{option} {shown}: cannot create files in {folder} ({describe_os_error(exc)})") from None


def check_output_file(path, option: str = "--output") -> None:
    """A file that will be written (created or replaced atomically, folders created as needed)."""
    path = Path(path)
    if path.is_dir():
        raise PadimError(f"{option} {path} is a folder; give a file name, e.g. {path / 'model.safetensors'}")
    _check_writable_folder(path.absolute().parent, option, path)


def check_output_folder(path, option: str = "--output") -> None:
    """A folder that will be created if needed and written into."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise PadimError(f"{option} {path} is a file; give a folder")
    _check_writable_folder(path.absolute(), option, path)


# ----------------------------------------------------------------------------------------- overlaps
def _identity(path: Path):
    """What makes two names one file: the resolved path (symbolic links followed), and for a file
    that exists its device and inode too (a hard link, a bind mount)."""
    resolved = Path(os.path.realpath(path))
    try:
        stat = os.stat(resolved)
        return resolved, (stat.st_dev, stat.st_ino)
    except OSError:
        return resolved, None


def _same(a, b) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _inside(path, folder) -> bool:
    return path[0] == folder[0] or folder[0] in path[0].parents


def check_no_overlap(inputs: Dict[str, Sequence], files: Dict[str, Optional[os.PathLike]],
                     folders: Dict[str, Optional[os.PathLike]] = None) -> None:
    """Refuses, before any work, a command whose outputs would overwrite its inputs or each other.

    inputs:  option -> paths it reads (files, or folders of images);
    files:   option -> the file it writes (None: not written);
    folders: option -> the folder it writes pictures or results into: no input may lie in it (the
             pictures of an input are written beside it, and the next run would read them as inputs).
    Names are compared resolved (links followed) and by inode: another name of the same file is the
    same file."""
    read = [(option, Path(p), _identity(Path(p))) for option, paths in inputs.items() for p in paths if p is not None]
    written = [(option, Path(p), _identity(Path(p))) for option, p in files.items() if p is not None]
    for i, (option, path, identity) in enumerate(written):
        for source, given, other in read:
            if _same(identity, other):
                raise PadimError(f"{option} {path} is the same file as the input {source} {given}: it would be "
                                 "overwritten; write to another file")
            if Path(given).is_dir() and identity[1] is not None and _inside(identity, other):
                raise PadimError(f"{option} {path} is a file inside the input {source} {given}: it would be "
                                 "overwritten; write to another file")
        for other_option, other_path, other in written[i + 1:]:
            if _same(identity, other):
                raise PadimError(f"{option} {path} and {other_option} {other_path} are the same file: one would "
                                 "replace the other; give two different files")
    for option, folder in (folders or {}).items():
        if folder is None:
            continue
        target = _identity(Path(folder))
        for source, given, other in read:
            if _inside(other, target) or _inside(target, other) and Path(given).is_dir():
                raise PadimError(f"{option} {folder} holds (or is inside) the input {source} {given}: its pictures "
                                 "would land among the inputs; give a folder outside them")
        for other_option, other_path, other in written:
            if _same(target, other):
                raise PadimError(f"{option} {folder} and {other_option} {other_path} are the same path")
