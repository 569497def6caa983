"""Maps and masks at a picture's own resolution: the one resize from the model's input size back to
the picture, for every engine and surface (``predict(original_resolution=True)``, the pictures of
``padim predict``, the service, Ray). Torch-free (NumPy), so the runtime shares it.

Why a module: the map is resized bilinearly (PyTorch's half-pixel rule), and a bilinear resize
carries the scores at an ignore region's edge a pixel or two into it; the region is set back to 0
at full size here, so a mask at the picture's resolution never marks an ignored pixel.

Shapes: (H, W) the model's input size, (h0, w0) the picture's upright size.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from padim.settings.calibration import at_least

_STRIP_PIXELS = 1 << 22  # pixels of one strip of a full-size mask: bounded memory for 12000 x 12000


def linear_weights(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear resampling of one axis from n_in to n_out samples, as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` does it (half-pixel centres, negative
    source coordinates clamped to 0, no antialiasing): output i = (1 - frac) * v[low] + frac * v[high].
    Source coordinates are computed in float32 as PyTorch's CPU kernel does, so that the weights round
    the same way. -> low, high (n_out,) int64 and frac (n_out,) float32."""
    scale = np.float32(n_in) / np.float32(n_out)
    source = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = np.minimum(source.astype(np.int64), n_in - 1)
    return low, np.minimum(low + 1, n_in - 1), (source - low.astype(np.float32)).astype(np.float32)


def _resample_rows(values: np.ndarray, low: np.ndarray, high: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """(n_in, m) -> (len(low), m): two gathers and a weighted sum (4 operations per output value)."""
    return values[low] * (1 - frac)[:, None] + values[high] * frac[:, None]


def ignore_at(ignore: Optional[np.ndarray], size: Tuple[int, int]) -> Optional[np.ndarray]:
    """(H, W) bool ignore mask -> (h0, w0) bool, nearest (a pixel is ignored or not: Pillow's rule,
    as ``files.images.load_ignore_mask`` brings a mask to the model's size); None stays None."""
    if ignore is None:
        return None
    ignore = np.asarray(ignore, dtype=bool)
    if ignore.shape == tuple(size):
        return ignore
    resized = Image.fromarray(ignore.astype(np.uint8) * 255).resize((int(size[1]), int(size[0])), Image.NEAREST)
    return np.asarray(resized) > 0


def map_at(anomaly_map, size: Tuple[int, int], ignore: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) map -> (h0, w0) float32 map at the picture's size (bilinear, half-pixel centres, one axis
    at a time), 0 where ``ignore`` ((H, W) bool, the model's ignore mask) says."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    across = _resample_rows(anomaly_map.T, *linear_weights(anomaly_map.shape[1], int(size[1]))).T  # (H, w0)
    out = _resample_rows(across, *linear_weights(anomaly_map.shape[0], int(size[0])))  # (h0, w0)
    if ignore is not None:
        out[ignore_at(ignore, size)] = 0.0
    return out


def mask_at(anomaly_map, size: Tuple[int, int], threshold: float, ignore: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W) map -> (h0, w0) bool: ``map_at``'s map at or above ``threshold`` (``calibration.at_least``,
    the one decision rule), a strip of rows at a time (a 12000 x 12000 mask needs its 144 MB of
    bools, not a 576 MB float map); never True where ``ignore`` says."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    across = _resample_rows(anomaly_map.T, *linear_weights(anomaly_map.shape[1], int(size[1]))).T  # (H, w0)
    low, high, frac = linear_weights(anomaly_map.shape[0], int(size[0]))
    out = np.empty(tuple(size), dtype=bool)
    step = max(1, _STRIP_PIXELS // int(size[1]))
    for start in range(0, int(size[0]), step):
        part = slice(start, start + step)
        out[part] = at_least(_resample_rows(across, low[part], high[part], frac[part]), threshold)
    if ignore is not None:
        out &= ~ignore_at(ignore, size)
    return out
