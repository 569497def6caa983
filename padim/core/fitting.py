"""How a fit runs: the plan of a fit (calibration hold-out or cross-fitting), streaming images into
Gaussian sums, the held-out scores that calibrate, and ``LocalFit``, the runner of a fit in this
process. ``padim.cluster.ray_fit.RayFit`` is the other runner, with the same two methods; ``fit``
takes either and never asks which.

Shapes: P = h * w positions, d channels, (H, W) the model's input size.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from padim.settings import calibration as cal
from padim.core.backbones import build_extractor
from padim.settings.config import PadimConfig
from padim.core.embedding import PatchEmbedder
from padim.core.features import CPU_FORWARD_CHUNK, count_channels, make_reduction
from padim.core.gaussian import GaussianAccumulator, store_factor
from padim.core.scorer import TILE_GROUP_BYTES, PatchScorer, score_pixels
from padim.core.statistics import FitStatistics, now
from padim.core.tiling import embed_size, layout_of
from padim.errors import DataError, PadimError
from padim.files import modelfile
from padim.files.headers import CALIBRATION_HASHES_KEY, calibration_image_hashes, image_names
from padim.files.images import ImageInput, load_ignore_mask, pixel_batches
from padim.files.memory import release_free_memory
from padim.pipeline.predict import iter_scored


class LocalFit:
    """Runs a fit's two heavy steps in this process, on the estimator's device."""

    def __init__(self, embedder: PatchEmbedder):
        self.embedder = embedder

    def statistics_and_factors(self, model, config: PadimConfig, images: Sequence, source: str,
                               sha256: Optional[str], keep: bool, cross_fit_images: Optional[Sequence] = None):
        """-> mean (P, d) float64, packed factor (P, d (d + 1) / 2), the accumulator (its sums kept
        only with ``keep``), feature grid (h, w), and the cross-fitted Calibration of
        ``cross_fit_images`` (None without)."""
        stats, feature_hw = accumulate(model, self.embedder, config, images, "fit")
        calibration = None
        if cross_fit_images is not None:
            calibration = cross_fit(model, self.embedder, config, cross_fit_images, stats, feature_hw)
        mean, packed = stats.finalize(config.epsilon, release=release_free_memory,  # (P, d), (P, d (d + 1) / 2)
                                      keep=keep, covariance=config.covariance)
        return mean, packed, stats, feature_hw, calibration

    def held_out_scores(self, model, images: Sequence, mean: torch.Tensor, packed: torch.Tensor, feature_hw):
        return held_out_scores(model, images, mean, packed, feature_hw, self.embedder)


def fit_model(model, images: Sequence, keep_statistics: bool, runner=None):
    """``PaDiM.fit``: builds the fitted state aside (``runner``: where the heavy steps run, a
    ``LocalFit`` by default) and swaps it into ``model`` only when all of it succeeded."""
    images = list(images)
    if len(images) < 2:
        raise DataError(f"PaDiM needs at least 2 training images, got {len(images)}")
    started = time.perf_counter()
    config = model.make_config()
    n_calibration, note = calibration_plan(model, len(images))
    embedder, source, sha256 = build_embedder(model, config)
    runner = runner if runner is not None else LocalFit(embedder)
    ignore = ignored(model, config)
    held_out, fit_images = [], images
    if n_calibration and model.calibration == "holdout":
        fit_indices, calibration_indices = cal.split_indices(len(images), n_calibration, config.seed)
        fit_images = [images[i] for i in fit_indices]
        held_out = [images[i] for i in calibration_indices]
    cross = images if n_calibration and model.calibration == "cv" else None
    with torch.inference_mode():
        mean, packed, stats, feature_hw, calibration = runner.statistics_and_factors(
            model, config, fit_images, source, sha256, keep_statistics, cross)
        kept = fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(fit_images),
                              len(held_out), "fit") if keep_statistics else None
        del stats
        release_free_memory()
        packed = store_factor(packed, config.factor_dtype)
        if held_out:
            scores, maps = runner.held_out_scores(model, held_out, mean.float(), packed, feature_hw)
            calibration = cal.Calibration.from_scores(scores, maps, "holdout", ignore)
    info = {"weights_source": source, "weights_sha256": sha256, "n_train_images": len(fit_images),
            "calibration_fraction": float(model.calibration_fraction), "folds": model.folds,
            "target_pixel_fpr": float(model.target_pixel_fpr),
            "n_calibration_images": calibration.n if calibration else 0, "calibration_note": note,
            CALIBRATION_HASHES_KEY: calibration_image_hashes(held_out),  # what an int8 export must find again
            "fit_seconds": time.perf_counter() - started,
            "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if calibration is not None:
        info.update(calibrated_by="fit", calibration_date=info["fit_date"],
                    calibration_images=image_names(held_out if held_out else images))
        point = cal.operating_point(calibration, cal.OperatingPoint(), model.target_fpr,
                                    target_pixel_fpr=model.target_pixel_fpr)
        info.update(image_threshold=point.image_threshold, pixel_threshold=point.pixel_threshold,
                    threshold_source=point.source, pixel_threshold_source=point.pixel_source,
                    target_fpr=point.target_fpr)
    content = modelfile.ModelContent(config, mean.float(), packed, embedder.channel_idx, feature_hw, info, calibration,
                                     embedder.projection, None if ignore is None else torch.from_numpy(ignore))
    return content, embedder, kept


def calibration_plan(model, n_images: int) -> Tuple[int, Optional[str]]:
    """How many images calibrate (0: none) and a note for the user when there will be none.
    Refuses, before any work, calibration options that make no sense."""
    if model.calibration not in ("holdout", "cv"):
        raise PadimError(f"calibration must be 'holdout' or 'cv', got {model.calibration!r}")
    if not isinstance(model.folds, int) or model.folds < 2:
        raise PadimError(f"folds must be a whole number of at least 2, got {model.folds!r}")
    if model.calibration == "cv" and model.folds > n_images:
        raise PadimError(f"{model.folds} folds need at least as many training images, got {n_images}")
    for name in ("target_fpr", "target_pixel_fpr"):
        value = getattr(model, name)
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise PadimError(f"{name} must be in (0, 1), got {value!r}")
    n_calibration = cal.calibration_size(n_images, float(model.calibration_fraction))
    if model.calibration == "cv" and model.calibration_fraction:
        if n_images < max(model.folds, cal.MIN_CALIBRATION_IMAGES):
            return 0, (f"no calibration: cross-fitting needs at least {max(model.folds, cal.MIN_CALIBRATION_IMAGES)} "
                       f"training images, got {n_images}; the model has no calibrated threshold")
        n_calibration = n_images
    if model.calibration_fraction and not n_calibration:
        return 0, (f"no calibration: {n_images} training images are too few to hold out "
                   f"{cal.MIN_CALIBRATION_IMAGES} (needs at least {2 * cal.MIN_CALIBRATION_IMAGES}); fitted on all "
                   "of them, the model has no calibrated threshold (give thresholds by hand, or add good images)")
    return n_calibration, None


def accumulate(model, embedder: PatchEmbedder, config: PadimConfig, images, desc: str,
               stats: Optional[GaussianAccumulator] = None, keep: Optional[list] = None):
    """Streams ``images`` through the embedder into ``stats`` (a new accumulator by default);
    with ``keep``, also appends each batch's (B, h, w, d) embeddings to it. -> (stats, (h, w))."""
    stats = stats if stats is not None else GaussianAccumulator()
    feature_hw, tiles = None, layout_of(config)
    desc = desc if tiles is None else f"{desc} ({len(tiles)} tiles per image)"
    for pixels, _ in pixel_batches(images, config, model.batch_size, embedder.device, model.workers, model.progress,
                                   desc):
        pixels = pixels.to(embedder.device)
        if tiles is not None and tiles.shared and keep is None:  # every tile a sample: streamed, group by group
            for _, _, emb in embedder.tile_groups(pixels, TILE_GROUP_BYTES):
                feature_hw = tuple(emb.shape[1:3])
                stats.update(emb.flatten(1, 2))  # (B g, P, d)
            release_free_memory()
            continue
        emb = embedder(pixels)  # (B, h, w, d); tiled: see PatchEmbedder
        feature_hw = tuple(emb.shape[1:3])
        stats.update(emb.flatten(1, 2))  # (B, P, d)
        if keep is not None:
            keep.append(emb.clone())
        del emb
        release_free_memory()
    return stats, feature_hw


def build_embedder(model, config: Optional[PadimConfig] = None) -> Tuple[PatchEmbedder, str, Optional[str]]:
    """The ``PatchEmbedder`` of a new fit: the frozen backbone and channel reduction (subset or
    projection) of ``config`` (default: the estimator's parameters'), with its tiles and the
    estimator's ignore mask, on its device -> (embedder, weights source, weights file SHA-256 or None)."""
    config = config if config is not None else model.make_config()
    device = model.resolve_device()
    extractor, source, sha256 = build_extractor(config.backbone, config.weights, config.layers, config.seed)
    extractor = extractor.to(device, memory_format=torch.channels_last)
    n_channels = count_channels(extractor, embed_size(config), device)
    channel_idx, projection = make_reduction(n_channels, config.n_features, config.seed, config.reduction)
    ignore = ignored(model, config)
    return (make_embedder(extractor, config, channel_idx, projection, None if ignore is None else torch.from_numpy(ignore),
                          device), source, sha256)


def statistics(model, images: Sequence[ImageInput], shift: Optional[torch.Tensor] = None,
               desc: str = "statistics"):
    """The ``padim.core.statistics.FitStatistics`` of ``images`` under these parameters: sums only,
    no factor, no calibration (what one shard of a distributed fit computes; merging disjoint
    shards' statistics and finalising them equals a fit on all the images with
    ``calibration_fraction=0``). ``shift``: (P, d) to take the sums around (default: the first
    batch's mean). Does not change this estimator."""
    images = list(images)
    if not images:
        raise DataError("statistics need at least 1 image")
    config = model.make_config()
    embedder, source, sha256 = build_embedder(model, config)
    with torch.inference_mode():
        stats, feature_hw = accumulate(model, embedder, config, images, desc, GaussianAccumulator(shift=shift))
    return fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(images), 0, "statistics")


def held_out_scores(model, images: Sequence[ImageInput], mean: torch.Tensor, packed: torch.Tensor,
                    feature_hw: Tuple[int, int], embedder: Optional[PatchEmbedder] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Scores held-out good images with given Gaussians (what calibration is made of) -> image scores
    (n,) and anomaly maps (n, H, W), float32: decoded and scored as ``predict`` does (``iter_scored``,
    ``PatchScorer``), so a threshold is computed by the code that computes the scores it judges.

    mean: (P, d) float32; packed: (P, d (d + 1) / 2) factor, unpacked block by block (the fit's peak
    memory is not raised); embedder: default ``build_embedder()``. Small batches on the CPU."""
    config = model.make_config()
    embedder = embedder if embedder is not None else build_embedder(model, config)[0]
    device = embedder.device
    engine = _HeldOut(config, PatchScorer(embedder, mean.to(device), packed.to(device), feature_hw, config.sigma),
                      min(model.batch_size, CPU_FORWARD_CHUNK) if device.type == "cpu" else model.batch_size,
                      model.workers, model.progress)
    scores, maps = [], []
    for batch_scores, batch_maps, _, _ in iter_scored(engine, images, "calibrate", ahead=int(device.type != "cpu")):
        scores.append(batch_scores)
        maps.append(batch_maps)
    return np.concatenate(scores), np.concatenate(maps)


class _HeldOut:
    """A fit's Gaussians as an engine (``config_``, ``score_pixels``, batch settings) for ``iter_scored``."""

    def __init__(self, config: PadimConfig, scorer: PatchScorer, batch_size: int, workers: int, progress):
        self.config_, self.scorer, self.batch_size, self.workers, self.progress = (config, scorer, batch_size,
                                                                                   workers, progress)

    def score_pixels(self, pixels):
        return score_pixels(self.scorer, pixels)


def cross_fit(model, embedder, config, images, total: GaussianAccumulator, feature_hw) -> cal.Calibration:
    """Scores each of ``folds`` seeded folds with the statistics of the other folds (``total``
    less the fold's own sums) -> the Calibration of all images. One more backbone pass over the
    training images; a fold's embeddings are held while it is scored (N / folds x P x d floats), and
    scored by ``PatchScorer``'s own steps after the embedding (``score_embeddings``)."""
    order = np.random.default_rng(config.seed).permutation(len(images))
    scores, maps = [], []
    for fold in np.array_split(order, model.folds):
        kept = []
        part, _ = accumulate(model, embedder, config, [images[i] for i in sorted(fold)], "cross-fit",
                             GaussianAccumulator(total.chunk, total.shift), kept)
        mean, packed = total.without(part).finalize(config.epsilon, release=release_free_memory,
                                                    covariance=config.covariance)
        scorer = PatchScorer(embedder, mean.float(), packed, feature_hw, config.sigma)
        for emb in kept:
            batch_maps, batch_scores = scorer.score_embeddings(emb)
            scores.append(batch_scores.cpu())
            maps.append(batch_maps.cpu())
        del kept, part, packed, scorer
        release_free_memory()
    return cal.Calibration.from_scores(torch.cat(scores).numpy(), torch.cat(maps).numpy(), "cv", ignored(model, config))


def fit_statistics(config, embedder, feature_hw, stats, source, sha256, n_images: int, n_held_out: int, how: str):
    """The ``FitStatistics`` of a fit's accumulator, saying which images the sums cover."""
    covers = f"{n_images} images ({how})"
    if n_held_out:
        covers = (f"the {n_images} training images the Gaussians were fitted on ({how}); the {n_held_out} held out "
                  "for calibration are not included")
    history = [{"how": how, "n_images": n_images, "date": now()}]
    projection = None if embedder.projection is None else embedder.projection.cpu()
    return FitStatistics(config, embedder.channel_idx.cpu(), tuple(feature_hw), stats, source, sha256, covers, history,
                         projection)


def make_embedder(extractor, config: PadimConfig, channel_idx: torch.Tensor, projection: Optional[torch.Tensor],
                  ignore: Optional[torch.Tensor], device) -> PatchEmbedder:
    """The ``PatchEmbedder`` of a configuration: every fit, load and statistics file makes its
    embedder here (the extractor, its reduction, tiles and ignore mask, on ``device``)."""
    return PatchEmbedder(extractor.to(device, memory_format=torch.channels_last), channel_idx.to(device),
                         None if projection is None else projection.to(device), config.input_size, config.mean,
                         config.std, layout_of(config), ignore).eval()


def ignored(model, config) -> Optional[np.ndarray]:
    """(H, W) bool, the estimator's ignore mask at the model's input size; None without one."""
    mask = getattr(model, "ignore_mask", None)
    return None if mask is None else load_ignore_mask(mask, config.input_size)
