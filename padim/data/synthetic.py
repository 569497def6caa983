"""A synthetic category in MVTec AD layout, generated in code: a woven, fabric-like surface, and
defects (scratches, spots, missing pieces) with their masks. For tests and the demo, never shipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_TYPES = ("scratch", "spot", "missing")


def _fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) uint8: a regular weave with small random shifts, shading and sensor noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = 8.0
    phase_x, phase_y = rng.uniform(0, 2 * np.pi, 2)
    warp = 0.5 + 0.5 * np.sin(2 * np.pi * x / period + phase_x)
    weft = 0.5 + 0.5 * np.sin(2 * np.pi * y / period + phase_y)
    checker = (np.floor(x / period) + np.floor(y / period)) % 2
    weave = np.where(checker > 0, warp, weft)
    shade = 1.0 + 0.05 * np.sin(2 * np.pi * (x + y) / (size * rng.uniform(1.5, 3.0)))
    base = np.array([150.0, 120.0, 90.0]) * rng.uniform(0.95, 1.05)
    image = base * (0.75 + 0.35 * weave[..., None]) * shade[..., None]
    image += rng.normal(0.0, 4.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_defect(rng: np.random.Generator, image: Image.Image, kind: str) -> Image.Image:
    """Draws one defect on ``image`` in place; returns its mask (L mode, 0/255)."""
    size = image.width
    mask = Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    cx, cy = rng.integers(size // 5, 4 * size // 5, 2)
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5) * size
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        line = [(cx - dx, cy - dy), (cx + dx, cy + dy)]
        width = int(rng.integers(2, 5))
        draw.line(line, fill=(235, 235, 225), width=width)
        mask_draw.line(line, fill=255, width=width)
    elif kind == "spot":
        radius = rng.uniform(0.04, 0.08) * size
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        draw.ellipse(box, fill=(60, 45, 35))
        mask_draw.ellipse(box, fill=255)
    else:  # missing piece: a hole showing the dark backing
        corners = rng.uniform(0.05, 0.11, (5, 2)) * size
        angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
        polygon = [(cx + r * np.cos(a), cy + r * np.sin(a)) for (r, _), a in zip(corners, angles)]
        draw.polygon(polygon, fill=(25, 25, 30))
        mask_draw.polygon(polygon, fill=255)
    return mask


def make_synthetic_category(
    root, name: str = "synthetic_fabric", n_train: int = 40, n_test_good: int = 10,
    n_test_per_defect: int = 6, size: int = 256, seed: int = 0,
) -> Path:
    """Writes ROOT/NAME/{train/good, test/good, test/<defect>, ground_truth/<defect>} as PNGs.

    Returns the category folder. The same arguments always give the same images.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / name

    def save(image: Image.Image, *parts: str) -> None:
        path = folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)

    for i in range(n_train):
        save(Image.fromarray(_fabric(rng, size)), "train", "good", f"{i:03d}.png")
    for i in range(n_test_good):
        save(Image.fromarray(_fabric(rng, size)), "test", "good", f"{i:03d}.png")
    for kind in DEFECT_TYPES:
        for i in range(n_test_per_defect):
            image = Image.fromarray(_fabric(rng, size))
            mask = _draw_defect(rng, image, kind)
            save(image, "test", kind, f"{i:03d}.png")
            save(mask, "ground_truth", kind, f"{i:03d}_mask.png")
    return folder
