"""Property-based test (Hypothesis) of reading pictures: mode x bit depth x size x extension case x
EXIF orientation.

Every generated file either reads as the upright picture with the values a NumPy computation from
what was written says (exactly for lossless formats, within JPEG's error for JPEG), or -- for data
outside the documented ranges -- raises a one-line ``DataError``. Nothing else may happen.
"""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim.data.mvtec import list_images
from padim.files.decode import read_image
from padim.errors import DataError

from imagefiles import png16_rgb, save, to8, upright

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

N_EXAMPLES = 250  # generated files per run

# mode -> the formats that store it (RGB16: a 16-bit RGB PNG written byte by byte)
FORMATS = {
    "L": ("png", "tif", "jpg", "bmp"), "RGB": ("png", "tif", "jpg", "bmp"), "RGBA": ("png", "tif"),
    "LA": ("png", "tif"), "P": ("png", "tif"), "1": ("png", "tif", "bmp"), "CMYK": ("tif", "jpg"),
    "I;16": ("png", "tif"), "I": ("tif",), "F": ("tif",), "RGB16": ("png",),
}
JPEG_TOLERANCE = 24  # grey levels, on smooth content at quality 95


@st.composite
def picture_files(draw):
    mode = draw(st.sampled_from(sorted(FORMATS)))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    ext = "".join(c.upper() if up else c for c, up in zip(fmt, draw(st.lists(st.booleans(), min_size=4, max_size=4))))
    side = st.one_of(st.integers(1, 24), st.sampled_from([1, 2, 97]))  # 1-pixel-wide, tall and thin
    height, width = draw(side), draw(side)
    orientation = draw(st.integers(1, 8)) if fmt != "bmp" else 1  # BMP has no EXIF
    out_of_range = draw(st.booleans()) if mode in ("I", "F") else False
    seed = draw(st.integers(0, 2**32 - 1))
    return mode, fmt, ext, height, width, orientation, out_of_range, seed


def _write(folder: Path, mode, fmt, ext, height, width, orientation, out_of_range, seed):
    """Writes the file; returns (path, the 8-bit picture as stored, or None when an error is due)."""
    rng = np.random.default_rng(seed)
    path = folder / f"pic.{ext}"
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "RGB16": 3}.get(mode, 1)
    shape = (height, width, channels) if channels > 1 else (height, width)
    if fmt == "jpg":  # smooth content (JPEG keeps it within a few levels), asymmetric for orientation
        i, j = np.mgrid[0:height, 0:width]
        ramp = 40 + 140 * (0.7 * i / max(height - 1, 1) + 0.3 * j / max(width - 1, 1))
        values = np.broadcast_to(ramp[..., None] if channels > 1 else ramp, shape).astype(np.uint8)
    else:
        values = rng.integers(0, 256, shape).astype(np.uint8)
    expected = values
    if mode == "RGB16":
        wide = rng.integers(0, 65536, shape).astype(np.uint16)
        png16_rgb(wide, path, orientation)
        return path, (wide >> 8).astype(np.uint8)  # Pillow reads 16-bit RGB by the high byte
    if mode == "I;16":
        wide = rng.integers(0, 65536, shape).astype(np.uint16)
        img, expected = Image.fromarray(wide), to8(wide, 65535)
    elif mode == "I":
        wide = rng.integers(0, 100000 if out_of_range else 65536, shape).astype(np.int32)
        if out_of_range:
            wide.flat[0] = 99999
        img, expected = Image.fromarray(wide), None if out_of_range else to8(wide, 65535)
    elif mode == "F":
        unit = rng.random(shape).astype(np.float32)
        if out_of_range:
            unit.flat[0] = 1.5
        img, expected = Image.fromarray(unit), None if out_of_range else to8(unit, 1.0)
    elif mode == "P":
        palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
        img = Image.fromarray(values, "P")
        img.putpalette(palette.ravel().tolist())
        expected = palette[values]
    elif mode == "1":
        bits = values > 127
        img, expected = Image.fromarray(bits), np.where(bits, 255, 0).astype(np.uint8)
    elif mode == "CMYK":
        img = Image.fromarray(values, "CMYK")
        ink = values.astype(float)
        expected = np.rint((255 - ink[..., :3]) * (255 - ink[..., 3:]) / 255).astype(np.uint8)
    else:
        img = Image.fromarray(values, mode)
        expected = values[..., :3] if mode == "RGBA" else values[..., 0] if mode == "LA" else values
    save(img, path, orientation, **({"quality": 95} if fmt == "jpg" else {}))
    return path, expected


@settings(max_examples=N_EXAMPLES, deadline=None)
@given(picture_files())
def test_every_picture_reads_upright_with_its_dynamic_range_or_fails_in_one_line(case):
    mode, fmt, ext, height, width, orientation, out_of_range, seed = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, stored = _write(folder, *case)
        assert list_images(folder) == [path]  # any letter case of the extension
        try:
            picture, original = read_image(path)
        except DataError as exc:
            assert stored is None, f"unexpected error for {case}: {exc}"
            assert "\n" not in str(exc)
            return
        assert stored is not None, f"no error for out-of-range data {case}"
        expected = upright(stored, orientation)
        got = np.asarray(picture)
        if got.ndim == 3 and expected.ndim == 2:  # a greyscale file read as RGB is three equal channels
            expected = np.repeat(expected[..., None], 3, axis=2)
        assert original == expected.shape[:2]
        assert got.shape == expected.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - expected.astype(int)).max()
        assert diff <= (JPEG_TOLERANCE if fmt == "jpg" else 0), (case, diff)
