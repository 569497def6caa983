"""Pictures for the composition matrix (tests/test_composition.py), made in code with NumPy.

A category in MVTec AD layout (``ROOT/part/train/good``: 40 good pictures, so that a fit holds 20 of
them out for calibration), 4 more good pictures for ``padim update``, a rectangle to ignore (a PNG
at the pictures' own size), and three test pictures made from one clean picture: itself, with a
bright square painted well inside the rectangle, and with the same square outside it.

Every picture is 96 x 160 (H x W), so that every geometry of the matrix resizes it (64 x 64 and
48 x 80); the rectangle is the top-left quarter and the square lies 12+ pixels inside its edges, so
that no resized pixel outside the rectangle mixes in a pixel of the square.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 96, 160
N_TRAIN, N_MORE = 40, 4
IGNORED = (slice(0, 48), slice(0, 80))  # the rectangle that never counts: rows, columns of the picture
INSIDE = (slice(12, 30), slice(20, 50))  # a defect inside it (>= 12 px from its edges)
OUTSIDE = (slice(60, 78), slice(100, 130))  # the same defect where it counts


def picture(rng: np.random.Generator) -> np.ndarray:
    """(96, 160, 3) uint8: a smooth woven texture with a random phase, shading and sensor noise."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * x / 10 + phase[0]) * np.sin(2 * np.pi * y / 10 + phase[1])
    shade = 1.0 + 0.05 * np.sin(2 * np.pi * (x + y) / 200)
    base = np.array([150.0, 120.0, 90.0]) * rng.uniform(0.95, 1.05)
    image = base * (0.85 + 0.15 * weave[..., None]) * shade[..., None] + rng.normal(0.0, 3.0, (HEIGHT, WIDTH, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def with_defect(image: np.ndarray, where) -> np.ndarray:
    out = image.copy()
    out[where] = (250, 250, 240)  # a bright square: far from anything the texture holds
    return out


def make_pictures(root: Path) -> Dict[str, object]:
    """Writes the pictures under ``root`` -> {"root": data root, "category": "part", "train": the 40
    training paths (sorted, as ``padim.data.find_category`` lists them), "more": the 4 paths for
    ``padim update``, "clean"/"inside"/"outside": the test paths, "ignore": the rectangle's PNG,
    "ignored": (96, 160) bool of it}."""
    rng = np.random.default_rng(26)
    train_dir, more_dir, test_dir = root / "part" / "train" / "good", root / "more", root / "test"
    for folder in (train_dir, more_dir, test_dir):
        folder.mkdir(parents=True)
    train: List[Path] = []
    for i in range(N_TRAIN):
        train.append(train_dir / f"{i:03d}.png")
        Image.fromarray(picture(rng)).save(train[-1])
    more = []
    for i in range(N_MORE):
        more.append(more_dir / f"more{i}.png")
        Image.fromarray(picture(rng)).save(more[-1])
    clean = picture(rng)
    tests = {}
    for name, image in (("clean", clean), ("inside", with_defect(clean, INSIDE)),
                        ("outside", with_defect(clean, OUTSIDE))):
        tests[name] = test_dir / f"{name}.png"
        Image.fromarray(image).save(tests[name])
    ignored = np.zeros((HEIGHT, WIDTH), dtype=bool)
    ignored[IGNORED] = True
    Image.fromarray(ignored.astype(np.uint8) * 255).save(root / "ignore.png")
    return {"root": root, "category": "part", "train": train, "more": more, **tests, "ignore": root / "ignore.png",
            "ignored": ignored}
