"""Scoring with an exported graph (``padim.deploy.export``), without PyTorch: ONNX Runtime or OpenVINO.

Why a separate module: line PCs and edge boxes should not need PyTorch (hundreds of MB) to score.
This module imports only NumPy, Pillow, padim's torch-free modules (``config``, ``errors``,
``images``' decoding) and the engine's own package, so ``padim predict --engine onnxruntime
--export DIR`` runs where torch is not installed (tested in a clean virtualenv).

Everything but the graph happens here exactly as in the PyTorch path: images are decoded by
``padim.files.images.load_pixels`` (the same pixels for every engine), fed in batches, and the decisions
(labels, masks) are taken outside the graph with the thresholds of the export's ``padim.json`` (or
of the current model file, see ``padim.deploy.engines``), as ``padim.settings.calibration.labels_at`` / ``masks_at`` do.

Shapes: B images per batch, (H, W) the model's input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from padim.settings import calibration as cal
from padim.errors import PadimError
from padim.deploy.export_folder import (IGNORE_KEY, EXPORT_FORMAT, EXPORT_VERSION, FILES_SHA256_KEY, GRAPH_FILES,  # noqa: F401
                                          INPUT_NAME, METADATA_FILE, OUTPUT_NAMES, EngineError, check_model_record,
                                          checksummed_json, declared_io, ignore_from_record, read_export)
from padim.deploy.sessions import ENGINES, PRECISIONS, check_signature, open_session  # noqa: F401

RuntimeResult = cal.PadimResult  # what ExportedModel.predict returns: the same fields as PaDiM.predict's


class ExportedModel:
    """An exported padim model run by ONNX Runtime or OpenVINO; the torch-free counterpart of a
    loaded ``PaDiM`` for scoring (same ``config_``, thresholds, ``iter_predict``, ``predict``).

    folder:    an export folder (``padim export`` or the engines' cache)
    metadata:  the model header to decide with (default: the export's own ``model``); the engines
               pass the current model file's, whose thresholds may be newer than the export's
    threads:   the engine's threads for this model (default: the engine's choice)
    """

    def __init__(self, folder, engine: str = "onnxruntime", precision: str = "f32", batch_size: int = 32,
                 workers: int = 2, progress: Optional[bool] = False, threads: Optional[int] = None,
                 metadata: Optional[dict] = None, record: Optional[dict] = None):
        if int(batch_size) < 1:
            raise PadimError(f"batch size must be positive, got {batch_size}")
        self.folder = Path(folder)
        # record: read_export(folder) when the caller has just read (and so verified) it
        self.export_record = record if record is not None else read_export(folder)
        if self.export_record.get("precision") == "int8" and metadata is not None \
                and metadata != self.export_record["model"]:  # never f32 thresholds with int8 scores
            raise EngineError(f"export {folder} is an int8 graph: it decides with its own thresholds (from int8 "
                              "scores), not with a model file's (from f32 scores)")
        self.metadata = dict(metadata if metadata is not None else self.export_record["model"])
        self.config_, self.feature_hw_, self.calibration_ = check_model_record(self.metadata, folder)
        shape = self.export_record["input"]["shape"]
        if list(shape[1:3]) != list(self.config_.input_size):
            raise EngineError(f"export {folder}: its graph takes {shape[1:3]} images but the model's input size "
                              f"is {list(self.config_.input_size)}")
        for key in ("image_threshold", "pixel_threshold", "threshold_source", "pixel_threshold_source", "target_fpr",
                    "weights_source", "category", "thresholds_from"):
            setattr(self, f"{key}_", self.metadata.get(key))
        # (H, W) bool, the pixels that never count (their maps are 0 in the graph; kept out at full size too)
        self.ignore_mask_ = ignore_from_record(self.export_record.get(IGNORE_KEY), self.config_.input_size)
        self.engine, self.precision = engine, precision
        self.batch_size, self.workers, self.progress = int(batch_size), workers, progress
        self.session = open_session(folder, self.export_record, engine, precision, threads)
        check_signature(self.session, folder, self.config_.input_size)

    @property
    def uses_random_weights(self) -> bool:
        return str(self.config_.weights) == "random"

    def operating_point(self, target_fpr: Optional[float] = None, image_threshold: Optional[float] = None,
                        pixel_threshold: Optional[float] = None,
                        target_pixel_fpr: Optional[float] = None) -> cal.OperatingPoint:
        """The thresholds a prediction with these choices uses, as ``PaDiM.operating_point``."""
        stored = cal.OperatingPoint(self.image_threshold_, self.pixel_threshold_, self.threshold_source_,
                                    self.pixel_threshold_source_, self.target_fpr_)
        return cal.operating_point(self.calibration_, stored, target_fpr, image_threshold, pixel_threshold,
                                   target_pixel_fpr)

    def p_values(self, scores) -> Optional[np.ndarray]:
        """(N,) conformal p-values of image scores against the calibration images; None without them."""
        return None if self.calibration_ is None else self.calibration_.p_values(scores)

    def score_pixels(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(B, H, W, 3) uint8 pixels from ``load_pixels`` -> scores (B,), maps (B, H, W) float32."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (*self.config_.input_size, 3):
            raise PadimError(f"pixels must be (B, {self.config_.input_size[0]}, {self.config_.input_size[1]}, 3) "
                             f"uint8, got {pixels.shape}")
        maps, scores = self.session(pixels)
        if maps.shape != pixels.shape[:3] or scores.shape != pixels.shape[:1]:
            raise EngineError(f"export {self.folder}: its graph gave maps {maps.shape} and scores {scores.shape} for "
                              f"{len(pixels)} images: not a padim scoring graph; export again ('padim export')")
        return scores, maps

    def iter_predict(self, images: Sequence, desc: str = "predict") -> Iterator[Tuple[np.ndarray, np.ndarray, List]]:
        """Yields, batch by batch: scores (B,), maps (B, H, W), original sizes [(h, w)], like
        ``PaDiM.iter_predict`` (``padim.pipeline.predict.iter_scored``: decoding in ``workers``
        threads, each batch decoded before the engine runs; an unreadable file raises DataError)."""
        from padim.pipeline.predict import iter_scored

        for scores, maps, sizes, _ in iter_scored(self, images, desc):
            yield scores, maps, sizes

    def predict(self, images: Sequence, original_resolution: bool = False, target_fpr: Optional[float] = None,
                image_threshold: Optional[float] = None, pixel_threshold: Optional[float] = None,
                target_pixel_fpr: Optional[float] = None, errors: str = "raise") -> RuntimeResult:
        """Scores ``images`` (paths, PIL images or uint8 arrays); see ``RuntimeResult``. The other
        options choose the operating point for this call and what an unreadable file does, as
        ``PaDiM.predict``'s."""
        from padim.pipeline.predict import check_errors_policy, predict

        check_errors_policy(errors)
        point = self.operating_point(target_fpr, image_threshold, pixel_threshold, target_pixel_fpr)
        return predict(self, images, point, original_resolution, errors)
