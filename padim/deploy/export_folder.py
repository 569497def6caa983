"""Export folders as files: what ``padim.json`` holds and how it is checked before anything in the
folder is used (its own checksum, the SHA-256 of every graph file, the model header through the
model files' own checks, the declared inputs and outputs). Torch-free: the runtime reads folders
where torch is not installed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from padim.files.digests import CHECKSUM_PLACEHOLDER, CHECKSUM_PREFIX, CHECKSUM_RE, checksum_of, file_sha256
from padim.settings import calibration as cal
from padim.errors import PadimError, one_line

METADATA_FILE = "padim.json"
# 2: padim.json carries the SHA-256 of every graph file and its own checksum, and is validated like a
# model header; exports of version 1 (no checksums) are refused with "export again" (the engines'
# cache, whose folder names include the version through padim.export.graph_key, rebuilds itself)
EXPORT_FORMAT, EXPORT_VERSION = "padim-export", 2
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}  # the graph file of each format
# every file an export of each format may hold besides padim.json (ONNX weights beyond 1 GB: model.onnx.data)
EXPORT_FILES = {"onnx": ({"model.onnx"}, {"model.onnx", "model.onnx.data"}), "openvino": ({"model.xml", "model.bin"},)}
INPUT_NAME, OUTPUT_NAMES = "pixels", ("maps", "scores")
EXPORT_PRECISIONS = ("f32", "int8")  # what a graph is ("precision"; absent: f32); int8 graphs are OpenVINO IR
CHECKSUM_KEY = "checksum"  # padim.json's own: "sha256:<hex>" of its bytes with those 64 digits read as "0"
FILES_SHA256_KEY = "sha256"  # file name -> SHA-256 (hex) of that file's bytes
IGNORE_KEY = "ignore_mask"  # the model's ignore mask (ignore_record), for maps and masks at full size
_HEX_RE = re.compile(r"[0-9a-f]{64}")
MAX_METADATA_BYTES = 100 << 20  # padim.json: a few kB (calibration quantiles); more is not ours


class EngineError(PadimError):
    """An engine cannot run here: its package is missing, the export is unusable, an option does
    not apply to it (bf16 on ONNX Runtime, bf16 on a CPU without it)."""


def declared_io(height: int, width: int) -> dict:
    """padim.json's ``input`` and ``outputs``: what the graph of a (height, width) model takes and gives."""
    return {"input": {"name": INPUT_NAME, "shape": ["batch", height, width, 3], "dtype": "uint8",
                      "layout": "RGB, resized and cropped by padim.images.load_pixels"},
            "outputs": {"maps": {"shape": ["batch", height, width], "dtype": "float32"},
                        "scores": {"shape": ["batch"], "dtype": "float32"}}}


def checksummed_json(record: dict) -> bytes:
    """padim.json's bytes: ``record`` as JSON (NaN and infinities refused: JSON has none) with
    ``checksum`` last, the SHA-256 of these bytes with its own 64 digits read as "0" (as model files')."""
    record = {key: value for key, value in record.items() if key != CHECKSUM_KEY}
    record[CHECKSUM_KEY] = CHECKSUM_PLACEHOLDER
    raw = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode("utf-8")
    where = raw.rindex(CHECKSUM_PLACEHOLDER.encode()) + len(CHECKSUM_PREFIX)
    return raw[:where] + hashlib.sha256(raw).hexdigest().encode() + raw[where + 64:]


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def read_export(folder) -> dict:
    """The ``padim.json`` of an export folder, checked before anything in the folder is used: a
    format and version this padim reads, its own checksum, every graph file's SHA-256, the files a
    graph of its format has, the model header (``check_model_record``: the same checks as a model
    file's) and the graph's declared input and outputs against the model's input size.

    Raises EngineError, one line naming what is wrong."""
    folder = Path(folder)
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise EngineError(f"export folder {folder} does not exist (make one with 'padim export')")
    again = "export again ('padim export')"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        raise EngineError(f"{folder} is not a padim export: it has no {METADATA_FILE} (make one with 'padim export')") from None
    except OSError as exc:
        raise EngineError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise EngineError(f"{path} is not a padim export description (over {MAX_METADATA_BYTES >> 20} MB)")
    try:
        record = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EngineError(f"export {folder}: {METADATA_FILE} is damaged (not JSON: {one_line(exc, last=True, typed=False)}); {again}") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise EngineError(f"{path} is not a padim export description")
    version, stored = record.get("export_version"), record.get(CHECKSUM_KEY)
    if type(version) is int and version > EXPORT_VERSION:  # before the checksum: a newer padim may sum otherwise
        raise EngineError(f"export {folder} has version {version}; this padim reads up to {EXPORT_VERSION}: "
                          "upgrade padim")
    if stored is None and type(version) is int and version < EXPORT_VERSION:
        raise EngineError(f"export {folder} was made by an older padim (export version {version}, without "
                          f"checksums): {again}")
    if not isinstance(stored, str) or not CHECKSUM_RE.fullmatch(stored) or checksum_of(raw, stored) != stored:
        raise EngineError(f"export {folder}: {METADATA_FILE} does not match its checksum: damaged or edited; {again}")
    if version != EXPORT_VERSION or type(version) is not int:
        raise EngineError(f"export {folder} has version {version!r}; this padim reads version {EXPORT_VERSION}: "
                          f"{again}")
    fmt, files, digests = record.get("graph_format"), record.get("files"), record.get(FILES_SHA256_KEY)
    if (not isinstance(fmt, str) or fmt not in GRAPH_FILES or record.get("graph") != GRAPH_FILES[fmt] or not isinstance(files, list)
            or not all(isinstance(name, str) for name in files) or len(set(files)) != len(files)
            or set(files) not in EXPORT_FILES[fmt] or not isinstance(digests, dict) or set(digests) != set(files)
            or not all(isinstance(v, str) and _HEX_RE.fullmatch(v) for v in digests.values())):
        raise EngineError(f"export {folder}: {METADATA_FILE} does not describe the files of an ONNX or OpenVINO "
                          f"graph; {again}")
    precision = record.get("precision", "f32")
    if precision not in EXPORT_PRECISIONS or (precision == "int8" and fmt != "openvino"):
        raise EngineError(f"export {folder}: {METADATA_FILE} declares precision {record.get('precision')!r}, not "
                          f"{' or '.join(EXPORT_PRECISIONS)} of an ONNX or OpenVINO graph; {again}")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise EngineError(f"export {folder} is incomplete: {', '.join(missing)} missing; {again}")
    for name in files:
        try:
            same = file_sha256(folder / name) == digests[name]
        except OSError as exc:
            raise EngineError(f"cannot read {folder / name}: {exc.strerror or exc}") from None
        if not same:
            raise EngineError(f"export {folder}: {name} does not match its checksum: damaged or replaced; {again}")
    model = record.get("model")
    if not isinstance(model, dict):
        raise EngineError(f"export {folder}: {METADATA_FILE} lacks the model's header")
    config, _, _ = check_model_record(model, folder)
    height, width = config.input_size
    for key, want in declared_io(height, width).items():
        if record.get(key) != want:
            said = repr(record.get(key))
            said = said if len(said) <= 120 else said[:117] + "..."
            raise EngineError(f"export {folder}: {METADATA_FILE} declares the graph's {key} as {said}, not what the "
                              f"graph of a {height}x{width} model has; {again}")
    if IGNORE_KEY in record and ignore_from_record(record[IGNORE_KEY], (height, width)) is None:
        raise EngineError(f"export {folder}: {METADATA_FILE}'s {IGNORE_KEY} is not a {height}x{width} mask; {again}")
    return record


def ignore_record(ignore) -> dict:
    """An (H, W) bool ignore mask as JSON: its shape and the lengths of its runs, row by row, the first
    run of pixels that count (0 when the first pixel is ignored). A few hundred numbers for a region."""
    flat = np.asarray(ignore, dtype=bool).ravel()
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    return {"shape": list(np.shape(ignore)), "runs": ([0] if flat[0] else []) + runs.astype(int).tolist()}


def ignore_from_record(value, size) -> Optional[np.ndarray]:
    """``ignore_record``'s inverse -> (H, W) bool; None when ``value`` is not the mask of a picture of
    ``size`` (a checked file is never trusted: the shape, the runs' types and their sum)."""
    if not (isinstance(value, dict) and value.get("shape") == list(size) and isinstance(value.get("runs"), list)
            and all(type(run) is int and run >= 0 for run in value["runs"])
            and sum(value["runs"]) == size[0] * size[1]):
        return None
    values = np.arange(len(value["runs"])) % 2 == 1  # runs alternate: counted, ignored, counted, ...
    return np.repeat(values, value["runs"]).reshape(size)


def check_model_record(metadata: dict, folder):
    """The model header of an export (padim.json's ``model``) or the one passed to decide with,
    checked as a model file's is (``padim.headers``: config, layout, feature grid, thresholds and
    sources, calibration scores finite and sorted); returns (PadimConfig, feature_hw, Calibration or None)."""
    from padim.errors import ModelFileError
    from padim.files.headers import check_fields, check_header

    def refuse(reason: str):
        raise EngineError(f"export {folder}: {reason}")

    if not isinstance(metadata, dict):
        refuse("the model's header is not a JSON object")
    try:
        config, _, feature_hw = check_header(metadata, f"export {folder}", refuse)
    except ModelFileError as exc:  # validate_config_dict's, already naming the export
        raise EngineError(str(exc)) from None
    check_fields(metadata, refuse)
    return config, feature_hw, _calibration(metadata.get("calibration"), folder)


def _calibration(record, folder) -> Optional[cal.Calibration]:
    """The ``Calibration`` of an export's ``calibration`` record (None: the model has none), checked
    as a model file's calibration tensors are (``padim.headers.calibration_is_valid``)."""
    from padim.files.headers import CALIBRATION_METHODS, calibration_is_valid

    if record is None:
        return None
    keys = ("image_scores", "pixel_levels", "pixel_quantiles")
    if (not isinstance(record, dict) or record.get("method", "holdout") not in CALIBRATION_METHODS
            or not all(isinstance(record.get(key), list) and all(_is_number(v) for v in record[key]) for key in keys)):
        raise EngineError(f"export {folder}: its calibration data is damaged (not a method and three lists of numbers)")
    arrays = [np.asarray(record[key], dtype=np.float64) for key in keys]
    if not calibration_is_valid(*arrays):
        raise EngineError(f"export {folder}: its calibration data is damaged (scores empty, not finite, not sorted "
                          "or of mismatched lengths)")
    return cal.Calibration(*arrays, method=record.get("method", "holdout"))


def _is_number(value) -> bool:
    return type(value) is float or (type(value) is int and abs(value) < 1e300)


