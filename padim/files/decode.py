"""Reading image and mask files as people have them: any bit depth, any EXIF orientation, any size.

Every picture padim reads goes through here, so training, scoring, heatmaps and masks agree on it:

* **Upright first.** The EXIF orientation tag (phones, some cameras) is applied right after decoding
  (the table of ``PIL.ImageOps.exif_transpose``); sizes reported are upright sizes.
* **8 bits by a fixed rule** (the backbone takes 8-bit RGB), never clipped to white or black:
  integer images by their type's range (16-bit: v * 255 / 65535, rounded; Pillow reads 16-bit RGB PNGs
  itself by the high byte, v // 256); 32-bit integer images (mode I) must hold 16-bit data
  (0..65535) and are scaled as 16-bit; float images (mode F) must hold [0, 1] (0 black, 1 white) and
  are multiplied by 255. Data outside these ranges, or NaN/inf, is a ``DataError`` (no per-image
  stretching: the same value must give the same grey in every image). Palette, CMYK, 1-bit, LA/RGBA
  (alpha dropped) become RGB or greyscale as Pillow converts them.
* **Masks:** a pixel is defect when its colour is not black (any channel non-zero, after palette
  lookup; 0/1, 0/255, 16-bit and coloured drawings all work); a pixel with alpha 0 is not defect. JPEG
  masks (lossy: dark noise around edges) count a pixel as defect above 32 of 255 instead.
* **Big pictures without big memory.** A picture more than ``FAST_RATIO`` times larger than the size
  it is wanted at is decoded reduced (JPEG: Pillow's draft mode, a DCT-domain downscale) or reduced
  by an integer box filter (Pillow's ``reducing_gap``) before the antialiased bilinear resize, which
  keeps at least ``REDUCE_MARGIN`` times the wanted size. Pictures over Pillow's decompression-bomb error limit
  (2 * PIL.Image.MAX_IMAGE_PIXELS, 179 megapixels by default, about 13400 x 13400) are refused with a
  ``DataError``; Pillow's warning for pictures between half that and that limit is not shown, since
  padim reads them reduced.
"""

from __future__ import annotations

import contextlib
import os
import threading
import re
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image

from padim.errors import DataError
from padim.files.memory import release_free_memory
from padim.files.paths import NotRegularFile, not_regular, open_regular

FAST_RATIO = 4  # reduce early only when the picture is more than this many times the wanted size
REDUCE_MARGIN = 2  # ... and keep at least this many times the wanted size for the final resize
JPEG_MASK_LEVEL = 32  # JPEG masks: channel values above this are defect (compression noise below)
TRIM_PIXELS = 1 << 24  # after reducing a picture larger than this (16.7 MP), free memory goes back to the OS
_ROWS = 1 << 22  # pixels per block when scaling 16-bit/float data: bounds the temporaries
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide: one Image.open at a time
# Pictures over TRIM_PIXELS are decoded one at a time: the decoding threads of a batch never hold two
# full-size decodes at once (a 12000 x 12000 PNG alone peaks near 1.7 GB).
_BIG_PICTURE_SLOT = threading.Lock()

# EXIF orientation -> the transposition that makes the picture upright (PIL.ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)


def max_pixels() -> int:
    """The largest picture padim reads (pixels): Pillow's decompression-bomb error limit, read when
    called, so raising PIL.Image.MAX_IMAGE_PIXELS raises it."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 1 << 62


def _too_big(name, width: int, height: int) -> DataError:
    return DataError(f"image {name} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
                     f"{max_pixels() / 1e6:.0f} megapixels padim reads (Pillow's decompression-bomb limit): "
                     f"downscale it first")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation 1..8 (1 when absent, unknown or unreadable: a broken EXIF block must not
    stop a picture from being read)."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if value in _UPRIGHT else 1


def _open_file(path) -> Tuple[Image.Image, object]:
    """Image.open (header only, lazy) with padim's size limit in place of Pillow's warning/error.

    Returns the image and the open file, for the caller to close after ``load``. Only a regular
    file is opened (``padim.files.paths.open_regular``): a FIFO, a socket or a device is refused in
    one line saying what it is, without blocking. Pillow is given a
    file object, not the name: from a name it memory-maps uncompressed TIFFs and (Pillow 13) then
    decodes those with EXIF orientation 5-8 into the wrong shape.
    """
    try:
        fp = open_regular(path)  # a FIFO or a device is refused, never opened (opening a FIFO blocks)
    except FileNotFoundError:
        raise DataError(f"image {path} {not_regular(path) or 'does not exist'}") from None
    except NotRegularFile as exc:  # a folder, a FIFO, a socket, a device
        raise DataError(f"image {path} {exc}") from None
    except OSError as exc:  # no permission, ...
        raise DataError(f"cannot read image {path}: {exc.strerror or _one_line(exc)}") from None
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError:
        fp.close()
        raise DataError(f"image {path} is larger than the {max_pixels() / 1e6:.0f} megapixels padim reads "
                        f"(Pillow's decompression-bomb limit): downscale it first") from None
    except Exception as exc:  # UnidentifiedImageError, ...
        fp.close()
        raise DataError(f"cannot read image {path}: {_one_line(exc)}") from None
    if img.width * img.height > max_pixels():
        fp.close()
        raise _too_big(path, img.width, img.height)
    return img, fp


def picture_hw(path) -> Tuple[int, int]:
    """(height, width) of a picture file as padim reads it (EXIF rotations applied), from its header
    only (nothing is decoded). Raises DataError as ``decode`` does."""
    img, fp = _open_file(path)
    try:
        width, height = img.size
        return (width, height) if _orientation(img) in _SWAPS_AXES else (height, width)
    finally:
        fp.close()


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s*<_io\.\w+ name=(?:'[^']*'|\d+)>", "", str(exc))  # Pillow names its file object
    return " ".join(text.split()) or type(exc).__name__


def decode(item, wanted: Optional[Tuple[int, int]] = None, *, allow_reduce: bool = True,
           fast_ratio: float = FAST_RATIO, margin: int = REDUCE_MARGIN
           ) -> Tuple[Image.Image, int, Tuple[int, int], Optional[str], Optional[tuple]]:
    """Opens and decodes ``item`` (path, PIL image or array) without changing its pixel values.

    wanted: (height, width) the caller will resize the upright picture to; JPEGs more than
    ``fast_ratio`` times larger are decoded reduced (draft mode, to at least ``margin`` times
    ``wanted``). Returns (stored, not yet upright image; EXIF orientation; upright original
    (height, width); file format or None; the box of the decoded image that holds the whole picture
    -- fractional after a draft decode -- or None).
    """
    if isinstance(item, np.ndarray):
        return _from_array(item), 1, tuple(item.shape[:2]), None, None
    if isinstance(item, Image.Image):
        if item.width * item.height > max_pixels():
            raise _too_big("(PIL image)", item.width, item.height)
        try:
            item.load()  # first: a TIFF decoder turns itself upright while loading
        except Exception as exc:
            raise DataError(f"cannot read image (PIL image): {_one_line(exc)}") from None
        orientation = _orientation(item)
        hw = (item.width, item.height) if orientation in _SWAPS_AXES else (item.height, item.width)
        return item, orientation, hw, None, None
    img, fp = _open_file(item)
    try:
        orientation = _orientation(img)
        hw = (img.width, img.height) if orientation in _SWAPS_AXES else (img.height, img.width)
        box = None
        if wanted is not None and allow_reduce and img.format == "JPEG":
            stored = wanted[::-1] if orientation in _SWAPS_AXES else wanted  # (h, w) as stored
            if min(img.height / stored[0], img.width / stored[1]) > fast_ratio:
                drafted = img.draft(None, (margin * stored[1], margin * stored[0]))  # changes img.size
                box = drafted[1] if drafted else None
        img.load()
        if orientation != 1 and _orientation(img) == 1:  # the decoder turned it upright itself (TIFF)
            orientation, hw = 1, (img.height, img.width)
        return img, orientation, hw, img.format, box
    except Exception as exc:  # truncated file, broken codec data, ...
        raise DataError(f"cannot read image {item}: {_one_line(exc)}") from None
    finally:
        fp.close()


def _from_array(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1|3|4) arrays: uint8, uint16, bool, or float in [0, 1]."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise DataError(f"an image array must be (H, W) or (H, W, 3|4), got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        arr = scale_to_8bit(arr, "array")
    elif arr.dtype.kind == "f":
        arr = scale_to_8bit(arr.astype(np.float32, copy=False), "array")
    elif arr.dtype != np.uint8:
        raise DataError(f"an image array must be uint8, uint16, bool or float in [0, 1], got {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def scale_to_8bit(arr: np.ndarray, name) -> np.ndarray:
    """16-bit or float pixel values -> uint8 by the module's rule (see the module docstring); same shape.

    Works in blocks of rows, so a 12000 x 12000 picture needs no float64 copy of itself.
    """
    out = np.empty(arr.shape, dtype=np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"image {name} holds NaN or infinite values")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"float image {name} holds values from {lo:.4g} to {hi:.4g}: padim reads float images "
                            f"as 0 = black, 1 = white; rescale it to [0, 1] or save it as 8/16-bit")
    else:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(f"image {name} holds integer values from {lo} to {hi}: padim reads 8- and 16-bit "
                            f"images (0..65535); save it as 8 or 16 bits")
    step = max(1, _ROWS // max(1, arr[0].size if arr.ndim > 1 else 1))
    for start in range(0, arr.shape[0], step):
        block = arr[start : start + step]
        if arr.dtype.kind == "f":
            out[start : start + step] = np.rint(block.astype(np.float64) * 255.0)
        else:  # round(v * 255 / 65535), exact in integers (no ties: 65535 = 255 * 257, 257 odd)
            out[start : start + step] = (block.astype(np.int64) * 255 + 32767) // 65535
    return out


def to_8bit(img: Image.Image, name) -> Image.Image:
    """Any Pillow mode -> an "L" or "RGB" image with the same size, by the module's rule."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(scale_to_8bit(np.asarray(img), name))
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    try:
        return img.convert("RGB")
    except Exception as exc:
        raise DataError(f"cannot convert image {name} (mode {mode}) to RGB: {_one_line(exc)}") from None


def read_image(item, size: Optional[Tuple[int, int]] = None, fast_ratio: float = FAST_RATIO,
               margin: int = REDUCE_MARGIN) -> Tuple[Image.Image, Tuple[int, int]]:
    """-> (upright 8-bit "L" or "RGB" picture, its upright original (height, width)).

    size: (height, width) to resize the upright picture to (bilinear, antialiased), or None for the
    original size. A picture more than ``fast_ratio`` times ``size`` on both sides is reduced first
    (JPEG: draft decoding; else Pillow's integer box ``reducing_gap``), keeping ``margin`` times
    ``size`` for the bilinear step: measured within 3/255 of a direct resize (mean 0.3 levels).
    """
    name = item if isinstance(item, (str, os.PathLike)) else "(in memory)"
    with (_BIG_PICTURE_SLOT if _is_big(item) else contextlib.nullcontext()):
        return _read_image(item, name, size, fast_ratio, margin)


def _is_big(item) -> bool:
    """Whether a file holds more than TRIM_PIXELS pixels, from its header (False when it cannot be
    opened: ``decode`` then says why)."""
    if not isinstance(item, (str, os.PathLike)):
        return False
    try:
        img, fp = _open_file(item)
    except DataError:
        return False
    fp.close()
    return img.width * img.height > TRIM_PIXELS


def _read_image(item, name, size, fast_ratio, margin) -> Tuple[Image.Image, Tuple[int, int]]:
    img, orientation, original, _, box = decode(item, size, fast_ratio=fast_ratio, margin=margin)
    img = to_8bit(img, name)
    if size is not None:
        stored = size[::-1] if orientation in _SWAPS_AXES else size  # (h, w) as stored
        stored_original = original[::-1] if orientation in _SWAPS_AXES else original
        ratio = min(stored_original[0] / stored[0], stored_original[1] / stored[1])
        gap = float(margin) if ratio > fast_ratio else None
        img = img.resize((stored[1], stored[0]), Image.BILINEAR, box=box, reducing_gap=gap)
        if original[0] * original[1] > TRIM_PIXELS:
            release_free_memory()  # the full-size decode, kept by glibc for reuse otherwise
    if orientation in _UPRIGHT:
        img = img.transpose(_UPRIGHT[orientation])
    return img, original


def read_mask(path: Union[str, os.PathLike]) -> np.ndarray:
    """Ground-truth mask file -> (H, W) bool, upright: True where the colour is not black (see the
    module docstring for alpha and JPEG)."""
    img, orientation, _, fmt, _ = decode(path, allow_reduce=False)
    level = JPEG_MASK_LEVEL if fmt == "JPEG" else 0
    alpha = None
    if img.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3] > 0
    if img.mode == "1" or img.mode in ("L", "RGB", "I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img)
    elif img.mode in ("LA", "La"):
        values = np.asarray(img.convert("L"))
    else:
        try:
            values = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise DataError(f"cannot read mask {path} (mode {img.mode}): {_one_line(exc)}") from None
    values = np.nan_to_num(values) if values.dtype.kind == "f" else values
    defect = values > level
    if defect.ndim == 3:
        defect = defect.any(axis=2)
    if alpha is not None:
        defect &= alpha
    if orientation in _UPRIGHT:
        defect = np.asarray(Image.fromarray(defect).transpose(_UPRIGHT[orientation]))
    return defect
