"""The fit and test jobs behind ``padim fit``, ``padim test``, ``padim benchmark`` and ``padim demo``:
data folder in, model file / metrics.json / pictures out. Notes for the user go to ``note``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from padim.version import __version__
from padim.files.atomic import atomic_write, write_together
from padim.errors import RANDOM_WEIGHTS_WARNING, PadimError  # noqa: F401 (RANDOM_WEIGHTS_WARNING: re-exported)
from padim.data.mvtec import find_category
from padim.settings.calibration import SOURCE_TEST_SET
from padim.files.memory import tune_malloc_for_scoring
from padim.core.estimator import PaDiM


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def fit_category(data_root, category: str, output: Path, note: Callable[[str], None] = _stderr,
                 keep_statistics: Optional[Path] = None, cluster=None, **params) -> PaDiM:
    """Fits PaDiM(**params) on DATA_ROOT/CATEGORY/train/good and saves it to ``output``; with
    ``keep_statistics``, also its statistics there (see ``padim.core.statistics``); with ``cluster``
    (a ``padim.cluster.ray_fit.RayFit``), on a Ray cluster."""
    from padim.jobs.geometry import choose_geometry

    found = find_category(data_root, category, note=note)
    model = PaDiM(**choose_geometry(found.train, params, note))
    if model.uses_random_weights:
        note(RANDOM_WEIGHTS_WARNING)
    model.fit(found.train, keep_statistics=keep_statistics is not None, cluster=cluster)
    model.category_ = category
    writes = [(output, model.save)] + ([(keep_statistics, model.statistics_.save)] if keep_statistics else [])
    write_together(writes)  # both or neither: a model and its statistics never disagree
    if keep_statistics is not None:
        note(f"statistics of {model.statistics_.covers} -> {keep_statistics}")
    note(calibration_summary(model))
    if model.calibration_ is not None and model.operating_point().warning:
        note(model.operating_point().warning)
    return model


def calibration_summary(model: PaDiM) -> str:
    """One paragraph on the model's threshold: what the calibration guarantees and what it does not."""
    if model.calibration_ is None:
        return f"note: {model.calibration_note_ or 'the model has no calibration'}"
    calibration = model.calibration_
    guaranteed = 100 * calibration.guaranteed(model.target_fpr_)
    if calibration.method == "holdout":
        promise = (f"on new good images like the {calibration.n} held out (same line, lighting, camera), at most "
                   f"{guaranteed:.3g}% are flagged on average; drift (new lighting, camera, parts) breaks this: "
                   "recalibrate")
    else:
        promise = (f"cross-fitted on all {calibration.n} training images: the false-positive rate is near "
                   f"{guaranteed:.3g}% in practice, but guaranteed only below about twice that")
    return (f"calibrated image threshold {model.image_threshold_:.4g} ({promise}); pixel threshold "
            f"{model.pixel_threshold_:.4g} ({model.pixel_threshold_source_}). Recall on defects is not "
            "guaranteed: measure it with padim test")


def test_category(model_path: Path, data_root, category: str, output: Path, pictures: bool = False,
                  max_images: Optional[int] = None, device: Optional[str] = None, batch_size: int = 32,
                  note: Callable[[str], None] = _stderr, weights: Optional[str] = None,
                  tune_malloc: bool = False, target_fpr: Optional[float] = None,
                  store_oracle_thresholds: bool = False, engine: str = "torch", precision: str = "f32",
                  export: Optional[Path] = None) -> dict:
    """Tests a saved model on a category: writes OUTPUT/metrics.json (and pictures) and returns its
    content: the best-F1 ("oracle") figures, whose thresholds are chosen on the test set, and the
    figures at the model's calibrated operating point (or ``target_fpr``), which a line would see.
    The model file is left as it is unless ``store_oracle_thresholds``.

    weights: where a model fitted with a weights file finds it now (see ``PaDiM.load``).
    tune_malloc: call ``padim.files.memory.tune_malloc_for_scoring`` before scoring on the CPU (the
    ``padim`` command does; a library caller decides for its own process).
    engine, precision, export: score with an exported graph (see ``padim.deploy.engines.open_engine``)."""
    from padim.jobs.evaluate import CALIBRATED_KEYS, METRIC_KEYS, THRESHOLDS_NOTE, evaluate  # scikit-learn, scipy
    from padim.deploy.engines import thresholds_from

    if store_oracle_thresholds and precision == "int8":
        raise PadimError("`store_oracle_thresholds` would store thresholds of int8 scores in the model file, whose "
                         "thresholds are for f32 scores: leave it out with `precision` int8")
    model = PaDiM.load(model_path, device=device, batch_size=batch_size, progress=None, weights=weights)
    found = find_category(data_root, category, need_test=True, note=note)
    scorer = None
    if engine != "torch":  # int8 without an export: the cached int8 export calibrated on this training folder
        from padim.deploy.engines import open_engine

        scorer = open_engine(engine, precision, model_path, export, weights, batch_size, progress=None,
                             model=model if model.device_.type == "cpu" else None,
                             train_images=found.train if precision == "int8" and export is None else None)
    decider = scorer if scorer is not None else model  # whose thresholds decide: an int8 export has its own
    calibrated = None  # the calibrated operating point: the fit's targets, or target_fpr
    if decider.calibration_ is not None:
        calibrated = decider.operating_point(target_fpr=target_fpr or decider.target_fpr_ or model.target_fpr,
                                             target_pixel_fpr=model.target_pixel_fpr)
        if calibrated.warning:
            note(calibrated.warning)
    else:
        note("note: the model has no calibration: the *_calibrated metrics are null (refit with padim fit, "
             "`calibration_fraction` > 0, to get thresholds from good images)")
    if tune_malloc and model.device_.type == "cpu":
        tune_malloc_for_scoring()
    if model.uses_random_weights:
        note(RANDOM_WEIGHTS_WARNING)
    if model.category_ and model.category_ != category:
        note(f"note: model {model_path} was fitted on {model.category_!r}, testing on {category!r}")
    missing = found.defects_without_mask
    if missing:
        names = ", ".join(str(s.path) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        note(f"note: {len(missing)} defect image(s) have no mask: counted for image metrics, "
             f"left out of pixel metrics: {names}")

    iter_predict = None
    if scorer is not None:
        from padim.deploy.engines import as_torch

        iter_predict = as_torch(scorer.iter_predict)
    result = evaluate(model, found, output if pictures else None, max_images, calibrated,
                      iter_predict=iter_predict)
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
        **{key: result.metrics[key] for key in CALIBRATED_KEYS},
        "calibrated_image_threshold": calibrated.image_threshold if calibrated else None,
        "calibrated_pixel_threshold": calibrated.pixel_threshold if calibrated else None,
        "calibrated_threshold_source": calibrated.source if calibrated else None,
        "n_calibration_images": model.n_calibration_images_ if scorer is None else scorer.metadata.get("n_calibration_images"),
        "thresholds_from": thresholds_from(decider),
        "fit_s": model.fit_seconds_,
        "test_s": result.test_seconds,
        "test_ms_per_image": 1000.0 * result.test_seconds / n_images,
        "oracle_image_threshold": result.metrics["image_threshold"],
        "oracle_pixel_threshold": result.metrics["pixel_threshold"],
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
        "reduction": model.config_.reduction,
        "covariance": model.config_.covariance,
        "image_size": list(model.config_.input_size),
        "seed": model.config_.seed,
        "model": str(model_path),
        "device": str(model.device_),
        "engine": engine,
        "precision": precision,
        "padim_version": __version__,
        "pictures": [os.path.relpath(p, output) for p in result.pictures],
    }
    if store_oracle_thresholds:  # each threshold the test set gave replaces the model's, marked as such
        model.set_operating_point(image_threshold=result.metrics["image_threshold"],
                                  pixel_threshold=result.metrics["pixel_threshold"])
        model.threshold_source_ = SOURCE_TEST_SET
        if result.metrics["pixel_threshold"] is not None:
            model.pixel_threshold_source_ = SOURCE_TEST_SET
        model.thresholds_note_ = THRESHOLDS_NOTE
        model.save(model_path)
    write_json_atomic(output / "metrics.json", summary)  # written last: its presence means "done"
    return summary


def write_text_atomic(path: Path, text: str) -> None:
    """Writes UTF-8 text through ``padim.files.atomic`` (one line on a full disk or a folder in the way)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda handle: handle.write(data), PadimError, "file")


def write_json_atomic(path: Path, data) -> None:
    """Writes JSON through ``padim.files.atomic``: the user's umask, a private temporary, one line on a full disk."""
    text = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    atomic_write(path, lambda handle: handle.write(text), PadimError, "JSON file")
