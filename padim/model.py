"""The PaDiM estimator: fit per-patch Gaussians on defect-free images, score new images.

    model = PaDiM(backbone="resnet18").fit(train_paths)
    result = model.predict(test_paths)   # result.scores (N,), result.maps (N, H, W)
    model.save("bottle.safetensors"); PaDiM.load("bottle.safetensors")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from . import io as model_io
from .backbones import build_extractor, get_spec
from .checks import check_batch_size, check_estimator  # [wt-files]
from .config import COVARIANCE_EPSILON, PadimConfig
from .errors import DataError, ModelFileError, NotFittedError, PadimError
from .features import embed, random_channel_subset
from .gaussian import FACTOR_DTYPES, GaussianAccumulator, mahalanobis, store_factor, unpack_lower
from .images import ImageInput, load_pixels, prefetched, to_input
from .maps import anomaly_maps, image_scores
from .memory import Workspace, release_free_memory, reuse_large_buffers


CPU_FORWARD_CHUNK = 8


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pair(size: Union[int, Sequence[int], None]) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


@dataclass
class PadimResult:
    """What ``PaDiM.predict`` returns for N images.

    scores: (N,) image anomaly scores (max of each map)
    maps:   (N, H, W) anomaly maps at the model's input size, or a list of (H_i, W_i) maps at each
            image's original resolution
    labels: (N,) bool, score >= image threshold; None when the model has no threshold
    masks:  like ``maps`` but bool, map >= pixel threshold; None when the model has no pixel threshold
    """

    scores: np.ndarray
    maps: Union[np.ndarray, List[np.ndarray]]
    labels: Optional[np.ndarray] = None
    masks: Optional[Union[np.ndarray, List[np.ndarray]]] = None


class PaDiM:
    """PaDiM (Defard et al. 2020) with a scikit-learn style interface.

    Parameters are stored as given; ``fit`` sets the trailing-underscore attributes:
    ``mean_`` (P, d), ``precision_factor_packed_`` (P, d (d + 1) / 2, in ``factor_dtype``): the lower
    triangle of the factor W with W^T W = cov^-1 (``precision_factor_`` unpacks it to (P, d, d) for
    scoring), ``channel_idx_`` (d,), ``feature_hw_`` (h, w) with P = h * w, ``n_train_images_``,
    ``weights_source_``, ``fit_seconds_``, ``fit_date_``. ``image_threshold_`` and
    ``pixel_threshold_`` are None until set (``padim test`` sets them from the test set).
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
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.progress = progress  # False: never; None: only on a terminal; True: always
        self.category_: Optional[str] = None
        self.image_threshold_: Optional[float] = None
        self.pixel_threshold_: Optional[float] = None

    # ----------------------------------------------------------------------------- configuration
    def _make_config(self) -> PadimConfig:
        check_estimator(self)  # [wt-files] every parameter (d, seed, batch, sizes, memory) before any work
        spec = get_spec(self.backbone)
        image_size, crop = _pair(self.image_size), _pair(self.crop)
        if min(image_size) < 32:
            raise PadimError(f"image size must be at least 32 pixels, got {image_size}")
        if crop is not None and (crop[0] > image_size[0] or crop[1] > image_size[1]):
            raise PadimError(f"crop {crop} is larger than the image size {image_size}")
        if self.batch_size < 1:
            raise PadimError(f"batch size must be positive, got {self.batch_size}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise PadimError(f"factor_dtype must be one of {', '.join(FACTOR_DTYPES)}, got {self.factor_dtype!r}")
        weights = str(self.weights)
        if weights not in ("imagenet", "random"):
            weights = os.path.abspath(weights)  # so the saved model finds the file from any folder
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
        )

    def _device(self) -> torch.device:
        device = torch.device(self.device or default_device())
        if device.type == "cuda" and not torch.cuda.is_available():
            raise PadimError("--device cuda was asked for but CUDA is not available here")
        return device

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_"):
            raise NotFittedError("this PaDiM model is not fitted yet: call fit() or PaDiM.load() first")

    @property
    def precision_factor_(self) -> torch.Tensor:
        """(P, d, d) lower-triangular float32 factor, unpacked on first use (scoring) and kept. A fit
        never needs it whole, so fitting wide backbones (d = 550) holds only the packed half."""
        self._check_fitted()
        if getattr(self, "_precision_factor", None) is None:
            self._precision_factor = unpack_lower(self.precision_factor_packed_, len(self.channel_idx_), torch.float32)
        return self._precision_factor

    @property
    def uses_random_weights(self) -> bool:
        return str(self.weights) == "random"

    # ----------------------------------------------------------------------------- features
    def _embeddings(self, batch: torch.Tensor, workspace: Optional[Workspace] = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, h, w, d) PaDiM embeddings (channels last).

        On the CPU the backbone sees at most ``CPU_FORWARD_CHUNK`` images at a time: per image it is
        as fast as a batch of 32, and its activations (the largest buffers of a fit) take a quarter
        of the memory. The statistics still get the whole batch at once.
        """
        batch = batch.to(self._device_, non_blocking=True).contiguous(memory_format=torch.channels_last)
        chunk = CPU_FORWARD_CHUNK if self._device_.type == "cpu" else len(batch)
        workspace = workspace if workspace is not None else Workspace()
        out = None
        for start in range(0, len(batch), chunk):
            feature_maps = self._extractor(batch[start : start + chunk])
            if out is None:
                shape = (len(batch), *feature_maps[0].shape[-2:], len(self.channel_idx_))
                out = workspace.get("embeddings", shape, feature_maps[0].dtype, feature_maps[0].device)
            embed(feature_maps, self.channel_idx_, out=out[start : start + chunk])
            del feature_maps
        return out

    def _batches(self, images: Sequence[ImageInput], desc: str) -> Iterator[Tuple[torch.Tensor, List]]:
        """Yields (B, 3, H, W) normalised channels_last inputs and their original (height, width)
        sizes; files are decoded (to uint8) in threads, a batch ahead when the model runs on a GPU."""
        config = self.config_
        ahead = 0 if self._device_.type == "cpu" else 1  # see ``prefetched``
        batches = prefetched(list(images), self.batch_size, lambda item: load_pixels(item, config), self.workers, ahead)
        total = -(-len(images) // self.batch_size)
        for loaded in tqdm(batches, total=total, desc=desc, unit="batch", disable=self._progress_off()):
            pixels = torch.from_numpy(np.stack([x for x, _ in loaded]))  # (B, H, W, 3) uint8
            yield to_input(pixels, config), [hw for _, hw in loaded]

    def _progress_off(self) -> Optional[bool]:
        return {False: True, None: None, True: False}[self.progress]

    # ----------------------------------------------------------------------------- fit
    def fit(self, images: Sequence[ImageInput]) -> "PaDiM":
        """Fits one Gaussian per patch position on defect-free ``images`` (paths, PIL images or
        uint8 arrays). Embeddings are streamed into running sums: memory does not grow with N."""
        images = list(images)
        if len(images) < 2:
            raise DataError(f"PaDiM needs at least 2 training images, got {len(images)}")
        started = time.perf_counter()
        self.config_ = config = self._make_config()
        self._device_ = self._device()
        extractor, self.weights_source_ = build_extractor(config.backbone, config.weights, config.layers, config.seed)
        self._extractor = extractor.to(self._device_, memory_format=torch.channels_last)
        n_channels = self._count_channels()
        self.channel_idx_ = random_channel_subset(n_channels, config.n_features, config.seed).to(self._device_)

        stats = GaussianAccumulator()
        with torch.inference_mode():
            for batch, _ in self._batches(images, "fit"):
                emb = self._embeddings(batch)  # (B, h, w, d)
                self.feature_hw_ = tuple(emb.shape[1:3])
                stats.update(emb.flatten(1, 2))  # (B, P, d)
                del emb
                release_free_memory()
            mean, packed = stats.finalize(config.epsilon)  # (P, d), (P, d (d + 1) / 2)
            del stats
            release_free_memory()
            self.precision_factor_packed_ = store_factor(packed, config.factor_dtype)
            self._precision_factor = None
        self.mean_ = mean.float()
        self.n_train_images_ = len(images)
        self.fit_seconds_ = time.perf_counter() - started
        self.fit_date_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.image_threshold_ = self.pixel_threshold_ = None
        return self

    def _count_channels(self) -> int:
        """Total channels of the feature layers, from one forward pass of a dummy image."""
        height, width = self.config_.input_size
        with torch.inference_mode():
            dummy = torch.zeros(1, 3, height, width, device=self._device_)
            return sum(fmap.shape[1] for fmap in self._extractor(dummy))

    # ----------------------------------------------------------------------------- scoring
    def iter_predict(self, images: Sequence[ImageInput], desc: str = "predict") -> Iterator[Tuple[torch.Tensor, torch.Tensor, List]]:
        """Yields, batch by batch: scores (B,), maps (B, H, W) on the CPU, original sizes [(h, w)]."""
        self._check_fitted()
        config = self.config_
        if self._device_.type == "cpu":
            reuse_large_buffers()
        workspace = Workspace()  # the batch-sized temporaries, reused (nothing yielded lives in it)
        with torch.inference_mode():
            for batch, sizes in self._batches(images, desc):
                emb = self._embeddings(batch, workspace)  # (B, h, w, d)
                if tuple(emb.shape[1:3]) != tuple(self.feature_hw_):
                    raise PadimError(f"feature grid {tuple(emb.shape[1:3])} differs from the fitted {self.feature_hw_}")
                distances = mahalanobis(emb.flatten(1, 2), self.mean_, self.precision_factor_, workspace)  # (B, P)
                maps = anomaly_maps(distances.view(-1, *self.feature_hw_), config.input_size, config.sigma)
                yield image_scores(maps).cpu(), maps.cpu(), sizes

    def predict(self, images: Sequence[ImageInput], original_resolution: bool = False) -> PadimResult:
        """Scores ``images``; see ``PadimResult``. ``original_resolution`` resizes each map (bilinear)
        back to its image's size (not available for models fitted with a crop)."""
        if original_resolution and self.config_.crop is not None:
            raise PadimError("maps at the original resolution need a model fitted without --crop")
        scores, maps = [], []
        for batch_scores, batch_maps, sizes in self.iter_predict(images):
            scores.append(batch_scores)
            if original_resolution:
                maps += [to_original_resolution(m, hw) for m, hw in zip(batch_maps, sizes)]
            else:
                maps.append(batch_maps)
        scores = torch.cat(scores).numpy()
        maps = maps if original_resolution else torch.cat(maps).numpy()
        labels = scores >= self.image_threshold_ if self.image_threshold_ is not None else None
        masks = None
        if self.pixel_threshold_ is not None:
            masks = [m >= self.pixel_threshold_ for m in maps] if original_resolution else maps >= self.pixel_threshold_
        return PadimResult(scores=scores, maps=maps, labels=labels, masks=masks)

    def score_samples(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N,) image anomaly scores."""
        return self.predict(images).scores

    def anomaly_map(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(N, H, W) anomaly maps at the model's input size."""
        return self.predict(images).maps

    # ----------------------------------------------------------------------------- persistence
    _TENSORS = {"mean": 2, "precision_factor_packed": 2, "channel_idx": 1}

    def save(self, path) -> None:
        """Writes safetensors + JSON metadata atomically (see ``padim.io``)."""
        self._check_fitted()
        tensors = {
            "mean": self.mean_,  # (P, d)
            "precision_factor_packed": self.precision_factor_packed_,  # (P, d (d + 1) / 2)
            "channel_idx": self.channel_idx_,  # (d,)
        }
        metadata = {
            "package_version": __version__,
            "config": self.config_.to_dict(),
            "weights_source": self.weights_source_,
            "feature_hw": list(self.feature_hw_),
            "n_train_images": self.n_train_images_,
            "fit_seconds": self.fit_seconds_,
            "fit_date": self.fit_date_,
            "category": self.category_,
            "image_threshold": self.image_threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "thresholds_note": getattr(self, "thresholds_note_", None),
        }
        model_io.save(path, tensors, metadata)

    @classmethod
    def load(cls, path, device: Optional[str] = None, batch_size: int = 32, workers: int = 2,
             progress: Optional[bool] = False) -> "PaDiM":
        """Reads a model file (no pickle) and rebuilds its backbone with the same weights."""
        check_batch_size(batch_size)  # [wt-files] before the file is read
        tensors, meta = model_io.load(path, cls._TENSORS)
        model_io.verify(path, tensors, meta)  # [wt-files] contents checked against each other, not trusted
        try:
            config = PadimConfig.from_dict(meta["config"])
            feature_hw = tuple(int(v) for v in meta["feature_hw"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"model file {path} has incomplete metadata ({exc})") from None
        n_pos, d = tensors["mean"].shape
        packed = tensors["precision_factor_packed"]
        if (n_pos != feature_hw[0] * feature_hw[1] or d != config.n_features
                or tuple(packed.shape) != (n_pos, d * (d + 1) // 2) or tensors["channel_idx"].numel() != d):
            raise ModelFileError(f"model file {path}: tensor shapes do not match its metadata")
        if FACTOR_DTYPES.get(config.factor_dtype) != packed.dtype:
            raise ModelFileError(f"model file {path}: its factor is {packed.dtype}, its metadata says {config.factor_dtype}")

        model = cls(backbone=config.backbone, weights=config.weights, layers=config.layers,
                    n_features=config.n_features, image_size=config.image_size, crop=config.crop,
                    seed=config.seed, sigma=config.sigma, epsilon=config.epsilon, factor_dtype=config.factor_dtype,
                    batch_size=batch_size, device=device, workers=workers, progress=progress)
        model.config_ = config
        model._device_ = model._device()
        extractor, source = build_extractor(config.backbone, config.weights, config.layers, config.seed)
        if source != meta.get("weights_source"):
            raise ModelFileError(
                f"model file {path} was fitted with backbone weights '{meta.get('weights_source')}' "
                f"but they now resolve to '{source}'"
            )
        model._extractor = extractor.to(model._device_, memory_format=torch.channels_last)
        model.weights_source_ = source
        model.mean_ = tensors["mean"].to(model._device_)
        model.precision_factor_packed_ = packed.to(model._device_)
        model.channel_idx_ = tensors["channel_idx"].long().to(model._device_)
        model.feature_hw_ = feature_hw
        model.n_train_images_ = meta.get("n_train_images")
        model.fit_seconds_ = meta.get("fit_seconds")
        model.fit_date_ = meta.get("fit_date")
        model.category_ = meta.get("category")
        model.image_threshold_ = meta.get("image_threshold")
        model.pixel_threshold_ = meta.get("pixel_threshold")
        model.thresholds_note_ = meta.get("thresholds_note")
        model.package_version_ = meta.get("package_version")
        return model


def to_original_resolution(anomaly_map: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """(H, W) map -> (h0, w0) numpy map at the image's original size (bilinear)."""
    resized = F.interpolate(anomaly_map[None, None], size=tuple(size), mode="bilinear", align_corners=False)
    return resized[0, 0].numpy()
