"""A configuration read back from a file (a model, statistics, an export's padim.json) checked field
by field before anything is built from it: a damaged or edited field is a refusal naming it, never a
model made of it (an unknown layer, d larger than the layers' channels, a NaN sigma).
"""

from __future__ import annotations

from padim.settings.backbone_table import BACKBONE_NAMES
from padim.settings.config import COVARIANCES, REDUCTIONS, PadimConfig

_REQUIRED = ("backbone", "weights", "layers", "n_features", "image_size", "crop", "seed", "sigma", "mean", "std")


def validate_config_dict(data, where: str = "model file") -> PadimConfig:
    """A ``PadimConfig`` from a model file's ``config``, after checking every field's type and range;
    otherwise a ``ModelFileError`` saying which field is wrong (``where`` starts the message).

    Why: a config is read back from a file that may be damaged or edited; a wrong field must be a
    refusal, never a model built from it (an unknown layer, d larger than the layers' channels, a
    NaN sigma that would blur every map to NaN).
    """
    import math

    from padim.settings.options import MAX_IMAGE_SIDE, SEED_MAX, SEED_MIN, check_blur, feature_layout
    from padim.errors import ModelFileError, PadimError

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
    backbones = BACKBONE_NAMES
    if not isinstance(fields["backbone"], str) or fields["backbone"] not in backbones:
        refuse(f"backbone {fields['backbone']!r} is not one of {', '.join(backbones)}")
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
    tile, overlap = fields["tile"], fields["tile_overlap"]
    if tile is not None and (not whole(tile) or not 32 <= tile <= min(image_size) or crop is not None):
        refuse(f"tile must be null or a whole number from 32 to {min(image_size)} (without a crop), got {tile!r}")
    if not whole(overlap) or not 0 <= overlap < (tile or 1):
        refuse(f"tile_overlap must be a whole number from 0 to {(tile or 1) - 1}, got {overlap!r}")
    if fields["tile_statistics"] not in ("position", "shared"):
        refuse(f"tile_statistics must be position or shared, got {fields['tile_statistics']!r}")
    if tile is not None:
        from padim.settings.tile_geometry import tile_count_problem

        problem = tile_count_problem(image_size, tile, overlap)  # counted before any layout is built from it
        if problem is not None:
            refuse(f"tile geometry: {problem}")
    try:
        check_blur(fields["sigma"], crop or image_size if tile is None else (tile, tile))
    except PadimError as exc:
        refuse(str(exc))
    return PadimConfig.from_dict({**fields, "layers": tuple(layers), "image_size": image_size, "crop": crop,
                                  "sigma": float(fields["sigma"]), "epsilon": float(fields["epsilon"])})
