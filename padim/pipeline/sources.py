"""What can be scored, turned into one list of ``Source`` items: files, folders (searched
recursively), PIL images, arrays and uploaded bytes.

Every surface starts here: ``padim predict PATH...`` and ``padim update --add`` with paths and
folders, ``PaDiM.predict`` with any mix, the service with uploads, Ray with paths. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence, Set, Tuple

from padim.data.mvtec import list_images
from padim.errors import DataError
from padim.files.paths import not_regular


@dataclass(frozen=True)
class Source:
    """One image to score. ``name``: what records show (the path as given, the upload's name, or
    "<image 3>" for an in-memory picture); ``item``: what ``padim.files.images.load_pixels`` reads
    (a path, a PIL image or an array). Uploaded bytes are the service's source
    (``padim.serve.uploads.decode_upload``: decoded from memory, named by the client's file name)."""

    name: str
    item: object


def _directory_key(path: Path) -> Tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def find_images(folder: Path, note: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Image files in ``folder`` and every folder below it: each folder's own images sorted by name,
    then its subfolders in name order (a stable order: the same folder gives the same list on every
    machine). Hidden folders are not searched; a folder reached twice (a symbolic link back up the
    tree, or two links to one folder) is searched once, so link loops end."""
    found: List[Path] = []
    seen: Set[Tuple[int, int]] = set()

    def visit(current: Path) -> None:
        try:
            key = _directory_key(current)
        except OSError:
            return
        if key in seen:
            return
        seen.add(key)
        try:
            found.extend(list_images(current, note))
            subfolders = sorted(p for p in current.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:
            raise DataError(f"cannot read folder {current}: {exc.strerror or exc}") from None
        for sub in subfolders:
            visit(sub)

    visit(Path(folder))
    return found


def expand_paths(paths: Iterable[os.PathLike], note: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Files as given, folders -> their images (recursively, see ``find_images``); a file given twice
    (or by name and in a folder, or by another name of the same file) is kept once, with a note.
    A path that does not exist or is not a regular file (a FIFO, a socket, a device: said so by
    ``padim.files.paths.not_regular``, the words ``PaDiM.predict`` uses too), or a folder without
    images, is refused in one line. Inside folders, entries that are not regular files are skipped
    with a note (``padim.data.mvtec.list_images``)."""
    images: List[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = find_images(path, note)
            if not inside:
                raise DataError(f"no images in folder {path} (nor in its subfolders)")
            images += inside
        else:
            why = not_regular(path)  # a FIFO or a device is said so, never opened (a FIFO blocks)
            if why is not None:
                raise DataError(f"{path} {why}")
            images.append(path)
    seen, kept = set(), []
    for path in images:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    if len(kept) < len(images) and note is not None:
        note(f"note: {len(images) - len(kept)} input(s) given more than once: each file is scored once")
    return kept


def as_sources(items: Sequence[object]) -> List[Source]:
    """``PaDiM.predict``'s inputs (paths, PIL images, arrays) -> sources, one per item, in order.
    Paths are not searched here: the caller chose them. One that is not a regular file (a folder, a
    FIFO, a device) is an error when read, saying what it is, never opened (``padim.files.decode``),
    so with ``errors="record"`` it is an error row, not a hang."""
    sources = []
    for index, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            sources.append(Source(str(item), item))
        else:
            sources.append(Source(f"<image {index}>", item))
    return sources
