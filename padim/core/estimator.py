"""The PaDiM estimator: fit per-patch Gaussians on defect-free images, score new images.

    model = PaDiM(backbone="resnet18").fit(train_paths)
    result = model.predict(test_paths)   # result.scores (N,), result.maps (N, H, W)
    model.save("bottle.safetensors"); PaDiM.load("bottle.safetensors")

The estimator only: parameters, fitted state, predict. How a fit runs is ``fitting`` (and
``incremental``), scoring is ``scorer``, files are ``persistence``.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from padim.settings import calibration as cal
from padim.files import modelfile
from padim.settings.config import COVARIANCE_EPSILON, PadimConfig
from padim.errors import NotFittedError, PadimError
from padim.core.embedding import PatchEmbedder
from padim.core.gaussian import unpack_lower
from padim.files.images import ImageInput
from padim.settings.options import config_from_parameters
from padim.core.params import Parameters
from padim.core.scorer import PatchScorer, score_pixels
from padim.settings.calibration import PadimResult

__all__ = ["PaDiM", "PadimResult", "default_device"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class PaDiM(Parameters):
    """PaDiM (Defard et al. 2020) with a scikit-learn style interface.

    Parameters are stored as given (``get_params``/``set_params``, and ``sklearn.base.clone``, work);
    ``fit`` and ``load`` set the trailing-underscore attributes, all at once and only on success, so a
    failed refit leaves the previous model whole: ``config_``, ``device_``, ``mean_`` (P, d),
    ``precision_factor_packed_`` (P, d (d + 1) / 2, in ``factor_dtype``): the lower triangle of the
    factor W with W^T W = cov^-1 (``precision_factor_`` unpacks it to (P, d, d) for scoring),
    ``channel_idx_`` (k,) and ``projection_`` (k, d) or None (see ``padim.core.features.make_reduction``),
    ``feature_hw_`` (h, w) with P = h * w, ``n_train_images_``,
    ``weights_source_``, ``weights_sha256_``, ``fit_seconds_``, ``fit_date_``, ``category_``;
    ``calibration_`` (a ``padim.settings.calibration.Calibration``, or None) and the operating point in use:
    ``image_threshold_`` / ``pixel_threshold_`` with their sources ``threshold_source_`` /
    ``pixel_threshold_source_`` and ``target_fpr_`` (see ``set_operating_point``).

    Calibration (``calibration_fraction``, default 0.1, at least 20 images): a seeded part of the
    training images is held out, the Gaussians are fitted on the rest, and the held-out images'
    scores set the image threshold at ``target_fpr`` with a split-conformal guarantee (see
    ``padim.settings.calibration``) and the pixel threshold at ``target_pixel_fpr`` of their pixels.
    ``calibration="cv"`` instead scores each of ``folds`` folds with the statistics of the others
    (total minus the fold: sums subtract exactly) and fits the final model on every image.

    Where it departs from scikit-learn: ``predict`` returns a ``PadimResult`` with the scores and
    anomaly maps as well as labels, because a defect's location is half of the answer; labels exist
    only once a threshold is set, because PaDiM's scores have no natural cut.

    Options beyond the paper (its defaults kept): ``reduction``, ``covariance`` (see ``PadimConfig``),
    ``tile*`` (large pictures, ``padim.core.tiling``), ``ignore_mask`` (pixels that never count).
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
        tile: Optional[int] = None,
        tile_overlap: Optional[int] = None,
        tile_statistics: str = "position",
        ignore_mask=None,
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
        self.sigma, self.epsilon = sigma, epsilon
        self.factor_dtype = factor_dtype
        self.reduction = reduction
        self.covariance = covariance
        self.tile, self.tile_overlap, self.tile_statistics = tile, tile_overlap, tile_statistics
        self.ignore_mask = ignore_mask  # a picture (path) or (h, w) array: non-black pixels never count
        self.calibration_fraction, self.calibration, self.folds = calibration_fraction, calibration, folds
        self.target_fpr = target_fpr
        self.target_pixel_fpr = target_pixel_fpr
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.progress = progress  # False: never; None: only on a terminal; True: always

    def make_config(self) -> PadimConfig:
        """The frozen configuration these parameters make, every one checked first (one line, no work)."""
        return config_from_parameters(self)

    def resolve_device(self) -> torch.device:
        device = torch.device(self.device or default_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PadimError("`device` cuda was asked for but CUDA is not available here")
        return device

    # ----------------------------------------------------------------------------- fitted state
    def check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise NotFittedError("this PaDiM model is not fitted yet: call fit() or PaDiM.load() first")

    def set_fitted(self, content: modelfile.ModelContent, embedder: PatchEmbedder) -> None:
        """Swaps in a whole fitted state (nothing here can fail half-way)."""
        info = {**modelfile.INFO_DEFAULTS, **content.info}
        self.config_ = content.config
        self.device_ = embedder.device
        self.embedder_ = embedder
        self.mean_ = content.mean.to(embedder.device)
        self.precision_factor_packed_ = content.factor_packed.to(embedder.device)
        self._precision_factor = None  # the unpacked cache of the previous fit, if any
        self._scorer = None
        self.channel_idx_ = embedder.channel_idx
        self.projection_ = embedder.projection
        self.feature_hw_ = tuple(content.feature_hw)
        for key in modelfile.FITTED_INFO:  # weights_source_, n_train_images_, image_threshold_, ...
            setattr(self, f"{key}_", info[key])
        self.calibration_ = content.calibration
        self.ignore_mask_ = None if content.ignore_mask is None else content.ignore_mask.to(embedder.device)
        if self.image_threshold_ is not None and self.threshold_source_ is None:  # files from before calibration
            self.threshold_source_ = self.pixel_threshold_source_ = cal.SOURCE_TEST_SET

    @property
    def extractor_(self) -> torch.nn.Module:
        """The frozen backbone prefix: (B, 3, H, W) -> list of (B, C_l, h_l, w_l)."""
        self.check_fitted()
        return self.embedder_.extractor

    @property
    def precision_factor_(self) -> torch.Tensor:
        """(P, d, d) lower-triangular float32 factor, unpacked on first use (scoring) and kept. A fit
        never needs it whole, so fitting wide backbones (d = 550) holds only the packed half."""
        self.check_fitted()
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
        ``keep_statistics``: keep the sums as ``statistics_`` (a ``padim.core.statistics.FitStatistics``
        of the images the Gaussians were fitted on) for ``partial_fit`` or saving; else None. The
        sums are then held beside the factor: the fit's peak grows by their size (P d (d + 3) / 2 float64).
        ``cluster``: where the statistics, factors and calibration scores are computed (a
        ``padim.cluster.ray_fit.RayFit``: shards on a Ray cluster; default ``padim.core.fitting.LocalFit``,
        this process); the result equals the local fit."""
        from padim.core.fitting import fit_model

        content, embedder, kept = fit_model(self, images, keep_statistics, cluster)
        self.set_fitted(content, embedder)
        self.statistics_ = kept
        return self

    # ----------------------------------------------------------------------------- incremental fits
    def partial_fit(self, images: Sequence[ImageInput]) -> "PaDiM":
        """Adds defect-free ``images`` to the statistics and refits (``padim.core.incremental``):
        equal to a ``fit`` on all images so far with ``calibration_fraction=0``; thresholds are
        kept but marked stale. Needs the statistics: ``fit(..., keep_statistics=True)``, a
        previous ``partial_fit``, or ``attach_statistics``."""
        from padim.core.incremental import partial_fit

        return partial_fit(self, images)

    def attach_statistics(self, statistics) -> "PaDiM":
        """Gives a fitted (e.g. loaded) model the statistics it was fitted from (refused when they
        are of another configuration or other images), so that ``partial_fit`` can add images."""
        from padim.core.incremental import attach_statistics

        return attach_statistics(self, statistics)

    def recalibrate(self, images: Sequence[ImageInput], target_fpr: Optional[float] = None,
                    target_pixel_fpr: Optional[float] = None) -> "PaDiM":
        """New calibration and thresholds from new good ``images``, the same Gaussians (scores do not
        change); the guarantee then covers pictures like these (``padim.core.recalibration``)."""
        from padim.core.recalibration import recalibrate

        return recalibrate(self, images, target_fpr, target_pixel_fpr)

    @classmethod
    def from_statistics(cls, statistics, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
                        progress: Optional[bool] = False) -> "PaDiM":
        """A fitted model (no calibration) made from ``statistics`` (``padim.core.statistics``)."""
        from padim.core.incremental import from_statistics

        return from_statistics(cls, statistics, device, batch_size, workers, progress)

    def build_embedder(self, config: Optional[PadimConfig] = None):
        """(embedder, weights source, weights file SHA-256 or None) of ``config`` (default: these
        parameters'), see ``padim.core.fitting.build_embedder``."""
        from padim.core.fitting import build_embedder

        return build_embedder(self, config)

    def statistics(self, images: Sequence[ImageInput], shift: Optional[torch.Tensor] = None,
                   desc: str = "statistics"):
        """The ``FitStatistics`` of ``images`` under these parameters (one shard of a distributed
        fit; see ``padim.core.fitting.statistics``). Does not change this estimator."""
        from padim.core.fitting import statistics

        return statistics(self, images, shift, desc)

    def held_out_scores(self, images: Sequence[ImageInput], mean: torch.Tensor, packed: torch.Tensor,
                        feature_hw: Tuple[int, int], embedder=None) -> Tuple[np.ndarray, np.ndarray]:
        """Held-out good images scored with given Gaussians -> scores (n,), maps (n, H, W) float32
        (what calibration is made of; ``padim.core.fitting.held_out_scores``)."""
        from padim.core.fitting import held_out_scores

        return held_out_scores(self, images, mean, packed, feature_hw, embedder)

    # ----------------------------------------------------------------------------- scoring
    engine, precision = "torch", "f32"  # what scores (see padim.deploy.engines)

    @property
    def scorer_(self) -> PatchScorer:
        """The scoring path as one torch module (``padim.core.scorer.PatchScorer``): what ``predict``
        runs and what ``padim export`` traces. Built on first use (it holds the unpacked factor)."""
        self.check_fitted()
        if self._scorer is None:
            self._scorer = PatchScorer(self.embedder_, self.mean_, self.precision_factor_, self.feature_hw_,
                                       self.config_.sigma).eval()
        return self._scorer

    def iter_predict(self, images: Sequence[ImageInput], desc: str = "predict") -> Iterator[Tuple[torch.Tensor, torch.Tensor, List]]:
        """Yields, batch by batch: scores (B,), maps (B, H, W) on the CPU, original sizes [(h, w)];
        a file that cannot be read raises DataError naming it."""
        from padim.pipeline.predict import iter_scored

        self.check_fitted()
        for scores, maps, sizes, _ in iter_scored(self, images, desc, ahead=self._ahead()):
            yield torch.from_numpy(scores), torch.from_numpy(maps), sizes

    def _ahead(self) -> int:
        return 0 if self.device_.type == "cpu" else 1  # decode a batch ahead only while a GPU works

    def score_pixels(self, pixels) -> Tuple[np.ndarray, np.ndarray]:
        """(B, H, W, 3) uint8 pixels decoded by ``images.load_pixels`` -> scores (B,), maps (B, H, W)
        float32 NumPy arrays: the torch engine (``scorer_``), for callers that decode each file
        alone so that a corrupt one fails alone (the pipeline, the service, Ray's actors)."""
        self.check_fitted()
        config = self.config_
        if len(pixels) == 0 or tuple(pixels[0].shape) != (*config.input_size, 3):
            raise PadimError(f"pixels must be (B, {config.input_size[0]}, {config.input_size[1]}, 3) uint8 with "
                             f"B >= 1, got {tuple(np.shape(pixels))}")
        return score_pixels(self.scorer_, pixels)

    def operating_point(self, target_fpr: Optional[float] = None, image_threshold: Optional[float] = None,
                        pixel_threshold: Optional[float] = None,
                        target_pixel_fpr: Optional[float] = None) -> cal.OperatingPoint:
        """The thresholds a prediction with these choices uses (the model's own without any): a
        threshold given by hand wins, then a target false-positive rate (from the calibration
        scores, no refit). A target the calibration set is too small for uses its highest score and
        says so in ``warning`` and the source; without calibration a target raises CalibrationError."""
        self.check_fitted()
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
                pixel_threshold: Optional[float] = None, target_pixel_fpr: Optional[float] = None,
                errors: str = "raise") -> PadimResult:
        """Scores ``images``; see ``PadimResult``. ``original_resolution`` resizes each map (bilinear)
        back to its image's size (not available for models fitted with a crop). The thresholds
        options choose the operating point for this call only (see ``operating_point``).
        ``errors``: "raise" (an image that cannot be read raises DataError naming it) or "record"
        (the others are scored; ``result.errors`` lists the failures, ``result.index`` the rows)."""
        from padim.pipeline.predict import check_errors_policy, predict

        self.check_fitted()
        check_errors_policy(errors)
        point = self.operating_point(target_fpr, image_threshold, pixel_threshold, target_pixel_fpr)
        return predict(self, images, point, original_resolution, errors, self._ahead())

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
        """Writes safetensors + JSON metadata atomically (see ``padim.files.modelfile``)."""
        from padim.core.persistence import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
             progress: Optional[bool] = False, weights: Optional[str] = None) -> "PaDiM":
        """Reads a model file (no pickle) and rebuilds its backbone with the same weights.

        weights: for a model fitted with a weights file, where that file is now (it must be the same
        file: its SHA-256, stored at fit, is checked); default: where it was at fit.
        """
        from padim.core.persistence import load_model

        return load_model(cls, path, device, batch_size, workers, progress, weights)
