"""The Parquet folder ``padim predict --ray`` writes: ``part-NNNNN.parquet`` files of result rows
(``SCHEMA``) and ``_padim.json``, the model and thresholds the rows come from, resumed by a rerun.

Each part is written whole under a temporary name and renamed into place (``padim.files.atomic``),
so an interruption leaves whole parts and at most a temporary (dot names: readers skip them). A
lock file keeps a second run out while one writes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional, Set

import pyarrow as pa
import pyarrow.parquet as pq

from padim.version import __version__
from padim.errors import PadimError, one_line
from padim.files.atomic import atomic_write, is_stale

SCHEMA = pa.schema([("path", pa.string()), ("score", pa.float64()), ("p_value", pa.float64()),
                    ("label", pa.string()), ("threshold", pa.float64()), ("threshold_source", pa.string()),
                    ("error", pa.string())])
MANIFEST = "_padim.json"
PART = re.compile(r"part-(\d{5,})\.parquet")


class ResultsFolder:
    """A Parquet dataset folder of result rows: ``part-NNNNN.parquet`` + ``MANIFEST``.

    identity: what the rows depend on (the model's checksum, the thresholds); a folder written with
    another identity is refused rather than mixed.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._next: Optional[int] = None  # number of the next part

    @staticmethod
    def check(folder: Path, option: str = "--output") -> None:
        """Refuses a file, or a folder that holds anything but results (before any work)."""
        folder = Path(folder)
        if os.path.lexists(folder) and not folder.is_dir():
            raise PadimError(f"{option} {folder} is a file; give a folder for the Parquet results, e.g. results.parquet")
        foreign = folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())
        if foreign and not (folder / MANIFEST).is_file():
            raise PadimError(f"{option} {folder} is a folder that does not hold padim predict --ray results "
                             f"(no {MANIFEST}): give a new folder, or that of an earlier run to resume it")
        holder = _live_holder(folder / ".lock")
        if holder is not None and holder != _me():  # said now, not after Ray's start-up
            raise PadimError(f"another run is writing to {folder} (.lock: {holder}); wait for it, or remove the "
                             "lock if that run is gone")

    def lock(self) -> None:
        """Takes the folder for this run (``.lock``: host and pid), or refuses when another live run
        holds it: two runs would write parts of the same numbers and score the same paths."""
        import socket

        self.folder.mkdir(parents=True, exist_ok=True)
        lock, mine = self.folder / ".lock", f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _live_holder(lock)
                if holder is None:
                    lock.unlink(missing_ok=True)  # left by a run that was killed
                    continue
                raise PadimError(f"another run is writing to {self.folder} ({lock.name}: {holder}); "
                                 "wait for it, or remove the lock if that run is gone") from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(mine)
            self._lock = lock
            return

    def unlock(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.unlink(missing_ok=True)
            self._lock = None

    def parts(self) -> List[Path]:
        return sorted(p for p in self.folder.iterdir() if PART.fullmatch(p.name)) if self.folder.is_dir() else []

    def open(self, identity: dict) -> Set[str]:
        """Creates the folder (or checks an earlier run's identity) -> the keys (``path_key``) of the
        paths it holds rows for. Removes temporaries left by killed runs."""
        self.check(self.folder)
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise PadimError(f"cannot read {manifest}: {one_line(exc)}") from None
            before = stored.get("identity", {}) if isinstance(stored, dict) else {}
            changed = [key for key in identity  # heatmaps may be asked for on a rerun, not at another threshold
                       if (key in before or key != "pixel threshold") and before.get(key) != identity[key]]
            if changed:
                was = ", ".join(f"{key} {before.get(key)!r}" for key in changed)
                raise PadimError(f"{self.folder} holds the results of another {' and '.join(changed)} ({was}): "
                                 "give a new --output folder, or the same model and options to resume")
            base = stored.get("working_directory") if isinstance(stored, dict) else None
        else:
            base = os.getcwd()
            record = {"padim": __version__, "columns": SCHEMA.names, "identity": identity, "working_directory": base}
            atomic_write(manifest, lambda handle: handle.write(json.dumps(record, indent=1).encode()), what="manifest")
        for temporary in self.folder.glob(".part-*.tmp"):  # parts a killed run was writing
            if is_stale(temporary):
                temporary.unlink(missing_ok=True)
        done: Set[str] = set()
        for part in self.parts():
            try:
                written = pq.read_table(part, columns=["path"]).column("path").to_pylist()
            except (OSError, pa.ArrowException) as exc:
                raise PadimError(f"cannot read {part} (remove it to score its images again): "
                                 f"{one_line(exc)}") from None
            if base and os.path.realpath(base) != os.path.realpath(os.getcwd()) and \
                    any(not os.path.isabs(p) for p in written):
                # relative paths name other files from here: matching them would score everything twice
                raise PadimError(f"{self.folder} holds paths relative to {base}: resume from that folder")
            done.update(path_key(p) for p in written)
        return done

    def write(self, table: pa.Table) -> Path:
        """Writes ``table`` as the next part, atomically."""
        if self._next is None:
            self._next = 1 + max((int(PART.fullmatch(p.name).group(1)) for p in self.parts()), default=-1)
        path = self.folder / f"part-{self._next:05d}.parquet"
        atomic_write(path, lambda handle: pq.write_table(table, handle), what="Parquet part")
        self._next += 1
        return path


def path_key(path) -> str:
    """What a rerun matches paths by: absolute, normalised (relative paths: from the same folder)."""
    return os.path.abspath(str(path))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_holder(lock: Path) -> Optional[str]:
    """"HOST pid PID" of the run holding ``lock``, or None when there is no lock or it was left by a
    process of this machine that is gone (a lock of another machine counts as held)."""
    import socket

    try:
        host, _, pid = lock.read_text().partition(" ")
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError:
        return "unreadable lock"
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return None
    return f"{host} pid {pid}"


def _me() -> str:
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"
