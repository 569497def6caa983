"""Scoring with an exported graph (``padim.pipeline.export``), without PyTorch: ONNX Runtime or OpenVINO.

Why a separate module: line PCs and edge boxes should not need PyTorch (hundreds of MB) to score.
This module imports only NumPy, Pillow, padim's torch-free modules (``config``, ``errors``,
``images``' decoding) and the engine's own package, so ``padim predict --engine onnxruntime
--export DIR`` runs where torch is not installed (tested in a clean virtualenv).

Everything but the graph happens here exactly as in the PyTorch path: images are decoded by
``padim.files.images.load_pixels`` (the same pixels for every engine), fed in batches, and the decisions
(labels, masks) are taken outside the graph with the thresholds of the export's ``padim.json`` (or
of the current model file, see ``padim.pipeline.engines``), as ``padim.core.scoring.labels_at`` / ``masks_at`` do.

Shapes: B images per batch, (H, W) the model's input size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from padim.core import calibration as cal
from padim.core.config import PadimConfig
from padim.errors import PadimError

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
METADATA_FILE = "padim.json"  # = padim.pipeline.export.METADATA_FILE (that module needs torch)
EXPORT_FORMAT, EXPORT_VERSION = "padim-export", 1
RUNTIME_INSTALL_HINT = {"onnxruntime": 'pip install onnxruntime (with padim and torch: pip install "padim[runtime]")',
                        "openvino": 'pip install openvino (with padim and torch: pip install "padim[openvino]")'}


class EngineError(PadimError):
    """An engine cannot run here: its package is missing, the export is unusable, an option does
    not apply to it (bf16 on ONNX Runtime, bf16 on a CPU without it)."""


RuntimeResult = cal.PadimResult  # what ExportedModel.predict returns: the same fields as PaDiM.predict's


def read_export(folder) -> dict:
    """The ``padim.json`` of an export folder, checked to be one this padim reads."""
    path = Path(folder) / METADATA_FILE
    if not Path(folder).is_dir():
        raise EngineError(f"export folder {folder} does not exist (make one with 'padim export')")
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{folder} is not a padim export: it has no {METADATA_FILE} (make one with 'padim export')") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        raise EngineError(f"{path} is not a padim export description")
    version = record.get("export_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise EngineError(f"export {folder} has version {version}; this padim reads up to {EXPORT_VERSION}: upgrade padim")
    if not isinstance(record.get("model"), dict) or not isinstance(record["model"].get("config"), dict):
        raise EngineError(f"{path} lacks the model's configuration")
    missing = [name for name in record.get("files", []) if not (Path(folder) / name).is_file()]
    if missing:
        raise EngineError(f"export {folder} is incomplete: {', '.join(missing)} missing")
    return record


# ----------------------------------------------------------------------------------------- sessions
def _import_engine(engine: str):
    try:
        return __import__(engine)
    except ImportError:
        raise EngineError(f"`engine` {engine} needs the package {engine!r}: {RUNTIME_INSTALL_HINT[engine]}") from None


class _OnnxRuntimeSession:
    """ONNX Runtime on the CPU. ``threads``: intra-op threads of this session (None: ORT's default,
    one per physical core); nothing process-wide is set."""

    def __init__(self, path: Path, precision: str, threads: Optional[int]):
        if precision != "f32":
            raise EngineError(f"`precision` {precision} is not available with onnxruntime (only f32); "
                              "use `engine` openvino for bf16")
        ort = _import_engine("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {path}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(["maps", "scores"], {self.input_name: pixels})
        return maps, scores


class _OpenVinoSession:
    """OpenVINO on the CPU, inference precision as asked (never chosen for the user: OpenVINO
    defaults to bf16 on CPUs that have it, which moves maps by ~1e-2). Dynamic quantisation of the
    matrix products is off (it would be a reduced precision nobody asked for) and so is thread
    pinning (affinity is the host process's business)."""

    def __init__(self, path: Path, precision: str, threads: Optional[int]):
        ov = _import_engine("openvino")
        core = ov.Core()
        if precision == "bf16":
            capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in capabilities:
                raise EngineError(f"`precision` bf16: this CPU has no bf16 support (OpenVINO reports "
                                  f"{', '.join(capabilities)}); use f32")
        config = {"INFERENCE_PRECISION_HINT": precision, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                  "ENABLE_CPU_PINNING": False, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:
            raise EngineError(f"openvino cannot load {path}: {exc}") from None
        self.request = self.compiled.create_infer_request()

    def __call__(self, pixels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        results = self.request.infer({0: pixels})
        outputs = {output.get_any_name(): value for output, value in results.items()}
        return np.array(outputs["maps"]), np.array(outputs["scores"])  # copies: the request reuses its buffers


def open_session(folder, record: dict, engine: str, precision: str = "f32", threads: Optional[int] = None):
    """A callable (B, H, W, 3) uint8 -> maps (B, H, W) float32, scores (B,) float32 for an export."""
    if engine not in ENGINES[1:]:
        raise EngineError(f"engine must be one of {', '.join(ENGINES[1:])} for an export, got {engine!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    graph = Path(folder) / record["graph"]
    if engine == "onnxruntime":
        if record.get("graph_format") != "onnx":
            raise EngineError(f"export {folder} is OpenVINO IR; onnxruntime needs an ONNX export "
                              "(padim export `format` onnx)")
        return _OnnxRuntimeSession(graph, precision, threads)
    return _OpenVinoSession(graph, precision, threads)


# ----------------------------------------------------------------------------------------- the model
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 R with R @ v = linear resampling of v as PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` does it per axis (half-pixel centres,
    negative source coordinates clamped to 0, no antialiasing). Source coordinates are computed in
    float32 as PyTorch's CPU kernel does, so that the weights round the same way."""
    scale = np.float32(n_in) / np.float32(n_out)
    source = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    low = np.minimum(source.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (source - low.astype(np.float32)).astype(np.float64)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix.astype(np.float32)


def to_original_resolution(anomaly_map, size: Tuple[int, int]) -> np.ndarray:
    """(H, W) map -> (h0, w0) map at the image's original size, as ``padim.core.scoring``'s (bilinear,
    half-pixel centres), in NumPy: two matrix products."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    rows = bilinear_matrix(anomaly_map.shape[0], int(size[0]))
    cols = bilinear_matrix(anomaly_map.shape[1], int(size[1]))
    return rows @ anomaly_map @ cols.T


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
                 metadata: Optional[dict] = None):
        if int(batch_size) < 1:
            raise PadimError(f"batch size must be positive, got {batch_size}")
        self.folder = Path(folder)
        self.export_record = read_export(folder)
        self.metadata = dict(metadata if metadata is not None else self.export_record["model"])
        try:
            self.config_ = PadimConfig.from_dict(self.metadata["config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise EngineError(f"export {folder}: unusable model configuration ({exc})") from None
        shape = self.export_record.get("input", {}).get("shape", [])
        if list(shape[1:3]) != list(self.config_.input_size):
            raise EngineError(f"export {folder}: its graph takes {shape[1:3]} images but the model's input size "
                              f"is {list(self.config_.input_size)}")
        self.feature_hw_ = tuple(self.metadata.get("feature_hw") or ())
        for key in ("image_threshold", "pixel_threshold", "threshold_source", "pixel_threshold_source", "target_fpr",
                    "weights_source", "category"):
            setattr(self, f"{key}_", self.metadata.get(key))
        self.calibration_ = _calibration(self.metadata.get("calibration"), folder)
        self.engine, self.precision = engine, precision
        self.batch_size, self.workers, self.progress = int(batch_size), workers, progress
        self.session = open_session(folder, self.export_record, engine, precision, threads)

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
        return predict(self, images, point, original_resolution, to_original_resolution, errors)


def _calibration(record, folder) -> Optional[cal.Calibration]:
    """The ``Calibration`` of an export's ``calibration`` record (None: the model has none)."""
    if record is None:
        return None
    try:
        arrays = [np.asarray(record[key], dtype=np.float64) for key in ("image_scores", "pixel_levels", "pixel_quantiles")]
        if arrays[0].ndim != 1 or not len(arrays[0]) or arrays[1].shape != arrays[2].shape:
            raise ValueError("inconsistent arrays")
        return cal.Calibration(*arrays, method=str(record.get("method", "holdout")))
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"export {folder}: its calibration data is damaged ({exc})") from None


