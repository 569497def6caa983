"""``predict`` for every engine: sources -> scored batches -> one ``PadimResult`` decided at an
operating point, with unreadable files raised or recorded (``errors="raise"|"record"``).

``PaDiM.predict`` and ``ExportedModel.predict`` are this function with their own engine. Torch-free.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np

from padim.settings import calibration as cal
from padim.errors import DataError, PadimError
from padim.pipeline.batches import score_sources
from padim.pipeline.records import ignored_pixels
from padim.pipeline.resolution import map_at
from padim.pipeline.sources import as_sources

ERROR_POLICIES = ("raise", "record")


def check_errors_policy(errors: str) -> None:
    if errors not in ERROR_POLICIES:
        raise PadimError(f"errors must be 'raise' or 'record', got {errors!r}")


def iter_scored(model, images: Sequence, desc: str = "predict", errors: str = "raise",
                ahead: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray, List[Tuple[int, int]], List]]:
    """Yields per batch: scores (B,), maps (B, H, W) float32, original sizes, and the batch's
    ``Scored`` items that could not be read (empty unless ``errors="record"``; with "raise" the
    first one raises ``DataError`` naming its file)."""
    check_errors_policy(errors)
    for batch in score_sources(model, as_sources(images), model.batch_size, model.workers, ahead, model.progress,
                               desc):
        failed = [item for item in batch if item.error is not None]
        if failed and errors == "raise":
            raise DataError(failed[0].error)
        read = [item for item in batch if item.error is None]
        height, width = model.config_.input_size
        scores = np.array([item.score for item in read], dtype=np.float32)
        maps = np.stack([item.map for item in read]) if read else np.zeros((0, height, width), np.float32)
        yield scores, maps, [item.original_hw for item in read], failed


def predict(model, images: Sequence, point: cal.OperatingPoint, original_resolution: bool,
            errors: str = "raise", ahead: int = 0) -> cal.PadimResult:
    """Scores ``images`` with ``model`` (an engine, see ``padim.deploy.engines``) and decides at
    ``point``; with ``original_resolution`` each map at its picture's size (``resolution.map_at``,
    the model's ignore region 0). With ``errors="record"`` the result holds the images that could be
    read, in input order, ``index`` saying which input each is, and ``errors`` the others as
    (index, name, message)."""
    if original_resolution and model.config_.crop is not None:
        raise PadimError("maps at the original resolution need a model fitted without a crop")
    failed = []

    def batches():
        for scores, maps, sizes, batch_failed in iter_scored(model, images, "predict", errors, ahead):
            failed.extend(batch_failed)
            yield scores, maps, sizes

    ignore = ignored_pixels(model)
    resize = (lambda anomaly_map, size: map_at(anomaly_map, size, ignore)) if original_resolution else None
    result = cal.decide(batches(), point, model.p_values, resize)
    result.errors = [(item.index, item.source.name, item.error) for item in failed]
    bad = {item.index for item in failed}
    result.index = np.array([i for i in range(len(images)) if i not in bad], dtype=np.int64)
    return result
