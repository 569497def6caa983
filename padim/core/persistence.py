"""A fitted model to and from its file: ``save_model`` and ``load_model`` (safetensors + JSON through
``padim.files.modelfile``, no pickle), and where a model fitted with a weights file finds it again.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import torch

from padim.settings import calibration as cal
from padim.core.backbones import build_extractor
from padim.files.digests import file_sha256
from padim.settings.backbone_table import is_weights_file
from padim.core.fitting import make_embedder
from padim.settings.options import check_batch_size
from padim.errors import ModelFileError, PadimError, WeightsUnavailableError
from padim.files import modelfile


def save_model(model, path) -> None:
    """Writes ``model``'s fitted state atomically (see ``padim.files.modelfile``)."""
    model.check_fitted()
    info = {key: getattr(model, f"{key}_", None) for key in modelfile.INFO_DEFAULTS}
    modelfile.write(path, modelfile.ModelContent(model.config_, model.mean_, model.precision_factor_packed_,
                                                 model.channel_idx_, model.feature_hw_, info, model.calibration_,
                                                 model.projection_, getattr(model, "ignore_mask_", None)))


def load_model(cls, path, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
         progress: Optional[bool] = False, weights: Optional[str] = None):
    """Reads a model file (no pickle) and rebuilds its backbone with the same weights.

    weights: for a model fitted with a weights file, where that file is now (it must be the same
    file: its SHA-256, stored at fit, is checked); default: where it was at fit.
    """
    check_batch_size(batch_size)  # before the file is read
    content = modelfile.read(path)
    config = content.config
    if is_weights_file(config.weights):
        config = dataclasses.replace(config, weights=locate_weights_file(path, config.weights, content.info, weights))
    elif weights is not None and str(weights) != config.weights:
        raise PadimError(f"model file {path} was fitted with {config.weights!r} backbone weights; "
                         "weights= only points a model fitted with a weights file at that file")
    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in cls._param_names()}
    model = cls(**params, batch_size=batch_size, device=device, workers=workers, progress=progress)
    fitted_with = {name: content.info.get(name) for name in ("calibration_fraction", "folds", "target_pixel_fpr")}
    model.set_params(**{name: value for name, value in fitted_with.items() if value is not None})
    if content.ignore_mask is not None:  # so that clone() refits with it
        model.set_params(ignore_mask=content.ignore_mask.numpy())
    if content.calibration is not None:  # what it was fitted with, so that clone() refits alike
        model.set_params(calibration=content.calibration.method,
                         target_fpr=content.info.get("target_fpr") or cal.DEFAULT_TARGET_FPR)
    device = model.resolve_device()
    extractor, source, _ = build_extractor(config.backbone, config.weights, config.layers, config.seed)
    if not is_weights_file(config.weights) and source != content.info.get("weights_source"):
        raise ModelFileError(
            f"model file {path} was fitted with backbone weights '{content.info.get('weights_source')}' "
            f"but they now resolve to '{source}'"
        )
    embedder = make_embedder(extractor, config, content.channel_idx, content.projection, content.ignore_mask, device)
    content.config = config
    model.set_fitted(content, embedder)
    return model


def locate_weights_file(model_path, fitted_path: str, info: dict, given: Optional[str]) -> str:
    """The absolute path of the weights file to rebuild a model's backbone from: ``given`` or the
    path recorded at fit, refused unless its SHA-256 is the one recorded at fit."""
    candidate = os.path.abspath(str(given if given is not None else fitted_path))
    expected = info.get("weights_sha256")
    if expected is None:  # files written before the full hash was stored: the prefix in the source
        found = re.search(r"sha256 ([0-9a-f]{16})", str(info.get("weights_source")))
        expected = found.group(1) if found else None
    if expected is None:
        raise ModelFileError(f"model file {model_path} records no checksum of its backbone weights file")
    if not os.path.isfile(candidate):
        raise WeightsUnavailableError(
            f"model file {model_path} was fitted with the backbone weights file {fitted_path}, which is not "
            f"there{'' if given is None else f' (nor at {candidate})'}: pass where it is now "
            "(PaDiM.load(..., weights=PATH); padim test/predict `weights` PATH)")
    actual = file_sha256(candidate)
    if not actual.startswith(expected):
        raise WeightsUnavailableError(
            f"weights file {candidate} (sha256 {actual[:16]}) is not the file model {model_path} was fitted "
            f"with (sha256 {expected[:16]})")
    return candidate
