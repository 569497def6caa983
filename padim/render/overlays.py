"""The pictures a prediction returns, as base64 PNGs: what ``padim predict --output`` draws, plus
the anomaly map itself for the web page.

- ``overlay_png``: the 'jet' heatmap over the picture (``visualize.heatmap_overlay``, same scale as
  ``padim predict``: 0 .. 2 x the pixel threshold, or the map's own range without one), long side at
  most ``OVERLAY_MAX_SIDE`` pixels: a picture for people, small enough for a JSON answer.
- ``mask_png``: the predicted defect mask at the pixel threshold, 1-bit, at the picture's full size
  (data, like ``padim predict``'s NAME_mask.png).
- ``map_png``: the anomaly map at the model's input size, 8-bit grey over [map_min, map_max]
  (value = map_min + v / 255 (map_max - map_min)): what lets the page re-draw the outline at any
  threshold without asking the server again.

For a model fitted with a crop, the overlay and mask cover the crop the model saw (``covers``).
"""

from __future__ import annotations

import base64
import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from padim.render.visualize import draw

OVERLAY_MAX_SIDE = 1024


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: these pictures are sent once
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def map_png(anomaly_map: np.ndarray) -> Tuple[str, float, float]:
    """(H, W) map -> (8-bit grey PNG in base64, its min, its max)."""
    lo, hi = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = np.rint((anomaly_map - lo) * (255.0 / max(hi - lo, 1e-12)))
    return png_base64(Image.fromarray(scaled.astype(np.uint8))), lo, hi


def heatmap(anomaly_map, original: Tuple[int, int], picture: Optional[Image.Image],
            pixels: np.ndarray, cropped: bool, pixel_threshold: Optional[float], ignore=None) -> dict:
    """anomaly_map: (H, W) at the model's input size; original: the picture's (height, width);
    picture: the picture at ``overlay_size(original, OVERLAY_MAX_SIDE)`` (None for a cropped
    model); pixels: the model's (H, W, 3) input. -> the ``schemas.Heatmap`` fields, drawn by
    ``visualize.draw`` (the renderer of ``padim predict``'s files)."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)  # every engine's maps: NumPy or torch
    drawn = draw(anomaly_map, original, Image.fromarray(pixels) if cropped else picture, cropped, pixel_threshold,
                 ignore, OVERLAY_MAX_SIDE)
    mask = None if drawn.mask is None else png_base64(Image.fromarray(drawn.mask).convert("1"))
    encoded, lo, hi = map_png(anomaly_map)
    return {"covers": "crop" if cropped else "image", "overlay_png": png_base64(drawn.overlay),
            "overlay_width": drawn.overlay.width, "overlay_height": drawn.overlay.height, "mask_png": mask,
            "map_png": encoded, "map_min": lo, "map_max": hi,
            "map_width": int(anomaly_map.shape[1]), "map_height": int(anomaly_map.shape[0])}
