"""The fit and test jobs behind ``padim fit``, ``padim test``, ``padim benchmark`` and ``padim demo``:
data folder in, model file / metrics.json / pictures out. Notes for the user go to ``note``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .data.mvtec import find_category
from .model import PaDiM

RANDOM_WEIGHTS_WARNING = "WARNING: this model uses RANDOM backbone weights (--weights random): for tests only, not a real detector"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def fit_category(data_root, category: str, output: Path, note: Callable[[str], None] = _stderr, **params) -> PaDiM:
    """Fits PaDiM(**params) on DATA_ROOT/CATEGORY/train/good and saves it to ``output``."""
    found = find_category(data_root, category, note=note)
    model = PaDiM(**params)
    if model.uses_random_weights:
        note(RANDOM_WEIGHTS_WARNING)
    model.fit(found.train)
    model.category_ = category
    model.save(output)
    return model


def test_category(model_path: Path, data_root, category: str, output: Path, pictures: bool = False,
                  max_images: Optional[int] = None, device: Optional[str] = None, batch_size: int = 32,
                  note: Callable[[str], None] = _stderr) -> dict:
    """Tests a saved model on a category: writes OUTPUT/metrics.json (and pictures), stores the
    F1-maximising thresholds in the model file, and returns the metrics.json content."""
    from .evaluate import METRIC_KEYS, THRESHOLDS_NOTE, evaluate  # scikit-learn, scipy: not needed to fit

    model = PaDiM.load(model_path, device=device, batch_size=batch_size, progress=None)
    found = find_category(data_root, category, need_test=True, note=note)
    if model.uses_random_weights:
        note(RANDOM_WEIGHTS_WARNING)
    if model.category_ and model.category_ != category:
        note(f"note: model {model_path} was fitted on {model.category_!r}, testing on {category!r}")
    missing = found.defects_without_mask
    if missing:
        names = ", ".join(str(s.path) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        note(f"note: {len(missing)} defect image(s) have no mask: counted for image metrics, "
             f"left out of pixel metrics: {names}")

    result = evaluate(model, found, output if pictures else None, max_images)
    if result.defects_with_empty_mask:
        empty = result.defects_with_empty_mask
        names = ", ".join(str(p) for p in empty[:5]) + (" ..." if len(empty) > 5 else "")
        note(f"note: {len(empty)} defect image(s) have an all-black mask: left out of pixel metrics: {names}")
    if result.metrics["pixel_AUROC"] is None:
        note(f"note: no defect image of {category} has a mask marking defect pixels: pixel metrics not available "
             f"(n/a), image metrics only")
    n_images = len(found.test)
    summary = {
        "category": category,
        **{key: result.metrics[key] for key in METRIC_KEYS},
        "fit_s": model.fit_seconds_,
        "test_s": result.test_seconds,
        "test_ms_per_image": 1000.0 * result.test_seconds / n_images,
        "image_threshold": result.metrics["image_threshold"],
        "pixel_threshold": result.metrics["pixel_threshold"],
        "thresholds_note": THRESHOLDS_NOTE,
        "n_train_images": model.n_train_images_,
        "n_test_images": n_images,
        "n_test_defect_images": int(sum(s.is_anomalous for s in found.test)),
        "defects_without_mask": [str(p) for p in result.defects_without_mask],
        "defects_with_empty_mask": [str(p) for p in result.defects_with_empty_mask],
        "backbone": model.config_.backbone,
        "weights_source": model.weights_source_,
        "random_weights": model.uses_random_weights,
        "n_features": model.config_.n_features,
        "image_size": list(model.config_.input_size),
        "seed": model.config_.seed,
        "model": str(model_path),
        "device": str(model._device_),
        "padim_version": __version__,
        "pictures": [os.path.relpath(p, output) for p in result.pictures],
    }
    model.image_threshold_ = result.metrics["image_threshold"]
    model.pixel_threshold_ = result.metrics["pixel_threshold"]
    model.thresholds_note_ = THRESHOLDS_NOTE
    model.save(model_path)
    write_json_atomic(output / "metrics.json", summary)  # written last: its presence means "done"
    return summary


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
