"""Export a fitted PaDiM model as one ONNX / OpenVINO graph of its whole scoring path.

Why one graph: a line PC or edge box then needs no PyTorch (``padim.runtime`` runs the graph with
ONNX Runtime or OpenVINO), and the engines' own fusions make it faster. What the graph holds and
what it must not: it is a pure function of the model's *tensors* (backbone weights, channel subset,
means, precision factors, the blur) from pixels to maps. Decisions are not in it: thresholds,
calibration data and the configuration travel beside it in ``padim.json`` (the model file's header,
verbatim), so changing a threshold never changes the graph's bytes, and the runtime decides outside
the graph exactly as ``padim.settings.calibration.labels_at`` / ``masks_at`` do.

The graph is the model's ``scorer_`` (``padim.core.scorer.PatchScorer``) traced by torch.export:
the very module the torch engine runs, so there is no second scoring path to keep equal. Shapes
with B images (dynamic), (H, W) the model's input size:

    pixels (B, H, W, 3) uint8, RGB, already resized/cropped by ``padim.files.images.load_pixels``
      -> maps (B, H, W) float32, scores (B,) float32

Files an export folder holds: ``model.onnx`` (+ ``model.onnx.data`` when the weights pass
``EXTERNAL_DATA_BYTES``: d = 550 factors are GBs, beyond protobuf's 2 GB) or ``model.xml`` +
``model.bin`` (OpenVINO IR, float32), and ``padim.json`` (see ``write_metadata``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from padim.files.digests import file_sha256
from padim.version import __version__
from padim.errors import PadimError
# the format of export folders, shared with their torch-free reader (padim.deploy.exported.read_export)
from padim.deploy.export_folder import (IGNORE_KEY, EXPORT_FORMAT, EXPORT_VERSION, FILES_SHA256_KEY, GRAPH_FILES, INPUT_NAME, METADATA_FILE,
                      OUTPUT_NAMES, EngineError, check_model_record, checksummed_json, declared_io, ignore_record)

EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf stops at 2 GB)
# what the graph is built from (the ignore mask too: its region is 0 in the maps, and padim.json carries it)
GRAPH_TENSORS = ("mean", "precision_factor_packed", "channel_idx", "projection", "ignore_mask")
OPTIONAL_TENSORS = ("projection", "ignore_mask")  # in the key only when the model has them
# the graph traced from those tensors (padim.core.lean): a new revision makes cached exports of the old one stale
# (lean-2: padim.json carries the ignore mask)
GRAPH_REVISION = "lean-2"

EXPORT_INSTALL_HINT = 'pip install "padim-inspect[export]"'
OPENVINO_INSTALL_HINT = 'pip install "padim-inspect[openvino]"'


class ExportError(PadimError):
    """An export cannot be made or used (missing exporter package, unsupported option, bad folder)."""


# ----------------------------------------------------------------------------------------- export
def _require(module: str, hint: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"exporting needs the package {module!r}: {hint}") from None


class _WithDeltas(torch.nn.Module):
    """A ``PatchScorer`` traced with a third output, ``deltas`` (P, B, d): its embeddings minus the mean."""

    def __init__(self, scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, pixels):
        return self.scorer.with_deltas(pixels)


def export_onnx(graph, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES, deltas: bool = False) -> List[Path]:
    """Writes ``graph`` to ``path`` (ONNX, dynamic batch); returns the files written.

    The weights go to ``path`` + ".data" when they pass ``external_data_bytes``. ``deltas``: with
    the embeddings minus the mean as a third output (what an int8 export refits its Gaussians on)."""
    _require("onnx", EXPORT_INSTALL_HINT)
    _require("onnxscript", EXPORT_INSTALL_HINT)
    height, width = graph.input_size
    device = graph.mean.device
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    weights_bytes = sum(b.numel() * b.element_size() for b in graph.buffers()) + \
        sum(p.numel() * p.element_size() for p in graph.parameters())
    external = weights_bytes > external_data_bytes
    graph = graph.eval()
    import warnings

    with warnings.catch_warnings(), torch.no_grad(), graph.tracing():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's
        module = _WithDeltas(graph).eval() if deltas else graph
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES) + (["deltas"] if deltas else []),
                                    dynamic_shapes=({0: batch},),
                                    external_data=external, verbose=False, report=False)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=external)
    files = [path]
    if external:
        files.append(Path(str(path) + ".data"))
    return files


def onnx_to_openvino(onnx_path: Path, xml_path: Path) -> List[Path]:
    """Converts an ONNX export to OpenVINO IR, float32 weights (OpenVINO compresses to float16 by
    default: that would be a reduced precision nobody chose)."""
    try:
        import openvino as ov
    except ImportError:
        raise ExportError(f"an OpenVINO export needs the package 'openvino': {OPENVINO_INSTALL_HINT}") from None
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return [xml_path, xml_path.with_suffix(".bin")]


def calibration_record(calibration) -> Optional[dict]:
    """A ``padim.settings.calibration.Calibration`` as JSON (float64 values round-trip exactly), or None."""
    if calibration is None:
        return None
    return {"method": calibration.method, "image_scores": [float(v) for v in calibration.image_scores],
            "pixel_levels": [float(v) for v in calibration.pixel_levels],
            "pixel_quantiles": [float(v) for v in calibration.pixel_quantiles]}


def model_metadata(model) -> dict:
    """The header a model file of ``model`` would have (config, thresholds and their sources,
    provenance) and its calibration scores (``calibration``), from its public attributes: for models
    exported from memory rather than from a file."""
    from padim.files import modelfile

    info = {key: getattr(model, f"{key}_", None) for key in modelfile.INFO_DEFAULTS}
    return {**modelfile.INFO_DEFAULTS, **info, "package_version": __version__,
            "config": model.config_.to_dict(), "feature_hw": list(model.feature_hw_),
            "calibration": calibration_record(getattr(model, "calibration_", None))}


def file_metadata(path) -> dict:
    """A model file's header, verbatim (every field, also ones this version does not know), and its
    calibration scores (``calibration``: tensors in the file, checked by ``padim.files.modelfile``)."""
    from padim.files import modelfile
    from padim.files.safetensors_io import read_metadata

    return {**read_metadata(path), "calibration": calibration_record(modelfile.read(path).calibration)}


def graph_key(model_path) -> str:
    """SHA-256 of what a model file's graph is made of: the bytes of its graph tensors (mean, factor,
    channel indices), its configuration and feature grid, its backbone weights' identity, and this
    export format's version.

    Not of the whole file: thresholds, their sources and the calibration scores change without
    changing the graph (``padim test --store-oracle-thresholds`` rewrites them), and that must not
    make a cached export stale (``test_export`` checks that the graph bytes stay identical). The
    graph's revision (``GRAPH_REVISION``) is in it: a padim that traces another graph rebuilds."""
    from padim.files.safetensors_io import read_header, read_metadata

    header, header_bytes = read_header(model_path)
    meta = read_metadata(model_path)
    identity = {key: meta.get(key) for key in ("config", "feature_hw", "weights_source", "weights_sha256")}
    tensors = {name: header.get(name) for name in GRAPH_TENSORS if name in header or name not in OPTIONAL_TENSORS}
    digest = hashlib.sha256(json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "graph": GRAPH_REVISION,
                                        "model": identity, "tensors": tensors}, sort_keys=True).encode())
    with open(model_path, "rb") as handle:
        for name in tensors:
            start, stop = tensors[name]["data_offsets"] if tensors[name] else (0, 0)
            handle.seek(8 + header_bytes + start)
            for offset in range(start, stop, 16 << 20):
                digest.update(handle.read(min(16 << 20, stop - offset)))
    return digest.hexdigest()


def write_metadata(folder: Path, fmt: str, graph, metadata: dict, key: Optional[str],
                   files: Sequence[Path], extra: Optional[dict] = None) -> Path:
    """``padim.json``: what the graph takes and gives, the SHA-256 of every graph file (``sha256``),
    the model's header (``model``: config, feature_hw, thresholds, calibration fields, provenance),
    read by ``padim.runtime``, and last its own ``checksum`` (``padim.runtime.checksummed_json``).

    The header was checked as the reader will check it (``export_model``)."""
    height, width = graph.input_size
    record = {
        "format": EXPORT_FORMAT,
        "export_version": EXPORT_VERSION,
        "graph_format": fmt,
        "graph": GRAPH_FILES[fmt],
        "files": sorted(os.path.basename(f) for f in files),
        FILES_SHA256_KEY: {os.path.basename(f): file_sha256(f) for f in sorted(files)},
        "graph_key": key,
        **declared_io(height, width),
        "exported_by": {"padim": __version__, "torch": torch.__version__},
        **(extra or {}),  # an int8 export's "precision" and "quantization" (padim.deploy.quantize)
        "model": metadata,
    }
    try:
        text = checksummed_json(record)
    except ValueError:  # NaN or an infinity in a field padim does not check: JSON has none
        raise ExportError(f"cannot write {METADATA_FILE}: the model's header holds NaN or an infinite number, "
                          "which JSON cannot hold") from None
    path = folder / METADATA_FILE
    path.write_bytes(text)
    return path


def export_model(model, folder, fmt: str = "onnx", metadata: Optional[dict] = None, key: Optional[str] = None,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES, graph_step: Optional[Callable] = None,
                 scorer=None) -> Path:
    """Exports a fitted ``PaDiM`` to ``folder`` in ``fmt`` ("onnx" or "openvino"); returns the folder.

    metadata: the header to put beside the graph (default: built from the model's attributes;
    ``padim export`` passes the model file's own). The files appear whole or not at all: they are
    written to a temporary folder next to ``folder`` and moved in.
    graph_step: for "openvino", instead of the plain conversion, (ONNX file, work folder, header) ->
    (graph files, header, extra padim.json fields): how an int8 export (``padim.deploy.quantize``)
    quantises the graph and recomputes the thresholds with it before anything is written.
    scorer: the ``PatchScorer`` to trace (default: the model's own; an int8 export's Gaussians
    are refitted on int8 features).
    """
    if fmt not in GRAPH_FILES:
        raise ExportError(f"export format must be one of {', '.join(GRAPH_FILES)}, got {fmt!r}")
    if not hasattr(model, "mean_"):
        from padim.errors import NotFittedError

        raise NotFittedError("this PaDiM model is not fitted yet: call fit() or PaDiM.load() first")
    folder = Path(folder)
    try:  # checked as its reader will read and check it: an export the runtime would refuse is never written
        metadata = json.loads(json.dumps(metadata if metadata is not None else model_metadata(model)))
        check_model_record(metadata, folder)
    except EngineError as exc:
        raise ExportError(str(exc)) from None
    folder.mkdir(parents=True, exist_ok=True)
    graph = scorer if scorer is not None else model.scorer_  # the module the torch engine runs: one scoring path
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        files = export_onnx(graph, work / GRAPH_FILES["onnx"], external_data_bytes)
        extra = None
        if fmt == "openvino" and graph_step is not None:
            files, metadata, extra = graph_step(files[0], work, metadata)
            try:
                check_model_record(metadata, folder)
            except EngineError as exc:
                raise ExportError(str(exc)) from None
        elif fmt == "openvino":
            files = onnx_to_openvino(files[0], work / GRAPH_FILES["openvino"])
        if getattr(model, "ignore_mask_", None) is not None:  # maps at a picture's size keep the region out
            extra = {**(extra or {}), IGNORE_KEY: ignore_record(model.ignore_mask_.cpu().numpy())}
        files.append(write_metadata(work, fmt, graph, metadata, key, files, extra))
        for stale in list(GRAPH_FILES.values()) + ["model.onnx.data", "model.bin", METADATA_FILE]:
            if (folder / stale).exists():
                (folder / stale).unlink()
        for file in files:
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
