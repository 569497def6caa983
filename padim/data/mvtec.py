"""The MVTec AD folder layout, which any other data set can follow:

    ROOT/CATEGORY/train/good/*.png                      defect-free training images
    ROOT/CATEGORY/test/<good | defect type>/*.png       test images
    ROOT/CATEGORY/ground_truth/<defect type>/<stem>_mask.png

Images may be png, jpg, jpeg, bmp or tif, of any size and colour mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from ..errors import DataError
from ..images import IMAGE_EXTENSIONS

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


def list_images(folder: Path) -> List[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files and other files ignored)."""
    return sorted(
        p for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _find_mask(ground_truth: Path, defect: str, stem: str) -> Optional[Path]:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            candidate = ground_truth / defect / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    return None


def find_category(data_root, name: str, need_test: bool = False) -> Category:
    """Finds a category's images. Raises DataError for a missing root, category or train/good folder,
    an empty train/good, and (with ``need_test``) a missing or empty test folder."""
    root = Path(data_root)
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
    train = list_images(train_dir)
    if not train:
        raise DataError(f"no training images in {train_dir} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    category = Category(name=name, root=folder, train=train)
    if need_test:
        category.test = _test_samples(folder)
    return category


def _test_samples(folder: Path) -> List[TestSample]:
    test_dir = folder / "test"
    if not test_dir.is_dir():
        raise DataError(f"{test_dir} does not exist: testing needs test/good and test/<defect> folders")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            mask = None if defect == GOOD else _find_mask(folder / "ground_truth", defect, path.stem)
            samples.append(TestSample(path=path, defect=defect, mask=mask))
    if not samples:
        raise DataError(f"no test images in {test_dir}")
    kinds = {s.is_anomalous for s in samples}
    if kinds != {True, False}:
        missing = "defect" if True not in kinds else "good"
        raise DataError(f"{test_dir} has no {missing} images: AUROC needs both good and defect images")
    return samples
