"""The MVTec AD folder layout, which any other data set can follow:

    ROOT/CATEGORY/train/good/*.png                      defect-free training images
    ROOT/CATEGORY/test/<good | defect type>/*.png       test images
    ROOT/CATEGORY/ground_truth/<defect type>/<stem>_mask.png

Images may be any of ``IMAGE_EXTENSIONS`` (png, jpg, jpeg, bmp, tif, tiff, gif, pbm/pgm/ppm/pnm, webp;
any letter case), of any size, bit depth and colour mode. Masks are matched to their image by name
with the extension's case ignored (``000.JPG`` <- ``000_mask.PNG``).

A folder entry that *looks like an image* -- a name ending in one of ``LOOKS_LIKE_IMAGE`` (the
extensions padim reads plus common ones it does not: HEIC, AVIF, JPEG 2000, camera raw, ...) -- but
cannot be used (a format padim does not read, a broken link, a folder, a socket) is reported through
``note`` with a count and the first names, never dropped silently. Other files (hidden files,
.txt, .json, thumbnails databases) are ignored without a word.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from padim.errors import DataError
from padim.files.images import IMAGE_EXTENSIONS
from padim.files.paths import not_regular

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
GOOD = "good"


@dataclass(frozen=True)
class TestSample:
    """One test image: ``defect`` is "good" or the defect type; ``mask`` is None for good images and
    for defect images whose mask is missing."""

    path: Path
    defect: str
    mask: Optional[Path] = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect != GOOD


@dataclass
class Category:
    name: str
    root: Path
    train: List[Path]
    test: List[TestSample] = field(default_factory=list)

    @property
    def defects_without_mask(self) -> List[TestSample]:
        return [s for s in self.test if s.is_anomalous and s.mask is None]


# Names that look like pictures although padim does not read them (besides IMAGE_EXTENSIONS).
LOOKS_LIKE_IMAGE = IMAGE_EXTENSIONS + (
    ".webp", ".jpe", ".jfif", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jpx", ".exr", ".hdr", ".dng",
    ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw", ".psd", ".svg", ".ico", ".tga", ".dds", ".xcf",
    ".pcx", ".qoi", ".dcm",
)
SHOWN_SKIPPED = 5  # names listed in a "skipped" note


def _skip_reason(path: Path) -> Optional[str]:
    """None for a usable picture file; else why an entry named like a picture is skipped."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return "format not read by padim"
    why = not_regular(path)  # files.paths: the words every surface uses ("a FIFO", "a folder", ...)
    if why is None:
        return None
    if why == "is a broken link":
        return "broken link"
    return why[3:].split(", not a regular file")[0] if why.startswith("is ") else why


def list_images(folder: Path, note: Optional[Callable[[str], None]] = None) -> List[Path]:
    """Image files directly in ``folder``, sorted by name. Entries named like pictures that cannot be
    used are reported through ``note`` (one line: count and the first names; default: a Python
    warning), hidden and other files are ignored."""
    images, skipped = [], []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in LOOKS_LIKE_IMAGE:
            continue
        reason = _skip_reason(path)
        if reason is None:
            images.append(path)
        else:
            skipped.append(f"{path.name} ({reason})")
    if skipped:
        more = f" and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
        message = (f"note: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} of {folder} named like "
                   f"images: {', '.join(skipped[:SHOWN_SKIPPED])}{more} (padim reads {', '.join(IMAGE_EXTENSIONS)})")
        if note is None:
            warnings.warn(message, stacklevel=2)
        else:
            note(message)
    return images


def _mask_index(folder: Path) -> Dict[str, Path]:
    """Lower-cased file name -> path for the usable mask files in ``folder`` (empty when missing)."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_file()}


def _find_mask(masks: Dict[str, Path], stem: str) -> Optional[Path]:
    """The mask of image ``stem``: STEM_mask.EXT, else STEM.EXT, EXT any of IMAGE_EXTENSIONS in any case."""
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            found = masks.get(f"{name}{ext}".lower())
            if found is not None:
                return found
    return None


def find_category(data_root, name: str, need_test: bool = False,
                  note: Optional[Callable[[str], None]] = None) -> Category:
    """Finds a category's images. Raises DataError for a missing root, category or train/good folder,
    an empty train/good, and (with ``need_test``) a missing or empty test folder. Skipped entries
    named like images are reported through ``note`` (see ``list_images``)."""
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    folder = root / name
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
        hint = f"; categories found there: {', '.join(present)}" if present else "; no category folders found there"
        raise DataError(f"category {name!r} not found in {root}{hint}")
    train_dir = folder / "train" / GOOD
    if not train_dir.is_dir():
        raise DataError(f"{train_dir} does not exist: a category needs train/good with defect-free images")
    train = list_images(train_dir, note)
    if not train:
        raise DataError(f"no training images in {train_dir} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    category = Category(name=name, root=folder, train=train)
    if need_test:
        category.test = _test_samples(folder, note)
    return category


def _test_samples(folder: Path, note: Optional[Callable[[str], None]] = None) -> List[TestSample]:
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir} does not exist: testing needs test/good and test/<defect> folders")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        masks = {} if defect == GOOD else _mask_index(folder / "ground_truth" / defect)
        for path in list_images(defect_dir, note):
            mask = None if defect == GOOD else _find_mask(masks, path.stem)
            samples.append(TestSample(path=path, defect=defect, mask=mask))
    if not samples:
        raise DataError(f"no test images in {test_dir}")
    kinds = {s.is_anomalous for s in samples}
    if kinds != {True, False}:
        missing = "defect" if True not in kinds else "good"
        raise DataError(f"{test_dir} has no {missing} images: AUROC needs both good and defect images")
    return samples
