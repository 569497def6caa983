"""What a padim model file holds, and its checks: tensors (mean, packed factor, channel indices) and
a JSON header (configuration, provenance, thresholds), stored with ``padim.io`` (safetensors, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch

from . import __version__
from . import io as model_io
from .config import PadimConfig

TENSOR_RANKS = {"mean": 2, "precision_factor_packed": 2, "channel_idx": 1}

# header fields besides the configuration, with their defaults for files that lack them
INFO_DEFAULTS: Dict[str, Any] = {
    "weights_source": None,
    "weights_sha256": None,  # of the backbone weights file, when the model was fitted with one
    "n_train_images": None,
    "fit_seconds": None,
    "fit_date": None,
    "category": None,
    "image_threshold": None,
    "pixel_threshold": None,
    "thresholds_note": None,
    "package_version": None,
}


@dataclass
class ModelContent:
    """Everything a model file stores.

    mean: (P, d) float32; factor_packed: (P, d (d + 1) / 2) in ``config.factor_dtype``;
    channel_idx: (d,) int64; feature_hw: (h, w) with P = h * w; info: ``INFO_DEFAULTS``' keys.
    """

    config: PadimConfig
    mean: torch.Tensor
    factor_packed: torch.Tensor
    channel_idx: torch.Tensor
    feature_hw: Tuple[int, int]
    info: Dict[str, Any] = field(default_factory=dict)


def write(path, content: ModelContent) -> None:
    """Writes ``content`` atomically to ``path``."""
    tensors = {"mean": content.mean, "precision_factor_packed": content.factor_packed,
               "channel_idx": content.channel_idx}
    metadata = {**INFO_DEFAULTS, **content.info, "package_version": __version__,
                "config": content.config.to_dict(), "feature_hw": list(content.feature_hw)}
    model_io.save(path, tensors, metadata)


def read(path) -> ModelContent:
    """Reads and checks a model file; raises ModelFileError naming the problem."""
    tensors, meta = model_io.load(path, TENSOR_RANKS)
    config, feature_hw = model_io.verify(path, tensors, meta)  # contents checked against each other, not trusted
    mean, packed, channel_idx = tensors["mean"], tensors["precision_factor_packed"], tensors["channel_idx"]
    info = {key: meta.get(key, default) for key, default in INFO_DEFAULTS.items()}
    return ModelContent(config, mean, packed, channel_idx.long(), feature_hw, info)
