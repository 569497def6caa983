"""Small export folders for the tests, and rewriting their padim.json byte by byte, independently of
padim.runtime (the tests' reference for the documented checksums)."""

import hashlib
import json
import shutil
from pathlib import Path

from conftest import FAST

PLACEHOLDER = "sha256:" + "0" * 64

# a calibration record as padim.export.calibration_record writes it: 21 sorted scores, 3 levels
CALIBRATION = {"method": "holdout", "image_scores": [1.0 + 0.05 * i for i in range(21)],
               "pixel_levels": [0.0, 0.5, 1.0], "pixel_quantiles": [0.25, 1.5, 4.0]}


def tiny_model(synthetic_root, **params):
    """A random-weights ResNet-18 at 64 x 64 with d = 8, fitted on the 12 synthetic good images."""
    from padim.core.estimator import PaDiM

    train = sorted((synthetic_root / "fabric" / "train" / "good").glob("*.png"))
    return PaDiM(**{**FAST, "n_features": 8, **params}).fit(train)


def calibrated_export(model, folder, fmt="onnx"):
    """``model`` exported with thresholds and a calibration record in its padim.json (the tiny model
    has too few images to be calibrated by its fit)."""
    from padim.deploy.export import export_model, model_metadata

    metadata = {**model_metadata(model), "calibration": CALIBRATION, "calibration_method": "holdout",
                "image_threshold": 2.0, "pixel_threshold": 3.0, "threshold_source": "manual",
                "pixel_threshold_source": "manual"}
    return export_model(model, folder, fmt, metadata=metadata)


def copy_export(source: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


def documented_checksum(raw: bytes) -> str:
    """padim.json's documented checksum: SHA-256 of its bytes with its stored 64 hex digits (the
    last "checksum" value) read as '0'."""
    stored = json.loads(raw)["checksum"]
    where = raw.rfind(stored.encode())
    zeroed = raw[:where] + PLACEHOLDER.encode() + raw[where + len(stored):]
    return "sha256:" + hashlib.sha256(zeroed).hexdigest()


def rewrite_json(folder: Path, edit, checksum: str = "recompute", digests: bool = False, text=None) -> None:
    """Applies ``edit(record)`` (in place) to ``folder``'s padim.json and writes it back; the checksum is
    recomputed ("recompute", as a deliberate edit would), left as it was ("keep") or left out ("drop"). ``digests``:
    recompute the graph files' SHA-256 first (as whoever swaps a graph file on purpose would). ``text``:
    bytes -> bytes, an edit of the JSON text (before the checksum), for what ``json.dumps`` cannot write."""
    path = folder / "padim.json"
    record = json.loads(path.read_text())
    old = record.pop("checksum", None)
    if digests:
        record["sha256"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in record["files"]}
    edit(record)
    if checksum != "drop":  # "drop": no checksum, as in exports of version 1
        record["checksum"] = old if checksum == "keep" else PLACEHOLDER
    raw = (json.dumps(record, indent=2) + "\n").encode()
    if text is not None:
        raw = text(raw)
    if checksum == "recompute":
        where = raw.rindex(PLACEHOLDER.encode())
        raw = raw[:where] + documented_checksum(raw).encode() + raw[where + len(PLACEHOLDER):]
    path.write_bytes(raw)
