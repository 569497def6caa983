"""The models a server holds: found, loaded once, named, described, and scored from pixels.

A model is reached by its file's stem (``bottle.safetensors`` -> ``bottle``) and, when no other
model claims it, by the category stored in it. Names only ever look up this table: a request never
names a file.

Scoring starts from decoded pixels (``padim.files.images.load_pixels``' output) rather than from
``PaDiM.iter_predict``, which decodes its inputs itself: the service decodes each upload on its own
first, so that one corrupt image fails alone, and then scores a batch gathered from several
requests. ``PaDiM.score_pixels`` runs the steps ``iter_predict`` runs after decoding (the model's
``PatchScorer``), so scores are the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from padim.errors import PadimError
from padim.deploy.engines import open_scoring_model, thresholds_from
from padim.files import digests
from padim.files.paths import not_regular
from padim.files.safetensors_read import ModelBytes, read_file

MODEL_SUFFIX = ".safetensors"


@dataclass
class ServedModel:
    """A loaded model (any engine: ``padim.deploy.engines.ScoringModel``) and the names it answers to.

    sha256: of the model file (of an export folder's padim.json, which holds its graph files' SHA-256)
    as it was loaded; signature: that file's (device, inode, size, mtime) then (``file_signature``)."""

    name: str
    model: object
    path: str
    aliases: Tuple[str, ...] = ()
    sha256: Optional[str] = None
    signature: Optional[tuple] = None


def content_file(path: os.PathLike) -> Path:
    """The file that identifies a model: the model file, or an export folder's padim.json."""
    path = Path(path)
    return path / "padim.json" if path.is_dir() else path


def file_signature(path: os.PathLike) -> Optional[tuple]:
    """(device, inode, size, mtime in ns) of ``content_file(path)``, None when it is not there: what a
    poll compares (an atomic replace changes the inode, an edit in place the size or mtime)."""
    try:
        stat = os.stat(content_file(path))
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def file_sha256(path: os.PathLike) -> str:
    """SHA-256 (hex) of ``content_file(path)``'s bytes: what ``sha256sum`` prints for a model file.
    Raises OSError (``NotRegularFile`` for a FIFO, a device: never opened)."""
    return digests.file_sha256(content_file(path))


def read_content(path: os.PathLike) -> Tuple[str, object, Optional[tuple]]:
    """What identifies a model now -> (SHA-256, what ``open_model`` loads, signature): a model file is
    read into memory once (``ModelBytes``: the SHA-256 is of the bytes the model is then built from);
    an export folder is its path, summed by its padim.json. Raises PadimError (a file missing, not a
    regular file, not a model, changed while read)."""
    if isinstance(path, ModelBytes) or not Path(path).is_dir():
        source = read_file(path)
        return source.sha256, source, source.signature
    signature = file_signature(path)
    try:
        return file_sha256(path), Path(path), signature
    except OSError as exc:
        raise PadimError(f"export {path} cannot be read: {exc.strerror or exc}") from None


def open_model(path: os.PathLike, name: Optional[str] = None, device: Optional[str] = None, batch_size: int = 16,
               engine: str = "torch", precision: str = "f32") -> ServedModel:
    """One model file (or export folder) loaded with ``engine`` (an export folder: onnxruntime unless
    ``engine`` is openvino), with its SHA-256. ``path``: a path, or a model file already read
    (``ModelBytes``, from ``read_content``).

    A model file is read into memory once (``padim.files.safetensors_read.read_file``) and its
    SHA-256 is of those bytes; the torch engine builds the model from the same bytes, so the version
    served is exactly the bytes its SHA-256 names, and writing or truncating the file afterwards
    changes nothing it computes (the watcher sees a new version, or refuses it). The other engines
    read the model's cached export: the file is verified unchanged (its signature) after they load.
    A file that changes while it is read, or is not a regular file, is refused (PadimError)."""
    sha256, content, before = read_content(path)
    path = Path(content)
    if isinstance(content, ModelBytes):
        if engine == "torch":
            model = open_scoring_model(engine, precision, content, device=device, batch_size=batch_size)
        else:
            model = open_scoring_model(engine, precision, path, device=device, batch_size=batch_size)
    else:
        model = open_scoring_model("onnxruntime" if engine == "torch" else engine, precision, None, path,
                                   batch_size=batch_size)
    if (engine != "torch" or path.is_dir()) and file_signature(path) != before:
        raise PadimError(f"model {path} changed while it was loaded (still being written?): it is read again "
                         "when it changes next")
    return ServedModel(name or (path.name if path.is_dir() else path.stem), model, str(path), (), sha256, before)


def aliases(entries: Mapping[str, object]) -> Dict[str, str]:
    """{category: model name} for the categories exactly one model has and no model is named after
    (``entries``: {name: ScoringModel})."""
    by_category: Dict[str, List[str]] = {}
    for name, model in entries.items():
        if model.category_:
            by_category.setdefault(model.category_, []).append(name)
    return {category: names[0] for category, names in by_category.items()
            if len(names) == 1 and category not in entries}


def fit_date(model) -> Optional[str]:
    """The fit date a model file (``fit_date_``) or an export's header (``metadata``) records."""
    return getattr(model, "fit_date_", getattr(model, "metadata", {}).get("fit_date"))


def model_files(paths: Sequence[os.PathLike] = (), folder: Optional[os.PathLike] = None) -> List[Path]:
    """The model files (or export folders) named on the command line plus every ``*.safetensors``
    in ``folder``."""
    files = [Path(p) for p in paths]
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise PadimError(f"`models_dir` {folder} is not a folder")
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() == MODEL_SUFFIX and p.is_file())
        if not found:
            raise PadimError(f"no {MODEL_SUFFIX} model files in {folder}")
        files += found
    if not files:
        raise PadimError("no model to serve: give model files (padim serve MODEL...) or a folder (`models_dir` DIR)")
    for path in files:
        if path.is_dir() and not (path / "padim.json").is_file():
            raise PadimError(f"{path} is a folder but not a padim export (it has no padim.json)")
        why = None if path.is_dir() else not_regular(path)
        if why is not None:  # missing, a FIFO, a device: said, never opened
            raise PadimError(f"model file {path} {why}")
    return files


def load_models(paths: Sequence[os.PathLike], device: Optional[str] = None, batch_size: int = 16,
                engine: str = "torch", precision: str = "f32") -> Dict[str, ServedModel]:
    """Loads every model file (or export folder) with ``engine`` -> {name: ServedModel}. Two with the
    same name are refused (a request could not say which it means); categories become aliases
    where they are unambiguous. An export folder is served by ``engine`` (onnxruntime by default)."""
    served: Dict[str, ServedModel] = {}
    for path in paths:
        path = Path(path)
        name = path.name if path.is_dir() else path.stem
        if name in served:
            raise PadimError(f"two models are named {name!r} ({served[name].path} and {path}): rename one")
        served[name] = open_model(path, name, device, batch_size, engine, precision)
    for category, name in aliases({name: entry.model for name, entry in served.items()}).items():
        served[name].aliases = (category,)
    return served


def score_pixels(model, pixels: Sequence[np.ndarray]) -> List[Tuple[float, np.ndarray]]:
    """Decoded images ((H, W, 3) uint8 each, the model's input size) -> [(image score, (H, W) map)],
    one engine batch (``score_pixels``)."""
    scores, maps = model.score_pixels(np.stack(pixels))
    return list(zip(scores.tolist(), maps))


def warm_up(model, max_batch: int) -> None:
    """Runs a batch of one and a full batch of black images: the first passes allocate memory and
    choose kernels, so the first requests would otherwise pay for it."""
    height, width = model.config_.input_size
    black = np.zeros((height, width, 3), dtype=np.uint8)
    for size in sorted({1, max_batch}):
        score_pixels(model, [black] * size)


def describe(entry: ServedModel) -> dict:
    """What ``GET /models`` says about a model (see ``schemas.ModelInfo``)."""
    model, config = entry.model, entry.model.config_
    calibration = model.calibration_
    header = getattr(model, "metadata", {})  # an export's header: what a loaded PaDiM has as attributes

    def fitted(key):
        return getattr(model, f"{key}_", header.get(key))

    return {
        "name": entry.name, "aliases": list(entry.aliases), "engine": model.engine, "precision": model.precision,
        "category": model.category_, "backbone": config.backbone,
        "weights": model.weights_source_, "random_weights": model.uses_random_weights,
        "image_size": list(config.image_size), "crop": None if config.crop is None else list(config.crop),
        "n_features": config.n_features, "image_threshold": model.image_threshold_,
        "threshold_source": model.threshold_source_, "pixel_threshold": model.pixel_threshold_,
        "pixel_threshold_source": model.pixel_threshold_source_, "target_fpr": model.target_fpr_,
        "n_calibration_images": fitted("n_calibration_images") or 0,
        "calibration_method": None if calibration is None else calibration.method,
        "fit_date": fitted("fit_date"), "n_train_images": fitted("n_train_images") or 0,
        "thresholds_from": thresholds_from(model),
    }
