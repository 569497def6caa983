"""The PaDiM estimator: fit per-patch Gaussians on defect-free images, score new images.

    model = PaDiM(backbone="resnet18").fit(train_paths)
    result = model.predict(test_paths)   # result.scores (N,), result.maps (N, H, W)
    model.save("bottle.safetensors"); PaDiM.load("bottle.safetensors")

This module is the estimator only: its parameters, fit, predict and the mapping to and from model
files. Features live in ``features``, statistics in ``gaussian``, scoring in ``scoring``, decoding in
``images`` and the file format in ``modelfile``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import calibration as cal
from . import modelfile
from .backbones import build_extractor, file_sha256, get_spec, is_weights_file
from .checks import check_batch_size, check_estimator, pair
from .config import COVARIANCE_EPSILON, PadimConfig
from .errors import DataError, ModelFileError, NotFittedError, PadimError, WeightsUnavailableError
from .features import CPU_FORWARD_CHUNK, Embedder, count_channels, make_reduction
from .gaussian import GaussianAccumulator, store_factor, unpack_lower
from .images import ImageInput, input_batches, to_input
from .memory import release_free_memory
from .scoring import PadimResult, score_batches, score_embeddings, to_original_resolution

__all__ = ["PaDiM", "PadimResult", "to_original_resolution", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PaDiM:
    """PaDiM (Defard et al. 2020) with a scikit-learn style interface.

    Parameters are stored as given (``get_params``/``set_params``, and ``sklearn.base.clone``, work);
    ``fit`` and ``load`` set the trailing-underscore attributes, all at once and only on success, so a
    failed refit leaves the previous model whole: ``config_``, ``device_``, ``mean_`` (P, d),
    ``precision_factor_packed_`` (P, d (d + 1) / 2, in ``factor_dtype``): the lower triangle of the
    factor W with W^T W = cov^-1 (``precision_factor_`` unpacks it to (P, d, d) for scoring),
    ``channel_idx_`` (k,) and ``projection_`` (k, d) or None (see ``padim.features.make_reduction``),
    ``feature_hw_`` (h, w) with P = h * w, ``n_train_images_``,
    ``weights_source_``, ``weights_sha256_``, ``fit_seconds_``, ``fit_date_``, ``category_``;
    ``calibration_`` (a ``padim.calibration.Calibration``, or None) and the operating point in use:
    ``image_threshold_`` / ``pixel_threshold_`` with their sources ``threshold_source_`` /
    ``pixel_threshold_source_`` and ``target_fpr_`` (see ``set_operating_point``).

    Calibration (``calibration_fraction``, default 0.1, at least 20 images): a seeded part of the
    training images is held out, the Gaussians are fitted on the rest, and the held-out images'
    scores set the image threshold at ``target_fpr`` with a split-conformal guarantee (see
    ``padim.calibration``) and the pixel threshold at ``target_pixel_fpr`` of their pixels.
    ``calibration="cv"`` instead scores each of ``folds`` folds with the statistics of the others
    (total minus the fold: sums subtract exactly) and fits the final model on every image.

    Where it departs from scikit-learn: ``predict`` returns a ``PadimResult`` with the scores and
    anomaly maps as well as labels, because a defect's location is half of the answer; labels exist
    only once a threshold is set, because PaDiM's scores have no natural cut.

    Accuracy options (issue 15; the defaults are the paper's): ``reduction="semi-orthogonal"`` makes
    the d embedding channels a seeded orthonormal projection of all channels (Kim et al. 2021)
    instead of d random ones; ``covariance="oas"`` or ``"ledoit-wolf"`` shrinks each covariance by
    an amount estimated from the data instead of adding ``epsilon`` (see ``GaussianAccumulator.finalize``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "imagenet",
        layers: Optional[Sequence[str]] = None,
        n_features: Optional[int] = None,
        image_size: Union[int, Tuple[int, int]] = 256,
        crop: Union[int, Tuple[int, int], None] = None,
        seed: int = 0,
        sigma: float = 4.0,
        epsilon: float = COVARIANCE_EPSILON,
        factor_dtype: str = "float32",
        reduction: str = "random",
        covariance: str = "fixed",
        calibration_fraction: float = cal.DEFAULT_CALIBRATION_FRACTION,
        calibration: str = "holdout",
        folds: int = 5,
        target_fpr: float = cal.DEFAULT_TARGET_FPR,
        target_pixel_fpr: float = cal.DEFAULT_TARGET_PIXEL_FPR,
        batch_size: int = 32,
        device: Optional[str] = None,
        workers: int = 2,
        progress: Optional[bool] = False,
    ):
        self.backbone = backbone
        self.weights = weights
        self.layers = layers
        self.n_features = n_features
        self.image_size = image_size
        self.crop = crop
        self.seed = seed
        self.sigma = sigma
        self.epsilon = epsilon
        self.factor_dtype = factor_dtype
        self.reduction = reduction
        self.covariance = covariance
        self.calibration_fraction = calibration_fraction
        self.calibration = calibration
        self.folds = folds
        self.target_fpr = target_fpr
        self.target_pixel_fpr = target_pixel_fpr
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.progress = progress  # False: never; None: only on a terminal; True: always

    # ----------------------------------------------------------------------------- parameters
    # Written out rather than inheriting sklearn.base.BaseEstimator: the same protocol (clone works),
    # without adding scikit-learn's 2 s import to every ``import padim``.
    @classmethod
    def _param_names(cls) -> List[str]:
        return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

    def get_params(self, deep: bool = True) -> Dict[str, Any]:
        """The constructor's parameters as set (scikit-learn's protocol; ``deep`` has nothing to recurse)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> "PaDiM":
        """Sets constructor parameters; they take effect at the next ``fit``."""
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"unknown PaDiM parameter(s) {', '.join(unknown)}; valid: {', '.join(self._param_names())}")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if value != defaults.get(name)]
        return f"{type(self).__name__}({', '.join(changed)})"

    def _make_config(self) -> PadimConfig:
        check_estimator(self)  # every parameter (d, seed, batch size, sizes, sigma, memory) before any work
        spec = get_spec(self.backbone)
        image_size, crop = pair(self.image_size, "image_size"), pair(self.crop, "crop")
        weights = str(self.weights)
        if is_weights_file(weights):
            weights = os.path.abspath(weights)  # where it was; a moved model is pointed at it with load(weights=)
        return PadimConfig(
            backbone=self.backbone,
            weights=weights,
            layers=tuple(self.layers) if self.layers else spec.default_layers,
            n_features=self.n_features or spec.default_d,
            image_size=image_size,
            crop=crop,
            seed=int(self.seed),
            sigma=float(self.sigma),
            epsilon=float(self.epsilon),
            factor_dtype=self.factor_dtype,
            reduction=self.reduction,
            covariance=self.covariance,
        )

    def _resolve_device(self) -> torch.device:
        device = torch.device(self.device or default_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PadimError("--device cuda was asked for but CUDA is not available here")
        return device

    # ----------------------------------------------------------------------------- fitted state
    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise NotFittedError("this PaDiM model is not fitted yet: call fit() or PaDiM.load() first")

    def _set_fitted(self, content: modelfile.ModelContent, embedder: Embedder) -> None:
        """Swaps in a whole fitted state (nothing here can fail half-way)."""
        info = {**modelfile.INFO_DEFAULTS, **content.info}
        self.config_ = content.config
        self.device_ = embedder.device
        self.embedder_ = embedder
        self.mean_ = content.mean.to(embedder.device)
        self.precision_factor_packed_ = content.factor_packed.to(embedder.device)
        self._precision_factor = None  # the unpacked cache of the previous fit, if any
        self.channel_idx_ = embedder.channel_idx
        self.projection_ = embedder.projection
        self.feature_hw_ = tuple(content.feature_hw)
        self.weights_source_ = info["weights_source"]
        self.weights_sha256_ = info["weights_sha256"]
        self.n_train_images_ = info["n_train_images"]
        self.fit_seconds_ = info["fit_seconds"]
        self.fit_date_ = info["fit_date"]
        self.category_ = info["category"]
        self.calibration_ = content.calibration
        self.n_calibration_images_ = info["n_calibration_images"]
        self.calibration_note_ = info["calibration_note"]
        self.image_threshold_ = info["image_threshold"]
        self.pixel_threshold_ = info["pixel_threshold"]
        self.threshold_source_ = info["threshold_source"]
        self.pixel_threshold_source_ = info["pixel_threshold_source"]
        self.target_fpr_ = info["target_fpr"]
        self.thresholds_note_ = info["thresholds_note"]
        self.package_version_ = info["package_version"]
        if self.image_threshold_ is not None and self.threshold_source_ is None:  # files from before calibration
            self.threshold_source_ = self.pixel_threshold_source_ = cal.SOURCE_TEST_SET

    @property
    def extractor_(self) -> torch.nn.Module:
        """The frozen backbone prefix: (B, 3, H, W) -> list of (B, C_l, h_l, w_l)."""
        self._check_fitted()
        return self.embedder_.extractor

    @property
    def precision_factor_(self) -> torch.Tensor:
        """(P, d, d) lower-triangular float32 factor, unpacked on first use (scoring) and kept. A fit
        never needs it whole, so fitting wide backbones (d = 550) holds only the packed half."""
        self._check_fitted()
        if self._precision_factor is None:
            self._precision_factor = unpack_lower(self.precision_factor_packed_, self.config_.n_features, torch.float32)
        return self._precision_factor

    @property
    def uses_random_weights(self) -> bool:
        return str(self.weights) == "random"

    # ----------------------------------------------------------------------------- fit
    def fit(self, images: Sequence[ImageInput], keep_statistics: bool = False, cluster=None) -> "PaDiM":
        """Fits one Gaussian per patch position on defect-free ``images`` (paths, PIL images or
        uint8 arrays) and calibrates its thresholds on good images it did not fit on (see the class
        docstring). Embeddings are streamed into running sums: memory does not grow with N.
        The new state is built aside and replaces the old one only when the whole fit succeeded.
        ``keep_statistics``: keep the sums as ``statistics_`` (a ``padim.statistics.FitStatistics``
        of the images the Gaussians were fitted on) for ``partial_fit`` or saving; else None. The
        sums are then held beside the factor: the fit's peak grows by their size (P d (d + 3) / 2 float64).
        ``cluster``: computes the statistics, factors and calibration scores elsewhere (a
        ``padim.ray_fit.RayFit``: shards on a Ray cluster); the result equals the local fit."""
        images = list(images)
        if len(images) < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {len(images)}")
        started = time.perf_counter()
        config = self._make_config()
        n_calibration, note = self._calibration_plan(len(images))
        if cluster is not None and n_calibration and self.calibration == "cv":
            raise PadimError("calibration 'cv' is not available on a cluster yet: use 'holdout' (the default)")
        device = self._resolve_device()
        embedder, source, sha256 = self.build_embedder(config)

        held_out = []
        fit_images = images
        if n_calibration and self.calibration == "holdout":
            fit_indices, calibration_indices = cal.split_indices(len(images), n_calibration, config.seed)
            fit_images = [images[i] for i in fit_indices]
            held_out = [images[i] for i in calibration_indices]
        with torch.inference_mode():
            calibration = None
            if cluster is None:
                stats, feature_hw = self._accumulate(embedder, config, device, fit_images, "fit")
                if n_calibration and self.calibration == "cv":
                    calibration = self._cross_fit(embedder, config, device, images, stats, feature_hw)
                mean, packed = stats.finalize(config.epsilon, release=release_free_memory,  # (P, d), (P, d (d + 1) / 2)
                                              keep=keep_statistics, covariance=config.covariance)
            else:
                mean, packed, stats, feature_hw = cluster.statistics_and_factors(self, config, fit_images, source,
                                                                                 sha256, keep_statistics)
            kept = _fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(fit_images),
                                   len(held_out), "fit") if keep_statistics else None
            del stats
            release_free_memory()
            packed = store_factor(packed, config.factor_dtype)
            if held_out:
                scores, maps = (self.held_out_scores(held_out, mean.float(), packed, feature_hw, embedder)
                                if cluster is None else
                                cluster.held_out_scores(self, held_out, mean.float(), packed, feature_hw))
                calibration = cal.Calibration.from_scores(scores, maps, "holdout")
        info = {"weights_source": source, "weights_sha256": sha256, "n_train_images": len(fit_images),
                "calibration_fraction": float(self.calibration_fraction), "folds": self.folds,
                "target_pixel_fpr": float(self.target_pixel_fpr),
                "n_calibration_images": calibration.n if calibration else 0, "calibration_note": note,
                "fit_seconds": time.perf_counter() - started,
                "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if calibration is not None:
            point = cal.operating_point(calibration, cal.OperatingPoint(), self.target_fpr,
                                        target_pixel_fpr=self.target_pixel_fpr)
            info.update(image_threshold=point.image_threshold, pixel_threshold=point.pixel_threshold,
                        threshold_source=point.source, pixel_threshold_source=point.pixel_source,
                        target_fpr=point.target_fpr)
        content = modelfile.ModelContent(config, mean.float(), packed, embedder.channel_idx, feature_hw, info, calibration,
                                         embedder.projection)
        self._set_fitted(content, embedder)
        self.statistics_ = kept
        return self

    # ----------------------------------------------------------------------------- incremental fits
    def partial_fit(self, images: Sequence[ImageInput]) -> "PaDiM":
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
        from .statistics import FitStatistics

        images = list(images)
        if not images:
            raise DataError("partial_fit needs at least 1 image")
        started = time.perf_counter()
        previous: Optional[FitStatistics] = getattr(self, "statistics_", None)
        if previous is None and hasattr(self, "mean_"):
            raise PadimError("this model's statistics were not kept, so images cannot be added to it: fit with "
                             "keep_statistics=True (padim fit --keep-statistics), or attach_statistics() its "
                             "statistics file")
        if previous is None and len(images) < 2:
            raise DataError(f"the first partial_fit needs at least 2 images, got {len(images)}")
        with torch.inference_mode():
            if previous is None:
                config = self._make_config()
                device = self._resolve_device()
                embedder, source, sha256 = self.build_embedder(config)
                stats = GaussianAccumulator()
            else:
                config, embedder, device = self.config_, self.embedder_, self.device_
                source, sha256 = self.weights_source_, self.weights_sha256_
                stats = GaussianAccumulator(previous.accumulator.chunk, previous.accumulator.shift)
            stats, feature_hw = self._accumulate(embedder, config, device, images, "partial fit", stats)
            added = _fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(images), 0, "partial_fit")
            total = added if previous is None else previous.merge(added)
            del stats, added
        self._fit_from_statistics(total, embedder, started, len(images) if previous is not None else 0)
        return self

    def attach_statistics(self, statistics) -> "PaDiM":
        """Gives a fitted (e.g. loaded) model the statistics it was fitted from, so that
        ``partial_fit`` can add images. Refused (one line) when they belong to another configuration
        or other images: their count and mean must be the model's (to float32 precision)."""
        from .statistics import StatisticsMismatchError, _fit_statistics_like

        self._check_fitted()
        mine = _fit_statistics_like(self)
        mine.check_compatible(statistics, "these statistics with this model")
        if self.n_train_images_ is not None and statistics.count != self.n_train_images_:
            raise StatisticsMismatchError(f"these statistics cover {statistics.count} images, the model was fitted "
                                          f"on {self.n_train_images_}: they are not this model's")
        mean = statistics.mean().to(self.mean_.device)
        if not torch.allclose(mean.float(), self.mean_.float(), rtol=1e-5, atol=1e-5):
            raise StatisticsMismatchError("these statistics' mean differs from the model's: they are of other images")
        statistics = statistics.to(self.device_)
        self.statistics_ = dataclasses.replace(statistics, config=self.config_)  # the model's sigma, epsilon, dtype
        return self

    @classmethod
    def from_statistics(cls, statistics, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
                        progress: Optional[bool] = False) -> "PaDiM":
        """A fitted model (no calibration) made from ``statistics`` (see ``padim.statistics``), with
        its backbone rebuilt from the recorded weights; refused if they now resolve to others."""
        config = statistics.config
        params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in cls._param_names()}
        model = cls(**params, batch_size=batch_size, device=device, workers=workers, progress=progress)
        model.calibration_fraction = 0.0
        device = model._resolve_device()
        extractor, source, sha256 = build_extractor(config.backbone, config.weights, config.layers, config.seed)
        if (statistics.weights_sha256 or sha256) and sha256 != statistics.weights_sha256 or \
                not statistics.weights_sha256 and source != statistics.weights_source:
            raise ModelFileError(f"the statistics were computed with backbone weights '{statistics.weights_source}' "
                                 f"but they now resolve to '{source}'")
        projection = None if statistics.projection is None else statistics.projection.to(device)
        embedder = Embedder(extractor.to(device, memory_format=torch.channels_last),
                            statistics.channel_idx.to(device), device, projection)
        model._fit_from_statistics(statistics, embedder, time.perf_counter(), 0)
        return model

    def _fit_from_statistics(self, statistics, embedder: Embedder, started: float, n_added: int) -> None:
        """Finalises ``statistics`` (as ``fit`` does: Cholesky per block of positions, then the
        factor in its storage dtype) and swaps the result in whole, keeping the statistics.
        ``n_added``: images added to an already fitted model, whose thresholds become stale."""
        config = statistics.config
        mean, packed = statistics.finalize(release=release_free_memory)
        packed = store_factor(packed, config.factor_dtype)
        fitted = hasattr(self, "mean_")
        info = {"weights_source": statistics.weights_source, "weights_sha256": statistics.weights_sha256,
                "n_train_images": statistics.count, "fit_seconds": time.perf_counter() - started,
                "fit_date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "calibration_note": "no calibration: fitted incrementally (partial_fit)", "n_calibration_images": 0}
        if fitted:
            info.update(category=self.category_, calibration_fraction=self.calibration_fraction, folds=self.folds,
                        target_pixel_fpr=self.target_pixel_fpr, thresholds_note=self.thresholds_note_,
                        calibration_note=self.calibration_note_)
            stale = _stale_thresholds(self, n_added)
            if stale is not None:
                info.update(stale)
        content = modelfile.ModelContent(config, mean.float(), packed, embedder.channel_idx, statistics.feature_hw,
                                         info, None, embedder.projection)
        self._set_fitted(content, embedder)
        self.statistics_ = statistics

    def _calibration_plan(self, n_images: int) -> Tuple[int, Optional[str]]:
        """How many images calibrate (0: none) and a note for the user when there will be none.
        Refuses, before any work, calibration options that make no sense."""
        if self.calibration not in ("holdout", "cv"):
            raise PadimError(f"calibration must be 'holdout' or 'cv', got {self.calibration!r}")
        if not isinstance(self.folds, int) or self.folds < 2:
            raise PadimError(f"folds must be a whole number of at least 2, got {self.folds!r}")
        if self.calibration == "cv" and self.folds > n_images:
            raise PadimError(f"{self.folds} folds need at least as many training images, got {n_images}")
        for name in ("target_fpr", "target_pixel_fpr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise PadimError(f"{name} must be in (0, 1), got {value!r}")
        n_calibration = cal.calibration_size(n_images, float(self.calibration_fraction))
        if self.calibration == "cv" and self.calibration_fraction:
            if n_images < max(self.folds, cal.MIN_CALIBRATION_IMAGES):
                return 0, (f"no calibration: cross-fitting needs at least {max(self.folds, cal.MIN_CALIBRATION_IMAGES)} "
                           f"training images, got {n_images}; the model has no calibrated threshold")
            n_calibration = n_images
        if self.calibration_fraction and not n_calibration:
            return 0, (f"no calibration: {n_images} training images are too few to hold out "
                       f"{cal.MIN_CALIBRATION_IMAGES} (needs at least {2 * cal.MIN_CALIBRATION_IMAGES}); fitted on all "
                       "of them, the model has no calibrated threshold (give thresholds by hand, or add good images)")
        return n_calibration, None

    def _accumulate(self, embedder: Embedder, config: PadimConfig, device, images, desc: str,
                    stats: Optional[GaussianAccumulator] = None, keep: Optional[list] = None):
        """Streams ``images`` through the embedder into ``stats`` (a new accumulator by default);
        with ``keep``, also appends each batch's (B, h, w, d) embeddings to it. -> (stats, (h, w))."""
        stats = stats if stats is not None else GaussianAccumulator()
        feature_hw = None
        for batch, _ in input_batches(images, config, self.batch_size, device, self.workers, self.progress, desc):
            emb = embedder(batch)  # (B, h, w, d)
            feature_hw = tuple(emb.shape[1:3])
            stats.update(emb.flatten(1, 2))  # (B, P, d)
            if keep is not None:
                keep.append(emb.clone())
            del emb
            release_free_memory()
        return stats, feature_hw

    def build_embedder(self, config: Optional[PadimConfig] = None) -> Tuple[Embedder, str, Optional[str]]:
        """The frozen backbone and channel reduction (subset or projection) of ``config`` (default:
        these parameters') on this estimator's device -> (embedder, weights source, weights file
        SHA-256 or None)."""
        config = config if config is not None else self._make_config()
        device = self._resolve_device()
        extractor, source, sha256 = build_extractor(config.backbone, config.weights, config.layers, config.seed)
        extractor = extractor.to(device, memory_format=torch.channels_last)
        return _make_embedder(extractor, config, device), source, sha256

    def statistics(self, images: Sequence[ImageInput], shift: Optional[torch.Tensor] = None,
                   desc: str = "statistics"):
        """The ``padim.statistics.FitStatistics`` of ``images`` under these parameters: sums only,
        no factor, no calibration (what one shard of a distributed fit computes; merging disjoint
        shards' statistics and finalising them equals a fit on all the images with
        ``calibration_fraction=0``). ``shift``: (P, d) to take the sums around (default: the first
        batch's mean). Does not change this estimator."""
        images = list(images)
        if not images:
            raise DataError("statistics need at least 1 image")
        config = self._make_config()
        embedder, source, sha256 = self.build_embedder(config)
        with torch.inference_mode():
            stats, feature_hw = self._accumulate(embedder, config, embedder.device, images, desc,
                                                 GaussianAccumulator(shift=shift))
        return _fit_statistics(config, embedder, feature_hw, stats, source, sha256, len(images), 0, "statistics")

    def held_out_scores(self, images: Sequence[ImageInput], mean: torch.Tensor, packed: torch.Tensor,
                        feature_hw: Tuple[int, int], embedder: Optional[Embedder] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Scores held-out good images with given Gaussians (what calibration is made of)
        -> image scores (n,) and anomaly maps (n, H, W), float32.

        mean: (P, d) float32; packed: (P, d (d + 1) / 2) factor; embedder: default ``build_embedder()``.
        Small batches and the factor unpacked block by block keep this below the fit's own peak memory."""
        config = self._make_config()
        embedder = embedder if embedder is not None else self.build_embedder(config)[0]
        device = embedder.device
        batch_size = min(self.batch_size, CPU_FORWARD_CHUNK) if device.type == "cpu" else self.batch_size
        batches = input_batches(images, config, batch_size, device, self.workers, self.progress, "calibrate")
        scores, maps = [], []
        for batch_scores, batch_maps, _ in score_batches(embedder, mean.to(device), packed.to(device), feature_hw,
                                                         config.input_size, config.sigma, batches):
            scores.append(batch_scores)
            maps.append(batch_maps)
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def _cross_fit(self, embedder, config, device, images, total: GaussianAccumulator, feature_hw) -> cal.Calibration:
        """Scores each of ``folds`` seeded folds with the statistics of the other folds (``total``
        less the fold's own sums) -> the Calibration of all images. One more backbone pass over the
        training images; a fold's embeddings are held while it is scored (N / folds x P x d floats)."""
        order = np.random.default_rng(config.seed).permutation(len(images))
        scores, maps = [], []
        for fold in np.array_split(order, self.folds):
            kept = []
            part, _ = self._accumulate(embedder, config, device, [images[i] for i in sorted(fold)], "cross-fit",
                                       GaussianAccumulator(total.chunk, total.shift), kept)
            mean, packed = total.without(part).finalize(config.epsilon, release=release_free_memory,
                                                        covariance=config.covariance)
            for emb in kept:
                batch_scores, batch_maps = score_embeddings(emb, mean.float(), packed, feature_hw, config.input_size,
                                                            config.sigma)
                scores.append(batch_scores)
                maps.append(batch_maps)
            del kept, part, packed
            release_free_memory()
        return cal.Calibration.from_scores(torch.cat(scores).numpy(), torch.cat(maps).numpy(), "cv")

    # ----------------------------------------------------------------------------- scoring
    def iter_predict(self, images: Sequence[ImageInput], desc: str = "predict") -> Iterator[Tuple[torch.Tensor, torch.Tensor, List]]:
        """Yields, batch by batch: scores (B,), maps (B, H, W) on the CPU, original sizes [(h, w)]."""
        self._check_fitted()
        config = self.config_
        batches = input_batches(images, config, self.batch_size, self.device_, self.workers, self.progress, desc)
        yield from score_batches(self.embedder_, self.mean_, self.precision_factor_, self.feature_hw_,
                                 config.input_size, config.sigma, batches)

    def score_pixels(self, pixels) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 pixels decoded by ``images.load_pixels`` -> scores (B,), maps (B, H, W)
        on the CPU: the steps ``iter_predict`` runs after decoding (the same numbers), for callers
        that decode each file alone so that a corrupt one fails alone (the service, ``padim predict
        --ray``). ``ExportedModel.score_pixels`` is its engine counterpart."""
        self._check_fitted()
        config = self.config_
        if len(pixels) == 0 or tuple(pixels[0].shape) != (*config.input_size, 3):
            raise PadimError(f"pixels must be (B, {config.input_size[0]}, {config.input_size[1]}, 3) uint8 with "
                             f"B >= 1, got {tuple(np.shape(pixels))}")
        batch = to_input(pixels, config)  # (B, 3, H, W)
        scored = score_batches(self.embedder_, self.mean_, self.precision_factor_, self.feature_hw_,
                               config.input_size, config.sigma, [(batch, [None] * len(batch))])
        scores, maps, _ = next(iter(scored))
        return scores, maps

    def operating_point(self, target_fpr: Optional[float] = None, image_threshold: Optional[float] = None,
                        pixel_threshold: Optional[float] = None,
                        target_pixel_fpr: Optional[float] = None) -> cal.OperatingPoint:
        """The thresholds a prediction with these choices uses (the model's own without any): a
        threshold given by hand wins, then a target false-positive rate (from the calibration
        scores, no refit). A target the calibration set is too small for uses its highest score and
        says so in ``warning`` and the source; without calibration a target raises CalibrationError."""
        self._check_fitted()
        stored = cal.OperatingPoint(self.image_threshold_, self.pixel_threshold_, self.threshold_source_,
                                    self.pixel_threshold_source_, self.target_fpr_)
        return cal.operating_point(self.calibration_, stored, target_fpr, image_threshold, pixel_threshold,
                                   target_pixel_fpr)

    def set_operating_point(self, target_fpr: Optional[float] = None, image_threshold: Optional[float] = None,
                            pixel_threshold: Optional[float] = None,
                            target_pixel_fpr: Optional[float] = None) -> "PaDiM":
        """Makes ``operating_point(...)`` the model's own (kept by ``save``)."""
        point = self.operating_point(target_fpr, image_threshold, pixel_threshold, target_pixel_fpr)
        self.image_threshold_, self.pixel_threshold_ = point.image_threshold, point.pixel_threshold
        self.threshold_source_, self.pixel_threshold_source_ = point.source, point.pixel_source
        self.target_fpr_ = point.target_fpr
        return self

    def predict(self, images: Sequence[ImageInput], original_resolution: bool = False,
                target_fpr: Optional[float] = None, image_threshold: Optional[float] = None,
                pixel_threshold: Optional[float] = None, target_pixel_fpr: Optional[float] = None) -> PadimResult:
        """Scores ``images``; see ``PadimResult``. ``original_resolution`` resizes each map (bilinear)
        back to its image's size (not available for models fitted with a crop). The other options
        choose the operating point for this call only (see ``operating_point``)."""
        self._check_fitted()
        point = self.operating_point(target_fpr, image_threshold, pixel_threshold, target_pixel_fpr)
        if original_resolution and self.config_.crop is not None:
            raise PadimError("maps at the original resolution need a model fitted without --crop")
        return cal.decide(self.iter_predict(images), point, self.p_values,
                          to_original_resolution if original_resolution else None)

    def p_values(self, scores) -> Optional[np.ndarray]:
        """(N,) conformal p-values of image scores against the calibration images; None without them."""
        return None if self.calibration_ is None else self.calibration_.p_values(scores)

    def score_samples(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N,) image anomaly scores."""
        return self.predict(images).scores

    def anomaly_map(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, H, W) anomaly maps at the model's input size."""
        return self.predict(images).maps

    # ----------------------------------------------------------------------------- persistence
    def save(self, path) -> None:
        """Writes safetensors + JSON metadata atomically (see ``padim.modelfile``)."""
        self._check_fitted()
        info = {key: getattr(self, f"{key}_", None) for key in modelfile.INFO_DEFAULTS}
        modelfile.write(path, modelfile.ModelContent(self.config_, self.mean_, self.precision_factor_packed_,
                                                     self.channel_idx_, self.feature_hw_, info, self.calibration_,
                                                     self.projection_))

    @classmethod
    def load(cls, path, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
             progress: Optional[bool] = False, weights: Optional[str] = None) -> "PaDiM":
        """Reads a model file (no pickle) and rebuilds its backbone with the same weights.

        weights: for a model fitted with a weights file, where that file is now (it must be the same
        file: its SHA-256, stored at fit, is checked); default: where it was at fit.
        """
        check_batch_size(batch_size)  # before the file is read
        content = modelfile.read(path)
        config = content.config
        if is_weights_file(config.weights):
            config = dataclasses.replace(config, weights=_locate_weights_file(path, config.weights, content.info, weights))
        elif weights is not None and str(weights) != config.weights:
            raise PadimError(f"model file {path} was fitted with {config.weights!r} backbone weights; "
                             "weights= only points a model fitted with a weights file at that file")
        params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in cls._param_names()}
        model = cls(**params, batch_size=batch_size, device=device, workers=workers, progress=progress)
        fitted_with = {name: content.info.get(name) for name in ("calibration_fraction", "folds", "target_pixel_fpr")}
        model.set_params(**{name: value for name, value in fitted_with.items() if value is not None})
        if content.calibration is not None:  # what it was fitted with, so that clone() refits alike
            model.set_params(calibration=content.calibration.method,
                             target_fpr=content.info.get("target_fpr") or cal.DEFAULT_TARGET_FPR)
        device = model._resolve_device()
        extractor, source, _ = build_extractor(config.backbone, config.weights, config.layers, config.seed)
        if not is_weights_file(config.weights) and source != content.info.get("weights_source"):
            raise ModelFileError(
                f"model file {path} was fitted with backbone weights '{content.info.get('weights_source')}' "
                f"but they now resolve to '{source}'"
            )
        projection = None if content.projection is None else content.projection.to(device)
        embedder = Embedder(extractor.to(device, memory_format=torch.channels_last), content.channel_idx.to(device), device,
                            projection)
        content.config = config
        model._set_fitted(content, embedder)
        return model


def _fit_statistics(config, embedder, feature_hw, stats, source, sha256, n_images: int, n_held_out: int, how: str):
    """The ``FitStatistics`` of a fit's accumulator, saying which images the sums cover."""
    from .statistics import FitStatistics, now

    covers = f"{n_images} images ({how})"
    if n_held_out:
        covers = (f"the {n_images} training images the Gaussians were fitted on ({how}); the {n_held_out} held out "
                  "for calibration are not included")
    history = [{"how": how, "n_images": n_images, "date": now()}]
    projection = None if embedder.projection is None else embedder.projection.cpu()
    return FitStatistics(config, embedder.channel_idx.cpu(), tuple(feature_hw), stats, source, sha256, covers, history,
                         projection)


def _make_embedder(extractor, config: PadimConfig, device) -> Embedder:
    """The embedder of a new fit: ``extractor`` (on ``device``) and the configuration's reduction of
    its channels, drawn from the seed (``padim.features.make_reduction``)."""
    n_channels = count_channels(extractor, config.input_size, device)
    channel_idx, projection = make_reduction(n_channels, config.n_features, config.seed, config.reduction)
    return Embedder(extractor, channel_idx.to(device), device, None if projection is None else projection.to(device))


def _stale_thresholds(model: "PaDiM", n_added: int) -> Optional[Dict[str, Any]]:
    """Header fields marking a model's thresholds stale after ``n_added`` images were added to its
    statistics: the thresholds stay (they were right for the old Gaussians, and usually close), their
    sources say so, and the calibration scores are dropped (they scored the old model)."""
    if not n_added or (model.image_threshold_ is None and model.pixel_threshold_ is None):
        return None
    fields = {}
    for key in ("threshold_source", "pixel_threshold_source"):
        source = getattr(model, f"{key}_")
        if source is None:
            continue
        found = re.match(r"stale: calibrated before (\d+) images were added \((.*)\)$", source)
        total, original = (int(found.group(1)) + n_added, found.group(2)) if found else (n_added, source)
        fields[key] = f"stale: calibrated before {total} images were added ({original})"
    dropped = "; its calibration scores were dropped" if model.calibration_ is not None else ""
    note = (f"stale calibration: {n_added} good images were added after the thresholds were set{dropped}; "
            "refit with calibration to recalibrate")
    return {**fields, "image_threshold": model.image_threshold_, "pixel_threshold": model.pixel_threshold_,
            "target_fpr": model.target_fpr_, "calibration_note": note, "n_calibration_images": 0}


def _locate_weights_file(model_path, fitted_path: str, info: dict, given: Optional[str]) -> str:
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
            "(PaDiM.load(..., weights=PATH); padim test/predict --weights PATH)")
    actual = file_sha256(candidate)
    if not actual.startswith(expected):
        raise WeightsUnavailableError(
            f"weights file {candidate} (sha256 {actual[:16]}) is not the file model {model_path} was fitted "
            f"with (sha256 {expected[:16]})")
    return candidate
