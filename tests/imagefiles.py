"""Writing test pictures the way cameras and tools store them, and what a viewer shows for them.

Independent of padim: the references below are NumPy computations from the EXIF specification
and the documented 8-bit rule, not calls into padim's reader.
"""

import struct
import zlib

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


def upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    """The picture as a viewer shows it (EXIF 2.3, tag 0x0112): (h, w, ...) -> upright array."""
    flip = np.fliplr
    return {
        1: lambda a: a, 2: flip, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
        5: lambda a: np.rot90(flip(a), 1), 6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(flip(a), -1), 8: lambda a: np.rot90(a, 1),
    }[orientation](stored)


def to8(values: np.ndarray, full_scale: float) -> np.ndarray:
    """The documented rule: round(v * 255 / full_scale)."""
    return np.rint(np.asarray(values, dtype=np.float64) * 255.0 / full_scale).astype(np.uint8)


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def save(img: Image.Image, path, orientation: int = 1, **kwargs) -> None:
    """Saves with an EXIF orientation tag (TIFF: as a TIFF tag, as cameras write it)."""
    if orientation != 1:
        if path.suffix.lower() in (".tif", ".tiff"):
            kwargs["tiffinfo"] = {ORIENTATION_TAG: orientation}
        else:
            kwargs["exif"] = exif_bytes(orientation)
    img.save(path, **kwargs)


def png16_rgb(arr: np.ndarray, path, orientation: int = 1) -> None:
    """A 16-bit RGB PNG written byte by byte ((h, w, 3) uint16), with an eXIf chunk when oriented:
    Pillow cannot write this kind of file, industrial cameras do."""
    height, width = arr.shape[:2]
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
    if orientation != 1:
        data = exif_bytes(orientation)
        body += chunk(b"eXIf", data[6:] if data.startswith(b"Exif\0\0") else data)
    body += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
