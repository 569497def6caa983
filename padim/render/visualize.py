"""Pictures of anomaly maps: a heatmap blended over the image, and binary masks as PNGs.

Heatmaps are pictures for people: ``padim predict`` draws them with the long side at most
``OVERLAY_MAX_SIDE`` pixels (a 12000 x 12000 input gets a 4096 x 4096 heatmap), while masks are data
and keep the input's full resolution, computed in strips of rows (``mask_at_size``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
import torch
import torch.nn.functional as F
from PIL import Image

OVERLAY_MAX_SIDE = 4096  # long side of a heatmap overlay, in pixels
_STRIP_PIXELS = 1 << 22  # output pixels per strip in ``mask_at_size``


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

    atomic_write(path, lambda handle: image.save(handle, format="PNG"), what="picture")


def mask_image(mask: np.ndarray) -> Image.Image:
    """(h, w) bool -> L-mode PNG-ready image, 255 where anomalous."""
    return Image.fromarray(np.multiply(mask, 255, dtype=np.uint8))  # no int64 temporary (1 GB at 12000^2)


def overlay_size(size: Tuple[int, int], max_side: int = OVERLAY_MAX_SIDE) -> Tuple[int, int]:
    """(height, width) of a picture -> the (height, width) its heatmap is drawn at: the same, or
    scaled down (aspect kept, each side >= 1) so that the long side is ``max_side``."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in): rows of 1-D linear interpolation weights (align_corners=False), so that
    R_h @ map @ R_w^T equals F.interpolate(map, mode="bilinear", align_corners=False)."""
    eye = torch.eye(n_in, dtype=torch.float32).unsqueeze(1)  # (n_in, 1, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].T.contiguous()


def mask_at_size(anomaly_map: torch.Tensor, size: Tuple[int, int], threshold: float) -> np.ndarray:
    """(H, W) map -> (h0, w0) bool: the bilinearly upsampled map >= threshold, computed a strip of
    rows at a time (a 12000 x 12000 mask needs its 144 MB of bools, not a 576 MB float map)."""
    rows = _linear_weights(anomaly_map.shape[0], size[0])  # (h0, H)
    across = anomaly_map.float() @ _linear_weights(anomaly_map.shape[1], size[1]).T  # (H, w0)
    out = np.empty(size, dtype=bool)
    step = max(1, _STRIP_PIXELS // size[1])
    for start in range(0, size[0], step):
        out[start : start + step] = (rows[start : start + step] @ across >= threshold).numpy()
    return out


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every one of ``paths`` (resolved): ``save_prediction_pictures``
    mirrors the inputs' folders below it, so that equal file names in two folders never collide."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def save_prediction_pictures(path: Path, anomaly_map: torch.Tensor, size: Tuple[int, int], config,
                             pixel_threshold: Optional[float], folder: Path, common: Path,
                             ignore: Optional[np.ndarray] = None) -> None:
    """``padim predict``'s pictures of one image ``path`` (scored to ``anomaly_map`` (H, W); ``size``
    its upright original (height, width)), written below ``folder`` at the input's place relative
    to ``common``: NAME.EXT_heatmap.png, an overlay with its long side <= ``OVERLAY_MAX_SIDE``, and
    with a pixel threshold NAME.EXT_mask.png, the mask at the image's full resolution. For a model
    fitted with a crop both are at the crop, over the resized and cropped image the model saw. The
    image is read again for the overlay. ``ignore``: the model's ignore mask, hatched on the overlay."""
    from padim.files.decode import read_image
    from padim.files.images import load_pixels
    from padim.files.memory import release_free_memory
    from padim.core.scoring import to_original_resolution

    path = Path(path)
    stem = Path(folder) / path.resolve().parent.relative_to(common) / path.name
    if config.crop is None:  # the map and the picture at the image's own size
        draw = overlay_size(size)  # the heatmap: long side <= 4096 px
        drawn, picture = to_original_resolution(anomaly_map, draw), read_image(path, draw, 1, 1)[0]
    else:  # a crop has no full-size map: both at the crop the model saw
        drawn, picture = anomaly_map.numpy(), Image.fromarray(load_pixels(path, config)[0])
    if pixel_threshold is not None:
        vmin, vmax = 0.0, 2 * pixel_threshold
        full_size = size if config.crop is None else tuple(anomaly_map.shape)
        mask = mask_image(mask_at_size(anomaly_map, full_size, pixel_threshold))
        save_png(mask, stem.with_name(stem.name + "_mask.png"))
        del mask
    else:
        vmin, vmax = float(drawn.min()), float(drawn.max())
    save_png(heatmap_overlay(picture, drawn, vmin, vmax, ignore=ignore), stem.with_name(stem.name + "_heatmap.png"))
    del picture, drawn
    release_free_memory()  # a big picture's buffers, kept by glibc otherwise
