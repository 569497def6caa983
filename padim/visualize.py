"""Pictures of anomaly maps: a heatmap blended over the image, and binary masks as PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> Image.Image:
    """Blends a 'jet' rendering of ``anomaly_map`` (h, w), scaled from vmin to vmax, over ``image``
    (resized to the map's size). Returns an RGB image of the map's size."""
    from matplotlib import colormaps  # here: masks and PNGs need no matplotlib (the torch-free runtime)

    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    base = image.convert("RGB").resize((anomaly_map.shape[1], anomaly_map.shape[0]), Image.BILINEAR)
    return Image.blend(base, Image.fromarray(heat), alpha)


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def mask_image(mask: np.ndarray) -> Image.Image:
    """(h, w) bool -> L-mode PNG-ready image, 255 where anomalous."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
