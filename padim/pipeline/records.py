"""Decisions as records: the label of a score, and the one shape of a result that JSON lines,
Parquet rows and API responses share (``path``/``file``, ``score``, ``p_value``, ``threshold``,
``threshold_source``, ``label``, ``error``). Torch-free.

JSON never holds NaN or Infinity (not JSON; most parsers refuse them): a non-finite number is
written as null.
"""

from __future__ import annotations

import json
import math

import numpy as np
from typing import Optional

from padim.settings.calibration import OperatingPoint, labels_at

ANOMALOUS, GOOD = "anomalous", "good"


def label(score: float, threshold: Optional[float]) -> Optional[str]:
    """"anomalous" when score >= threshold (as ``calibration.labels_at`` decides), "good" below,
    None without a threshold."""
    labels = labels_at([score], threshold)
    return None if labels is None else (ANOMALOUS if bool(labels[0]) else GOOD)


DECISION_FIELDS = ("score", "p_value", "threshold", "threshold_source", "label")


def decided(score: float, p_value: Optional[float], point: OperatingPoint) -> dict:
    """The decision about one scored image at ``point``: ``DECISION_FIELDS``, the same names and values
    in every record (JSON lines, Parquet rows, API answers, decision-log lines)."""
    return {"score": float(score), "p_value": None if p_value is None else float(p_value),
            "threshold": point.image_threshold, "threshold_source": point.source,
            "label": label(score, point.image_threshold)}


def decision(name: str, score: float, p_value: Optional[float], point: OperatingPoint) -> dict:
    """The record of one scored image at ``point``: its ``path`` (the name it was given by) and ``decided``."""
    return {"path": name, **decided(score, p_value, point)}


def failure(name: str, message: str) -> dict:
    """The record of an image that could not be read."""
    return {"path": name, "error": message}


def finite_or_none(value):
    """Numbers that JSON can hold; NaN and infinities become None (recursively in lists and dicts)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def json_line(record: dict) -> str:
    """One JSON line, strict (no NaN/Infinity)."""
    return json.dumps(finite_or_none(record), allow_nan=False)


def ignored_pixels(model):
    """(H, W) bool NumPy array of the pixels ``model`` never counts (its ignore mask: a torch engine's
    tensor, an export's array from its padim.json), or None: what pictures hatch, pixel metrics and
    full-size maps leave out."""
    mask = getattr(model, "ignore_mask_", None)
    return None if mask is None else np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask, dtype=bool)
