"""Image and mask I/O: decode with Pillow, resize/crop to the model's input (normalising is the
embedding step's, ``padim.core.embedding``).

Decoding runs in a small thread pool (Pillow releases the GIL while it decodes and resizes): a batch's
images in parallel, and on a GPU one batch ahead, so that reading files overlaps with the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from PIL import Image, features
from tqdm import tqdm

from padim.settings.config import PadimConfig
from padim.files.decode import read_image, read_mask
from padim.errors import DataError

if TYPE_CHECKING:  # annotations only: importing padim's decoding needs no torch
    import torch

# Extensions padim reads from folders (case-insensitive); WebP where this Pillow has it.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".pbm", ".pgm", ".ppm", ".pnm") + (
    (".webp",) if features.check("webp") else ())

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
T = TypeVar("T")

# decoded pixels of one batch at most (uint8): beyond it a batch holds fewer pictures than asked for.
# A 20-megapixel picture is 60 MB of pixels and 240 MB once normalised; 32 of them would be 9.6 GB.
BATCH_PIXEL_BYTES = 128 * 2 ** 20


def pictures_per_batch(batch_size: int, input_size: Tuple[int, int]) -> int:
    """``batch_size``, or fewer pictures of a large input size (at least 1): what a fit's and a
    prediction's batches hold, so that memory does not grow with the picture times the batch."""
    return max(1, min(batch_size, BATCH_PIXEL_BYTES // (input_size[0] * input_size[1] * 3)))


def resize_crop(img: Image.Image, config: PadimConfig, resample: int) -> Image.Image:
    height, width = config.image_size
    img = img.resize((width, height), resample)
    if config.crop is not None:
        crop_h, crop_w = config.crop
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        img = img.crop((left, top, left + crop_w, top + crop_h))
    return img


def load_pixels(item: ImageInput, config: PadimConfig) -> Tuple[np.ndarray, Tuple[int, int]]:
    """-> the backbone's input as (H, W, 3) uint8 RGB pixels, and the picture's upright original
    (height, width).

    Read by ``padim.files.decode.read_image``: upright, 8 bits by a fixed rule, and a picture more than 4
    times the input size decoded or box-reduced early (bounded memory for 12000 x 12000 pictures).
    The resize is bilinear (antialiased by Pillow); greyscale pictures are resized before they are
    made RGB (the same pixels, a third of the work). Kept as uint8 until the embedding step
    normalises a whole batch (``padim.core.embedding``): a quarter of the memory while batches wait.
    """
    img, original = read_image(item, config.image_size)  # resized (bilinear), crop below
    if config.crop is not None:
        img = resize_crop(img, config, Image.BILINEAR)  # the resize is a no-op: the size is right
    if img.mode == "L":
        img = img.convert("RGB")
    return np.array(img), original  # a writable copy: torch warns about read-only arrays


def load_mask(path: Union[str, os.PathLike], config: PadimConfig, image_hw: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth mask -> (H, W) bool with the image's geometry: upright, True where the mask's
    colour is not black (``padim.files.decode.read_mask``), then a nearest resize and crop.

    image_hw: the upright original (height, width) of the image the mask belongs to; a mask of
    another size is an error, not something to stretch silently.
    """
    defect = read_mask(path)
    if defect.shape != tuple(image_hw):
        raise DataError(
            f"mask {path} is {defect.shape[1]}x{defect.shape[0]} but its image is {image_hw[1]}x{image_hw[0]}"
        )
    mask = resize_crop(Image.fromarray(defect.astype(np.uint8) * 255), config, Image.NEAREST)
    import torch

    return torch.from_numpy(np.asarray(mask) > 0)


def prefetched(items: Sequence[T], batch_size: int, load: Callable[[T], object], workers: int = 2,
               ahead: int = 1) -> Iterator[List]:
    """Yields ``[load(item) for item in batch]`` batch by batch, each batch loaded by ``workers`` threads.

    ahead: batches loaded while the caller works on the current one. Worth it when the caller's work
    runs elsewhere (a GPU). On the CPU use 0: each batch is then loaded in parallel and handed over
    before the backbone starts, because decoding beside the backbone takes cores from it and its
    threads wait on one another (measured on 2 cores: 1.4 ms of decoding per image made the
    backbone 5 ms per image slower).
    """
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = deque()  # futures of batches index, index + 1, ...
        try:
            for index in range(len(batches)):
                while len(pending) <= ahead and index + len(pending) < len(batches):
                    pending.append([pool.submit(load, item) for item in batches[index + len(pending)]])
                futures = pending.popleft()
                yield [future.result() for future in futures]
        finally:  # an error, or the caller stopped early: drop what is still queued
            for waiting in pending:
                for future in waiting:
                    future.cancel()


def pixel_batches(images: Sequence[ImageInput], config: PadimConfig, batch_size: int, device: torch.device,
                  workers: int = 2, progress: Optional[bool] = False,
                  desc: str = "") -> Iterator[Tuple[torch.Tensor, List[Tuple[int, int]]]]:
    """Yields (B, H, W, 3) uint8 CPU tensors at the model's input (``load_pixels``) and their images'
    original (height, width), for a fit: a file that cannot be read raises (``DataError`` naming it).
    Files are decoded in ``workers`` threads, a batch ahead when ``device`` is a GPU (``prefetched``).
    progress: False never, None on a terminal only, True always. The embedding step normalises them
    (``padim.core.embedding``), as when scoring."""
    import torch  # here, not at the top: decoding (load_pixels) must work without torch (padim.runtime)

    ahead = 0 if torch.device(device).type == "cpu" else 1
    batch_size = pictures_per_batch(batch_size, config.input_size)
    batches = prefetched(list(images), batch_size, lambda item: load_pixels(item, config), workers, ahead)
    total = -(-len(images) // batch_size)
    disable = {False: True, None: None, True: False}[progress]
    for loaded in tqdm(batches, total=total, desc=desc, unit="batch", disable=disable):
        yield torch.from_numpy(np.stack([x for x, _ in loaded])), [hw for _, hw in loaded]


def load_ignore_mask(item, size: Tuple[int, int]) -> np.ndarray:
    """A region that must never count (a label, a fixture, the background): a picture of any size
    whose non-black pixels are ignored (``padim.files.decode.read_mask``'s rule), or an (h, w) bool
    array -> (H, W) bool at ``size``, the model's input (nearest: a pixel is ignored or not)."""
    mask = np.asarray(item, dtype=bool) if isinstance(item, np.ndarray) else read_mask(item)
    if mask.ndim != 2:
        raise DataError(f"an ignore mask must be one picture (H, W), got shape {mask.shape}")
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)) > 0
    if resized.all():
        raise DataError("the ignore mask covers the whole picture: nothing would be scored")
    return resized
