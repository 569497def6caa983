"""What a padim model file holds, and its checks: tensors (mean, packed factor, channel indices, the
projection of a semi-orthogonal reduction) and a JSON header (configuration, provenance, thresholds), stored with ``padim.files.safetensors_io`` (safetensors, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from padim.settings.calibration import Calibration
from padim.errors import ModelFileError
from padim.files.headers import CALIBRATION_METHODS, calibration_is_valid

from padim.version import __version__
from padim.files import safetensors_io as model_io
from padim.settings.config import PadimConfig

TENSOR_RANKS = {"mean": 2, "precision_factor_packed": 2, "channel_idx": 1}
# optional tensors of a calibrated model -> Calibration attributes
CALIBRATION_TENSORS = {"calibration_image_scores": "image_scores", "calibration_pixel_levels": "pixel_levels",
                       "calibration_pixel_quantiles": "pixel_quantiles"}

# header fields besides the configuration, with their defaults for files that lack them
INFO_DEFAULTS: Dict[str, Any] = {
    "weights_source": None,
    "weights_sha256": None,  # of the backbone weights file, when the model was fitted with one
    "n_train_images": None,
    "fit_seconds": None,
    "fit_date": None,
    "category": None,
    "n_calibration_images": None,
    "calibration_fraction": None,  # the fit's calibration options, so that a loaded model refits alike
    "folds": None,
    "target_pixel_fpr": None,
    "calibration_note": None,  # why a model has no calibration
    "calibration_method": None,  # "holdout" or "cv"
    "calibration_images_sha256": None,  # headers.CALIBRATION_HASHES_KEY: the held-out images' SHA-256
    "calibration_images": None,  # the calibration pictures' names, as given (None: pictures in memory)
    "calibration_date": None,  # when the thresholds were calibrated (at fit, or a later recalibration)
    "calibrated_by": None,  # "fit", "padim recalibrate", "padim serve" (padim.core.recalibration)
    "image_threshold": None,
    "pixel_threshold": None,
    "threshold_source": None,  # e.g. "calibration: target FPR 5% on 76 good images", "manual"
    "pixel_threshold_source": None,
    "target_fpr": None,
    "thresholds_note": None,
    "stale_images": None,  # good images added since the thresholds were calibrated (padim update)
    "calibrated_sources": None,  # [image, pixel] threshold sources as calibrated, before they went stale
    "package_version": None,
}

# header fields a fitted model has as attributes (with a trailing underscore)
FITTED_INFO = ("weights_source", "weights_sha256", "n_train_images", "fit_seconds", "fit_date", "category",
               "n_calibration_images", "calibration_note", "image_threshold", "pixel_threshold", "threshold_source",
               "pixel_threshold_source", "target_fpr", "thresholds_note", "stale_images", "calibrated_sources",
               "package_version", "calibration_images_sha256", "calibration_images", "calibration_date",
               "calibrated_by")


@dataclass
class ModelContent:
    """Everything a model file stores.

    mean: (P, d) float32; factor_packed: (P, d (d + 1) / 2) in ``config.factor_dtype``;
    channel_idx: (k,) int64; feature_hw: (h, w) with P = h * w; info: ``INFO_DEFAULTS``' keys;
    calibration: the calibration images' scores, stored as float64 tensors (n,), (Q,), (Q,);
    projection: (k, d) float32 with reduction "semi-orthogonal" (k = all C channels), else None
    (tensor ``projection``, absent from files of the random reduction and from older files).
    """

    config: PadimConfig
    mean: torch.Tensor
    factor_packed: torch.Tensor
    channel_idx: torch.Tensor
    feature_hw: Tuple[int, int]
    info: Dict[str, Any] = field(default_factory=dict)
    calibration: Optional[Calibration] = None
    projection: Optional[torch.Tensor] = None
    ignore_mask: Optional[torch.Tensor] = None  # (H, W) bool: pixels that never count (tensor ``ignore_mask``)


def write(path, content: ModelContent) -> None:
    """Writes ``content`` atomically to ``path``."""
    tensors = {"mean": content.mean, "precision_factor_packed": content.factor_packed,
               "channel_idx": content.channel_idx}
    if content.projection is not None:
        tensors["projection"] = content.projection.to(torch.float32)
    if content.ignore_mask is not None:
        tensors["ignore_mask"] = content.ignore_mask.to(torch.uint8).cpu()
    info = dict(content.info)
    if content.calibration is not None:
        found = content.calibration
        tensors.update({name: torch.from_numpy(getattr(found, attribute)) for name, attribute in CALIBRATION_TENSORS.items()})
        info["calibration_method"] = found.method
    metadata = {**INFO_DEFAULTS, **info, "package_version": __version__,
                "config": content.config.to_dict(), "feature_hw": list(content.feature_hw)}
    model_io.save(path, tensors, metadata)


def read(path) -> ModelContent:
    """Reads and checks a model file (a path, or its bytes already read: ``safetensors_read.ModelBytes``);
    raises ModelFileError naming the problem. The file is read into memory once and the tensors are
    made from those bytes (views of them on the CPU): changing the file afterwards changes nothing."""
    tensors, meta = model_io.load(path, TENSOR_RANKS)
    config, feature_hw = model_io.verify(path, tensors, meta)  # contents checked against each other, not trusted
    mean, packed, channel_idx = tensors["mean"], tensors["precision_factor_packed"], tensors["channel_idx"]
    info = {key: meta.get(key, default) for key, default in INFO_DEFAULTS.items()}
    ignore = tensors.get("ignore_mask")
    if ignore is not None and (tuple(ignore.shape) != tuple(config.input_size) or ignore.dtype != torch.uint8
                               or bool((ignore > 1).any()) or bool(ignore.all())):
        raise ModelFileError(f"model file {path}: its ignore mask is not a {config.input_size[0]}x"
                             f"{config.input_size[1]} mask of 0 and 1 that leaves pixels to score")
    return ModelContent(config, mean, packed, channel_idx.long(), feature_hw, info, _calibration(path, tensors, info),
                        tensors.get("projection"), None if ignore is None else ignore.bool())


def _calibration(path, tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> Optional[Calibration]:
    """The stored calibration, checked (sorted finite scores, matching quantile arrays); None for
    files without one (fitted without calibration, or before padim had it)."""
    present = [name for name in CALIBRATION_TENSORS if name in tensors]
    if not present:
        return None
    if len(present) != len(CALIBRATION_TENSORS) or info.get("calibration_method") not in CALIBRATION_METHODS:
        raise ModelFileError(f"model file {path}: its calibration data is incomplete")
    # copies: a view would keep the whole file's bytes alive (padim.files.safetensors_read) on a GPU model
    arrays = {attribute: tensors[name].to(torch.float64).numpy().copy()
              for name, attribute in CALIBRATION_TENSORS.items()}
    scores, levels, quantiles = arrays["image_scores"], arrays["pixel_levels"], arrays["pixel_quantiles"]
    if not calibration_is_valid(scores, levels, quantiles):
        raise ModelFileError(f"model file {path}: its calibration data is damaged")
    return Calibration(scores, levels, quantiles, info["calibration_method"])
