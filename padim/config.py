"""One frozen configuration: everything needed to rebuild a fitted model, saved inside its file."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Regulariser added to every patch covariance, as in the paper (Defard et al. 2020, Sec. 3.2).
COVARIANCE_EPSILON = 0.01
# How d embedding channels are made from the layers' C channels (see ``padim.features``).
REDUCTIONS = ("random", "semi-orthogonal")
# How each position's covariance is estimated from its sums (see ``padim.gaussian``).
COVARIANCES = ("fixed", "oas", "ledoit-wolf")


@dataclass(frozen=True)
class PadimConfig:
    """How features are made and scored. ``None`` fields take the backbone's defaults.

    backbone:    registry name, e.g. "resnet18" (see ``padim.backbones.BACKBONES``)
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
                 from the data at each position (epsilon only as a fallback, see ``padim.gaussian``)
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
_REQUIRED = ("backbone", "weights", "layers", "n_features", "image_size", "crop", "seed", "sigma", "mean", "std")


def validate_config_dict(data, where: str = "model file") -> PadimConfig:
    """A ``PadimConfig`` from a model file's ``config``, after checking every field's type and range;
    otherwise a ``ModelFileError`` saying which field is wrong (``where`` starts the message).

    Why: a config is read back from a file that may be damaged or edited; a wrong field must be a
    refusal, never a model built from it (an unknown layer, d larger than the layers' channels, a
    NaN sigma that would blur every map to NaN).
    """
    import math

    from .checks import MAX_IMAGE_SIDE, SEED_MAX, SEED_MIN, check_blur, feature_layout
    from .errors import ModelFileError, PadimError

    def refuse(reason: str):
        raise ModelFileError(f"{where}: config {reason}")

    def whole(value) -> bool:
        return type(value) is int

    def number(value) -> bool:
        return (type(value) is float and math.isfinite(value)) or (type(value) is int and abs(value) < 1e300)

    def pair(key):
        value = fields[key]
        if not (isinstance(value, list) and len(value) == 2 and all(whole(v) and 1 <= v <= MAX_IMAGE_SIDE for v in value)):
            refuse(f"{key} must be two whole numbers 1..{MAX_IMAGE_SIDE}, got {value!r}")
        return tuple(value)

    if not isinstance(data, dict):
        refuse(f"is missing or not a JSON object ({type(data).__name__})")
    known = set(PadimConfig.__dataclass_fields__)
    extra = sorted(set(data) - known)
    if extra:
        refuse(f"has unknown field(s) {', '.join(map(str, extra))} (written by a newer padim?)")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        refuse(f"lacks {', '.join(missing)}")
    fields = {**PadimConfig().to_dict(), **data}
    from .backbones import BACKBONES

    if not isinstance(fields["backbone"], str) or fields["backbone"] not in BACKBONES:
        refuse(f"backbone {fields['backbone']!r} is not one of {', '.join(BACKBONES)}")
    if not isinstance(fields["weights"], str) or not fields["weights"]:
        refuse(f"weights must be text, got {fields['weights']!r}")
    layers = fields["layers"]
    if not (isinstance(layers, list) and layers and all(isinstance(v, str) for v in layers)):
        refuse(f"layers must be a list of layer names, got {layers!r}")
    image_size = pair("image_size")
    crop = None if fields["crop"] is None else pair("crop")
    if crop is not None and (crop[0] > image_size[0] or crop[1] > image_size[1]):
        refuse(f"crop {crop} is larger than image_size {image_size}")
    try:
        layout = feature_layout(fields["backbone"], tuple(layers), crop or image_size)
    except PadimError as exc:
        refuse(str(exc))
    d = fields["n_features"]
    if not whole(d) or not 1 <= d <= layout.channels:
        refuse(f"n_features must be 1..{layout.channels} for {fields['backbone']} {','.join(layers)}, got {d!r}")
    if not whole(fields["seed"]) or not SEED_MIN <= fields["seed"] <= SEED_MAX:
        refuse(f"seed must be a whole number {SEED_MIN}..{SEED_MAX}, got {fields['seed']!r}")
    if not number(fields["sigma"]) or fields["sigma"] <= 0:
        refuse(f"sigma must be a finite number > 0, got {fields['sigma']!r}")
    if not number(fields["epsilon"]) or fields["epsilon"] < 0:
        refuse(f"epsilon must be a finite number >= 0, got {fields['epsilon']!r}")
    for key in ("mean", "std"):
        value = fields[key]
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(number(v) for v in value)):
            refuse(f"{key} must be 3 finite numbers, got {value!r}")
    if min(fields["std"]) <= 0:
        refuse(f"std must be > 0, got {fields['std']!r}")
    if fields["factor_dtype"] not in ("float32", "float16"):
        refuse(f"factor_dtype must be float32 or float16, got {fields['factor_dtype']!r}")
    if fields["reduction"] not in REDUCTIONS:
        refuse(f"reduction must be one of {', '.join(REDUCTIONS)}, got {fields['reduction']!r}")
    if fields["covariance"] not in COVARIANCES:
        refuse(f"covariance must be one of {', '.join(COVARIANCES)}, got {fields['covariance']!r}")
    if len(set(layers)) != len(layers):
        refuse(f"layers names a layer twice: {layers!r}")
    try:
        check_blur(fields["sigma"], crop or image_size)
    except PadimError as exc:
        refuse(str(exc))
    return PadimConfig.from_dict({**fields, "layers": tuple(layers), "image_size": image_size, "crop": crop,
                                  "sigma": float(fields["sigma"]), "epsilon": float(fields["epsilon"])})
