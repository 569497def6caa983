"""The one renderer of anomaly maps: a heatmap blended over the picture, and the defect mask.

``draw`` makes both for every surface (``padim predict``'s PNG files, the service's base64 PNGs,
Ray's pictures). Heatmaps are pictures for people, drawn with the long side at most ``max_side``
pixels (a 12000 x 12000 input gets a 4096 x 4096 heatmap file); masks are data and keep the
picture's full resolution (``pipeline.resolution.mask_at``: the one decision rule, the ignore region
never marked). The ignore region is hatched on the heatmap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from PIL import Image

from padim.pipeline.resolution import map_at, mask_at

OVERLAY_MAX_SIDE = 4096  # long side of a heatmap overlay file, in pixels


@dataclass
class Drawn:
    """What ``draw`` makes of one scored picture: the heatmap overlay (RGB) and the defect mask
    ((h0, w0) bool at the picture's size, or at the crop; None without a pixel threshold)."""

    overlay: Image.Image
    mask: Optional[np.ndarray]


def draw(anomaly_map, original: Tuple[int, int], picture: Image.Image, cropped: bool,
         pixel_threshold: Optional[float], ignore: Optional[np.ndarray] = None,
         max_side: int = OVERLAY_MAX_SIDE) -> Drawn:
    """anomaly_map: (H, W) at the model's input size (any engine's: NumPy or torch); original: the
    picture's upright (height, width); picture: the picture at ``overlay_size(original, max_side)``,
    or for a model fitted with a crop the (H, W) crop the model saw; ignore: the model's (H, W) ignore
    mask or None. The heatmap's colours run from 0 to 2 x the pixel threshold (the map's own range
    without one)."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    drawn = anomaly_map if cropped else map_at(anomaly_map, overlay_size(original, max_side), ignore)
    if pixel_threshold is not None:
        vmin, vmax = 0.0, 2 * pixel_threshold
    else:
        vmin, vmax = float(drawn.min()), float(drawn.max())
    overlay = heatmap_overlay(picture, drawn, vmin, vmax, ignore=ignore)
    mask = None
    if pixel_threshold is not None:
        mask = mask_at(anomaly_map, anomaly_map.shape if cropped else original, pixel_threshold, ignore)
    return Drawn(overlay, mask)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5,
                    ignore: Optional[np.ndarray] = None) -> Image.Image:
    """Blends a 'jet' rendering of ``anomaly_map`` (h, w), scaled from vmin to vmax, over ``image``
    (resized to the map's size). Returns an RGB image of the map's size. ``ignore``: a model's ignore
    mask at any size: those pixels are hatched (grey diagonals over the dimmed picture), not coloured."""
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    cmap = colormaps["jet"]  # its N-entry lookup table, indexed as matplotlib indexes floats in [0, 1]
    index = np.minimum((scaled * cmap.N).astype(np.int16), cmap.N - 1)
    lut = (cmap(np.arange(cmap.N))[:, :3] * 255).astype(np.uint8)  # (N, 3): no (h, w, 4) float64 copy
    heat = lut[index]
    base = image if image.mode in ("L", "RGB") else image.convert("RGB")  # resized before any RGB copy
    base = base.resize((anomaly_map.shape[1], anomaly_map.shape[0]), Image.BILINEAR).convert("RGB")
    blended = Image.blend(base, Image.fromarray(heat), alpha)
    if ignore is None:
        return blended
    return hatch(blended, ignore)


def hatch(image: Image.Image, ignore: np.ndarray, spacing: int = 8) -> Image.Image:
    """``image`` with the pixels of ``ignore`` (any size, resized nearest to the image) dimmed and
    crossed by grey diagonal lines every ``spacing`` pixels: a region that does not count."""
    mask = np.asarray(Image.fromarray(np.asarray(ignore, dtype=np.uint8) * 255).resize(image.size, Image.NEAREST)) > 0
    pixels = np.array(image.convert("RGB"))
    rows, cols = np.indices(mask.shape)
    lines = mask & ((rows + cols) % spacing < 2)
    pixels[mask] = (pixels[mask] * 0.4 + 60).astype(np.uint8)
    pixels[lines] = (160, 160, 160)
    return Image.fromarray(pixels)


def save_png(image: Image.Image, path: Path) -> None:
    """Writes a PNG atomically (see ``padim.files.atomic``): a full disk or a folder in the way is one line."""
    from padim.files.atomic import atomic_write

    # zlib level 1: a 4096 px heatmap of a 20-megapixel picture encodes in 1.0 s instead of 5.3 s at
    # Pillow's default (6), for a file 15 % larger; the pixels are the same (PNG is lossless)
    atomic_write(path, lambda handle: image.save(handle, format="PNG", compress_level=1), what="picture")


def mask_image(mask: np.ndarray) -> Image.Image:
    """(h, w) bool -> L-mode PNG-ready image, 255 where anomalous."""
    return Image.fromarray(np.multiply(mask, 255, dtype=np.uint8))  # no int64 temporary (1 GB at 12000^2)


def overlay_size(size: Tuple[int, int], max_side: int = OVERLAY_MAX_SIDE) -> Tuple[int, int]:
    """(height, width) of a picture -> the (height, width) its heatmap is drawn at: the same, or
    scaled down (aspect kept, each side >= 1) so that the long side is ``max_side``."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every one of ``paths`` (resolved): ``save_prediction_pictures``
    mirrors the inputs' folders below it, so that equal file names in two folders never collide."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def save_prediction_pictures(path: Path, anomaly_map, size: Tuple[int, int], config,
                             pixel_threshold: Optional[float], folder: Path, common: Path,
                             ignore: Optional[np.ndarray] = None) -> None:
    """``padim predict``'s pictures of one image ``path`` (scored to ``anomaly_map`` (H, W); ``size``
    its upright original (height, width)), written below ``folder`` at the input's place relative
    to ``common``: NAME.EXT_heatmap.png, an overlay with its long side <= ``OVERLAY_MAX_SIDE``, and
    with a pixel threshold NAME.EXT_mask.png, the mask at the image's full resolution. For a model
    fitted with a crop both are at the crop, over the resized and cropped image the model saw. The
    image is read again for the overlay. ``ignore``: the model's ignore mask (see ``draw``)."""
    from padim.files.decode import read_image
    from padim.files.images import load_pixels
    from padim.files.memory import release_free_memory

    path = Path(path)
    stem = Path(folder) / path.resolve().parent.relative_to(common) / path.name
    cropped = config.crop is not None
    picture = Image.fromarray(load_pixels(path, config)[0]) if cropped else read_image(path, overlay_size(size), 1, 1)[0]
    drawn = draw(anomaly_map, size, picture, cropped, pixel_threshold, ignore)
    del picture
    if drawn.mask is not None:
        save_png(mask_image(drawn.mask), stem.with_name(stem.name + "_mask.png"))
    save_png(drawn.overlay, stem.with_name(stem.name + "_heatmap.png"))
    del drawn
    release_free_memory()  # a big picture's buffers, kept by glibc otherwise
