"""Growing a fitted model: ``partial_fit`` adds good images to its statistics (sums merge exactly),
``attach_statistics`` gives a loaded model its statistics back, ``from_statistics`` makes a model
from statistics alone. No calibration is made here: a model's thresholds are kept but marked stale,
as data (``stale_images``: how many images were added since they were calibrated, and their
sources as calibrated), never parsed back from the text shown to users.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from typing import Any, Dict, Optional, Sequence

import torch

from padim.core.backbones import build_extractor
from padim.core.embedding import PatchEmbedder
from padim.core.fitting import accumulate, build_embedder, fit_statistics, make_embedder
from padim.core.gaussian import GaussianAccumulator, store_factor
from padim.files.memory import release_free_memory
from padim.core.statistics import FitStatistics, StatisticsMismatchError, statistics_like
from padim.errors import DataError, ModelFileError, PadimError
from padim.files import modelfile
from padim.files.images import ImageInput


def partial_fit(model, images: Sequence[ImageInput]):
    """Adds defect-free ``images`` to the model's statistics and refits (scikit-learn's
    convention): the first call on an unfitted model fixes the configuration from the
    parameters; later calls add images with that configuration, whatever the parameters say
    now. The model is usable after each call and equals a ``fit`` on all images so far with
    ``calibration_fraction=0`` (sums merge exactly). No calibration is made here: thresholds a
    model had are kept but marked stale (their source says how many images were added since),
    and its calibration scores are dropped (no p-values, no ``target_fpr`` until a refit).

    A fitted model needs its statistics: ``fit(..., keep_statistics=True)``, a previous
    ``partial_fit``, or ``attach_statistics`` (a loaded model and its statistics file). Memory:
    the new images' sums are built aside and merged, so the old state survives a failure."""
    images = list(images)
    if not images:
        raise DataError("partial_fit needs at least 1 image")
    started = time.perf_counter()
    previous: Optional[FitStatistics] = getattr(model, "statistics_", None)
    if previous is None and hasattr(model, "mean_"):
        raise PadimError("this model's statistics were not kept, so images cannot be added to it: fit with "
                         "keep_statistics=True (padim fit `keep_statistics`), or attach_statistics() its "
                         "statistics file")
    if previous is None and len(images) < 2:
        raise DataError(f"the first partial_fit needs at least 2 images, got {len(images)}")
    with torch.inference_mode():
        if previous is None:
            config = model.make_config()
            embedder, source, sha256 = build_embedder(model, config)
            stats = GaussianAccumulator()
        else:
            config, embedder = model.config_, model.embedder_
            source, sha256 = model.weights_source_, model.weights_sha256_
            stats = GaussianAccumulator(previous.accumulator.chunk, previous.accumulator.shift)
        stats, feature_hw = accumulate(model, embedder, config, images, "partial fit", stats)
        added = fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(images), 0, "partial_fit")
        total = added if previous is None else previous.merge(added)
        del stats, added
    fit_from_statistics(model, total, embedder, started, len(images) if previous is not None else 0)
    return model


def attach_statistics(model, statistics):
    """Gives a fitted (e.g. loaded) model the statistics it was fitted from, so that
    ``partial_fit`` can add images. Refused (one line) when they belong to another configuration
    or other images: their count and mean must be the model's (to float32 precision)."""
    model.check_fitted()
    mine = statistics_like(model)
    mine.check_compatible(statistics, "these statistics with this model")
    if model.n_train_images_ is not None and statistics.n_images != model.n_train_images_:  # tiles counted apart
        raise StatisticsMismatchError(f"these statistics cover {statistics.n_images} images, the model was fitted "
                                      f"on {model.n_train_images_}: they are not this model's")
    mean = statistics.mean().to(model.mean_.device)
    if not torch.allclose(mean.float(), model.mean_.float(), rtol=1e-5, atol=1e-5):
        raise StatisticsMismatchError("these statistics' mean differs from the model's: they are of other images")
    statistics = statistics.to(model.device_)
    model.statistics_ = dataclasses.replace(statistics, config=model.config_)  # the model's sigma, epsilon, dtype
    return model


def from_statistics(cls, statistics, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
                    progress: Optional[bool] = False):
    """A fitted model (no calibration) made from ``statistics`` (see ``padim.core.statistics``), with
    its backbone rebuilt from the recorded weights; refused if they now resolve to others."""
    config = statistics.config
    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in cls._param_names()}
    model = cls(**params, batch_size=batch_size, device=device, workers=workers, progress=progress)
    model.calibration_fraction = 0.0
    device = model.resolve_device()
    extractor, source, sha256 = build_extractor(config.backbone, config.weights, config.layers, config.seed)
    if (statistics.weights_sha256 or sha256) and sha256 != statistics.weights_sha256 or \
            not statistics.weights_sha256 and source != statistics.weights_source:
        raise ModelFileError(f"the statistics were computed with backbone weights '{statistics.weights_source}' "
                             f"but they now resolve to '{source}'")
    embedder = make_embedder(extractor, config, statistics.channel_idx, statistics.projection, None, device)
    fit_from_statistics(model, statistics, embedder, time.perf_counter(), 0)
    return model


def fit_from_statistics(model, statistics, embedder: PatchEmbedder, started: float, n_added: int) -> None:
    """Finalises ``statistics`` (as ``fit`` does: Cholesky per block of positions, then the
    factor in its storage dtype) and swaps the result in whole, keeping the statistics.
    ``n_added``: images added to an already fitted model, whose thresholds become stale."""
    config = statistics.config
    mean, packed = statistics.finalize(release=release_free_memory)
    packed = store_factor(packed, config.factor_dtype)
    fitted = hasattr(model, "mean_")
    info = {"weights_source": statistics.weights_source, "weights_sha256": statistics.weights_sha256,
            "n_train_images": statistics.n_images, "fit_seconds": time.perf_counter() - started,
            "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "calibration_note": "no calibration: fitted incrementally (partial_fit)", "n_calibration_images": 0}
    if fitted:
        info.update(category=model.category_, calibration_fraction=model.calibration_fraction, folds=model.folds,
                    target_pixel_fpr=model.target_pixel_fpr, thresholds_note=model.thresholds_note_,
                    calibration_note=model.calibration_note_)
        stale = stale_thresholds(model, n_added)
        if stale is not None:
            info.update(stale)
    content = modelfile.ModelContent(config, mean.float(), packed, embedder.channel_idx, statistics.feature_hw,
                                     info, None, embedder.projection, getattr(model, "ignore_mask_", None))
    model.set_fitted(content, embedder)
    model.statistics_ = statistics


def stale_thresholds(model, n_added: int) -> Optional[Dict[str, Any]]:
    """Header fields marking a model's thresholds stale after ``n_added`` images were added to its
    statistics: the thresholds stay (they were right for the old Gaussians, and usually close), the
    count of images added since calibration grows (``stale_images``), the sources shown say so
    (built from the sources as calibrated, kept in ``calibrated_sources``), and the calibration
    scores are dropped (they scored the old model)."""
    if not n_added or (model.image_threshold_ is None and model.pixel_threshold_ is None):
        return None
    total = (model.stale_images_ or 0) + n_added
    calibrated = model.calibrated_sources_ or [model.threshold_source_, model.pixel_threshold_source_]
    fields = {"stale_images": total, "calibrated_sources": list(calibrated)}
    for key, original in zip(("threshold_source", "pixel_threshold_source"), calibrated):
        if original is not None:
            fields[key] = f"stale: calibrated before {total} images were added ({original})"
    dropped = "; its calibration scores were dropped" if model.calibration_ is not None else ""
    note = (f"stale calibration: {n_added} good images were added after the thresholds were set{dropped}; "
            "recalibrate with new good pictures (padim recalibrate)")
    return {**fields, "image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
            "target_fpr": model.target_fpr_, "calibration_note": note, "n_calibration_images": 0}
