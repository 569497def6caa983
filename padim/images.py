"""Image and mask I/O: decode with Pillow, resize/crop/normalise to the backbone's input.

Decoding runs in a small thread pool one batch ahead of the backbone (Pillow releases the GIL while
it decodes and resizes), so reading files overlaps with the network instead of adding to it.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Sequence, Tuple, TypeVar, Union

import numpy as np
import torch
from PIL import Image

from .config import PadimConfig
from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
T = TypeVar("T")


def open_image(item: ImageInput) -> Image.Image:
    """A fully decoded PIL image from a path, PIL image or (H, W[, 3|4]) uint8 array."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    try:
        with Image.open(item) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise DataError(f"image {item} does not exist") from None
    except Exception as exc:  # UnidentifiedImageError, truncated file, ...
        raise DataError(f"cannot read image {item}: {exc}") from None


def resize_crop(img: Image.Image, config: PadimConfig, resample: int) -> Image.Image:
    height, width = config.image_size
    img = img.resize((width, height), resample)
    if config.crop is not None:
        crop_h, crop_w = config.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        img = img.crop((left, top, left + crop_w, top + crop_h))
    return img


def load_image(item: ImageInput, config: PadimConfig) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """-> normalised (3, H, W) float32 input and the original (height, width).

    Grayscale, palette and RGBA images become RGB; resize is bilinear (antialiased by Pillow).
    """
    img = open_image(item)
    original = (img.height, img.width)
    img = resize_crop(img.convert("RGB"), config, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (x - mean) / std, original


def load_mask(path: Union[str, os.PathLike], config: PadimConfig, image_hw: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth mask -> (H, W) bool with the image's geometry (nearest resize, then binarised).

    image_hw: the original (height, width) of the image the mask belongs to; a mask of another
    size is an error, not something to stretch silently.
    """
    mask = open_image(path)
    if (mask.height, mask.width) != tuple(image_hw):
        raise DataError(
            f"mask {path} is {mask.width}x{mask.height} but its image is {image_hw[1]}x{image_hw[0]}"
        )
    mask = resize_crop(mask.convert("L"), config, Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) > 127)


def prefetched(items: Sequence[T], batch_size: int, load: Callable[[T], object], workers: int = 2) -> Iterator[List]:
    """Yields ``[load(item) for item in batch]`` batch by batch, decoding the next batch in threads
    while the caller works on the current one. At most two batches are held in memory."""
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque()
        for batch in batches[:2]:
            pending.append([pool.submit(load, item) for item in batch])
        for next_batch in batches[2:] + [None] * min(2, len(batches)):
            futures = pending.popleft()
            if next_batch is not None:
                pending.append([pool.submit(load, item) for item in next_batch])
            try:
                yield [future.result() for future in futures]
            except BaseException:
                for waiting in pending:
                    for future in waiting:
                        future.cancel()
                raise
