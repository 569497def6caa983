"""The checks of a model header that need no tensor and no torch, shared by model files
(``padim.files.safetensors_io``, ``padim.files.modelfile``) and export folders (``padim.runtime.read_export``), so
that a header is held to the same rules wherever it travels: the config (``validate_config_dict``),
the layout record, the feature grid, the thresholds and other fields, the calibration scores.

Each check gets ``refuse(reason)``, which raises the caller's error naming its file.
"""

from __future__ import annotations

import math
import os
import re
from typing import Callable, List, Optional, Sequence

from padim.files.digests import file_sha256

LAYOUT_KEY = "layout"  # see padim.files.safetensors_io
# SHA-256 of the bytes of each held-out calibration image, in the fit's order (None: they were not
# files); an int8 export finds them by these in the folder it is given (padim.deploy.quantize)
CALIBRATION_HASHES_KEY = "calibration_images_sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def calibration_image_hashes(images: Sequence) -> Optional[List[str]]:
    """``CALIBRATION_HASHES_KEY`` of a fit: the SHA-256 of each held-out image's file bytes, in order;
    None when one of them is not a file (pixels given in memory: nothing could later prove which) or
    cannot be read here (a cluster's fit whose images only its nodes see): never a failed fit."""
    if not all(isinstance(image, (str, os.PathLike)) for image in images):
        return None
    try:
        return [file_sha256(image) for image in images]
    except OSError:
        return None


def image_names(images: Sequence) -> Optional[List[str]]:
    """``calibration_images`` of a calibration: each picture's path as given, in order; None when one of
    them is not a file (pixels in memory have no name)."""
    if not all(isinstance(image, (str, os.PathLike)) for image in images):
        return None
    return [os.fspath(image) for image in images]


def number_or_none(value) -> bool:
    """None or a finite number (not a bool; an int as large as a float can hold)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)


def layout_record(config: dict) -> dict:
    """What a config's tensor shapes mean, written beside it (``LAYOUT_KEY``)."""
    from padim.settings.options import feature_layout

    spec_layers = config.get("layers")
    if not spec_layers:
        from padim.settings.backbone_table import entry

        spec_layers = entry(config["backbone"]).default_layers
    input_size = tuple(config.get("crop") or config["image_size"])
    tile = config.get("tile")
    layout = feature_layout(config["backbone"], tuple(spec_layers), input_size if tile is None else (tile, tile))
    record = {"backbone": config["backbone"], "layers": list(spec_layers), "input_size": list(input_size),
              "channels": layout.channels, "grid": list(layout.grid)}
    if tile is not None:  # what the tensors hold then: the tiles' positions (stacked) or one shared set
        from padim.settings.config import PadimConfig
        from padim.settings.tile_geometry import fitted_grid

        record.update(tile=tile, grid=list(fitted_grid(PadimConfig.from_dict(config), layout.grid)))
    return record


def check_header(metadata: dict, where: str, refuse: Callable[[str], None]):
    """A header's config, layout record and feature grid against each other; returns (PadimConfig,
    Layout, feature_hw). The config's own errors start with ``where`` (``validate_config_dict``)."""
    from padim.settings.options import config_layout
    from padim.settings.validation import validate_config_dict

    config = validate_config_dict(metadata.get("config"), where)
    layout = config_layout(config)
    if LAYOUT_KEY in metadata and metadata[LAYOUT_KEY] != layout_record(config.to_dict()):
        refuse(f"its config (backbone {config.backbone}, layers {','.join(config.layers)}, input "
               f"{config.input_size[0]}x{config.input_size[1]}) contradicts the layout it was saved with")
    feature_hw = metadata.get("feature_hw")
    if not isinstance(feature_hw, list) or [type(v) for v in feature_hw] != [int, int]:
        refuse(f"feature_hw must be two whole numbers, got {feature_hw!r}")
    if tuple(feature_hw) != layout.grid:
        refuse(f"feature grid {tuple(feature_hw)} does not match {config.backbone} {config.layers[0]} at "
               f"{config.input_size[0]}x{config.input_size[1]} ({layout.grid[0]}x{layout.grid[1]})")
    return config, layout, tuple(feature_hw)


def check_fields(metadata: dict, refuse: Callable[[str], None]) -> None:
    """Thresholds and counts numbers (or null) in range, sources and notes text (or null)."""
    for key in ("image_threshold", "pixel_threshold", "fit_seconds"):
        if not number_or_none(metadata.get(key)):
            refuse(f"{key} must be a number or null, got {metadata.get(key)!r}")
    sources = metadata.get("calibrated_sources")
    if sources is not None and not (isinstance(sources, list) and len(sources) == 2
                                    and all(v is None or isinstance(v, str) for v in sources)):
        refuse(f"calibrated_sources must be two texts or nulls, got {sources!r}")
    for key in ("n_train_images", "n_calibration_images", "folds", "stale_images"):
        value = metadata.get(key)
        if value is not None and (type(value) is not int or value < 0):
            refuse(f"{key} must be a whole number, got {value!r}")
    for key in ("target_fpr", "target_pixel_fpr", "calibration_fraction"):
        value = metadata.get(key)
        if value is not None and not (number_or_none(value) and 0 <= value < 1):
            refuse(f"{key} must be a number in [0, 1), got {value!r}")
    hashes = metadata.get(CALIBRATION_HASHES_KEY)
    if hashes is not None and not (isinstance(hashes, list) and all(isinstance(h, str) and _SHA256.fullmatch(h)
                                                                    for h in hashes)):
        refuse(f"{CALIBRATION_HASHES_KEY} must be a list of SHA-256 digests (64 hexadecimal digits) or null")
    names = metadata.get("calibration_images")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        refuse(f"calibration_images must be a list of texts or null, got {str(names)[:80]}")
    sha = metadata.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        refuse(f"weights_sha256 must be 64 hexadecimal digits, got {sha!r}")
    for key in ("weights_source", "category", "fit_date", "thresholds_note", "package_version", "threshold_source",
                "pixel_threshold_source", "calibration_note", "calibration_method", "thresholds_from",
                "calibration_date", "calibrated_by"):
        if not (metadata.get(key) is None or isinstance(metadata.get(key), str)):
            refuse(f"{key} must be text or null, got {metadata.get(key)!r}")


CALIBRATION_METHODS = ("holdout", "cv")


def calibration_is_valid(scores, levels, quantiles) -> bool:
    """Calibration arrays as ``padim.calibration.Calibration`` needs them: (n,) image scores, n >= 1,
    (Q,) levels and (Q,) quantiles, each finite and sorted ascending (NumPy arrays)."""
    import numpy as np

    return (scores.ndim == 1 and len(scores) >= 1 and levels.ndim == 1 and levels.shape == quantiles.shape
            and all(np.isfinite(a).all() and (np.diff(a) >= 0).all() for a in (scores, levels, quantiles)))

