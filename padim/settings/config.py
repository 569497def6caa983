"""One frozen configuration: everything needed to rebuild a fitted model, saved inside its file."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Regulariser added to every patch covariance, as in the paper (Defard et al. 2020, Sec. 3.2).
COVARIANCE_EPSILON = 0.01
# How d embedding channels are made from the layers' C channels (see ``padim.core.features``).
REDUCTIONS = ("random", "semi-orthogonal")
# How each position's covariance is estimated from its sums (see ``padim.core.gaussian``).
COVARIANCES = ("fixed", "oas", "ledoit-wolf")


@dataclass(frozen=True)
class PadimConfig:
    """How features are made and scored. ``None`` fields take the backbone's defaults.

    backbone:    registry name, e.g. "resnet18" (see ``padim.core.backbones.BACKBONES``)
    weights:     "imagenet", "random" (tests only) or a path to a local state_dict
    layers:      feature layers, shallow to deep; deeper maps are upsampled to the first one's grid
    n_features:  d, the number of embedding channels
    image_size:  (height, width) images are resized to
    crop:        optional centre crop (height, width) after the resize
    seed:        seeds the channel subset (and random backbone weights)
    sigma:       standard deviation of the Gaussian blur of the anomaly map, in pixels
    epsilon:     added to every covariance's diagonal (the paper's 0.01); with a shrinkage
                 ``covariance`` only at positions whose estimate is not positive definite
    factor_dtype: "float32", or "float16" to store the precision factor in half the space (scoring
                 still computes in float32)
    reduction:   "random": d of the C channels, chosen with the seed (the paper's); "semi-orthogonal":
                 all C channels times a seeded (C, d) matrix with orthonormal columns (Kim et al. 2021)
    covariance:  "fixed": unbiased covariance + epsilon I (the paper's); "oas" / "ledoit-wolf": the
                 maximum-likelihood covariance shrunk towards a multiple of I by an amount estimated
                 from the data at each position (epsilon only as a fallback, see ``padim.core.gaussian``)
    tile:        None (the whole input is one backbone pass), or S: the input (``image_size``, the
                 working resolution) cut into S x S tiles overlapping by ``tile_overlap`` pixels, each
                 embedded at S x S, maps stitched back (``padim.core.tiling``)
    tile_statistics: "position": Gaussians per position of every tile; "shared": one set for all tiles
    """

    backbone: str = "resnet18"
    weights: str = "imagenet"
    layers: Optional[Tuple[str, ...]] = None
    n_features: Optional[int] = None
    image_size: Tuple[int, int] = (256, 256)
    crop: Optional[Tuple[int, int]] = None
    seed: int = 0
    sigma: float = 4.0
    epsilon: float = COVARIANCE_EPSILON
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    factor_dtype: str = "float32"
    reduction: str = "random"
    covariance: str = "fixed"
    tile: Optional[int] = None
    tile_overlap: int = 0
    tile_statistics: str = "position"

    @property
    def input_size(self) -> Tuple[int, int]:
        """(height, width) of the tensor the backbone sees, and of the anomaly maps."""
        return self.crop if self.crop is not None else self.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PadimConfig":
        fields = dict(data)
        for key in ("layers", "image_size", "crop", "mean", "std"):
            if fields.get(key) is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)


# Fields a model file must hold; the others take their defaults (files written before they existed).
