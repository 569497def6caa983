"""Recalibration without refitting (issue 28): new thresholds from new good pictures, same Gaussians.

After a change on the line (a lamp, a camera, a new batch of material) the drift alarm fires and the
calibrated threshold stops holding: its guarantee covers only pictures exchangeable with the
calibration images. Refitting stops the line; the Gaussians usually still rank pictures well, it is
the cut that moved. Recalibration scores n new good pictures with the model as it is (``iter_scored``,
the code that scores every prediction) and makes their scores the calibration set. Afterwards:

- P(a good picture is flagged) <= target_fpr holds for pictures exchangeable with the *new* pictures
  (the split-conformal argument of ``padim.settings.calibration``; n >= 1 / target - 1 pictures, 19
  for 5 %; with fewer the threshold is their highest score and guarantees 1 / (n + 1), as the
  threshold's source says); nothing is promised for pictures like the old calibration images;
- the Gaussians, and so every score and map, are exactly as before; p-values and the drift
  monitor's reference are the new pictures' scores.

The model file records which pictures the thresholds come from and when: ``calibrated_by`` ("fit",
"padim recalibrate", "padim serve"), ``calibration_date``, ``calibration_images`` (their names) and
``calibration_images_sha256``.

Shapes: n pictures; maps (n, H, W) at the model's input size.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional, Sequence

import numpy as np
import torch

from padim.errors import DataError, PadimError
from padim.files.headers import CALIBRATION_HASHES_KEY, calibration_image_hashes, image_names
from padim.pipeline.predict import iter_scored
from padim.pipeline.records import ignored_pixels
from padim.settings import calibration as cal


def calibration_scores(model, images: Sequence, desc: str = "recalibrate"):
    """Scores ``images`` with ``model`` as a prediction would -> image scores (n,), maps (n, H, W)
    float32. A picture that cannot be read raises DataError naming it: a calibration set is all or nothing."""
    scores, maps = [], []
    with torch.inference_mode():
        for batch_scores, batch_maps, _, _ in iter_scored(model, images, desc, ahead=model._ahead()):
            scores.append(batch_scores)
            maps.append(batch_maps)
    return np.concatenate(scores), np.concatenate(maps)


def recalibrate(model, images: Sequence, target_fpr: Optional[float] = None,
                target_pixel_fpr: Optional[float] = None, by: str = "padim recalibrate"):
    """``PaDiM.recalibrate``: new calibration, thresholds and their sources from the good ``images``,
    set on ``model`` all at once (nothing changes when a picture cannot be read). target_fpr /
    target_pixel_fpr: default the model's own. Returns ``model``."""
    model.check_fitted()
    images = list(images)
    if not images:
        raise DataError("recalibration needs good pictures: none were given")
    target = target_fpr if target_fpr is not None else (model.target_fpr_ or model.target_fpr)
    pixel_target = target_pixel_fpr if target_pixel_fpr is not None else model.target_pixel_fpr
    for name, value in (("target_fpr", target), ("target_pixel_fpr", pixel_target)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise PadimError(f"`{name}` must be in (0, 1), got {value!r}")
    scores, maps = calibration_scores(model, images)
    calibration = cal.Calibration.from_scores(scores, maps, "holdout", ignored_pixels(model))
    point = cal.operating_point(calibration, cal.OperatingPoint(), float(target), target_pixel_fpr=float(pixel_target))
    fitted = {
        "calibration": calibration, "image_threshold": point.image_threshold, "pixel_threshold": point.pixel_threshold,
        "threshold_source": point.source, "pixel_threshold_source": point.pixel_source, "target_fpr": point.target_fpr,
        "n_calibration_images": calibration.n, CALIBRATION_HASHES_KEY: calibration_image_hashes(images),
        "calibration_images": image_names(images), "calibration_date": now(), "calibrated_by": by,
        "stale_images": None, "calibrated_sources": None, "thresholds_note": None, "calibration_note": None,
    }
    for key, value in fitted.items():  # plain assignments: nothing left here can fail half-way
        setattr(model, f"{key}_", value)
    model.set_params(target_fpr=float(target), target_pixel_fpr=float(pixel_target), calibration="holdout")
    return model


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
