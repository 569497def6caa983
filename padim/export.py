"""Export a fitted PaDiM model as one ONNX / OpenVINO graph of its whole scoring path.

Why one graph: a line PC or edge box then needs no PyTorch (``padim.runtime`` runs the graph with
ONNX Runtime or OpenVINO), and the engines' own fusions make it faster. What the graph holds and
what it must not: it is a pure function of the model's *tensors* (backbone weights, channel subset,
means, precision factors, the blur) from pixels to maps. Decisions are not in it: thresholds,
calibration data and the configuration travel beside it in ``padim.json`` (the model file's header,
verbatim), so changing a threshold never changes the graph's bytes, and the runtime decides outside
the graph exactly as ``padim.scoring.labels_at`` / ``masks_at`` do.

The graph (``ScoringGraph``), shapes with B images (dynamic), (H, W) the model's input size,
(h, w) the first feature layer's grid, P = h * w, d channels:

    pixels (B, H, W, 3) uint8, RGB, already resized/cropped by ``padim.images.load_pixels``
      -> float32, ImageNet mean/std                       (= ``images.to_input``)
      -> backbone prefix, BatchNorm folded as in PyTorch   (= the model's ``extractor_``)
      -> channel subset + nearest upsampling -> (P, B, d)  (= ``features.embed``, as gathers; with a
                                                              semi-orthogonal reduction, each layer times
                                                              its rows of the projection, then summed)
      -> ||W_p (x - mean_p)|| -> (B, h, w)                 (= ``gaussian.mahalanobis``)
      -> R_h @ D @ R_w^T -> maps (B, H, W)                 (= ``maps.anomaly_maps``)
      -> max -> scores (B,)                                (= ``maps.image_scores``)

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
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .errors import PadimError
from .maps import upsample_blur_matrix

EXPORT_FORMAT = "padim-export"
EXPORT_VERSION = 1
METADATA_FILE = "padim.json"
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
INPUT_NAME, OUTPUT_NAMES = "pixels", ("maps", "scores")
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to model.onnx.data (protobuf stops at 2 GB)
GRAPH_TENSORS = ("mean", "precision_factor_packed", "channel_idx", "projection")  # what the graph is built from

EXPORT_INSTALL_HINT = 'pip install "padim[export]"'
OPENVINO_INSTALL_HINT = 'pip install "padim[openvino]"'


class ExportError(PadimError):
    """An export cannot be made or used (missing exporter package, unsupported option, bad folder)."""


def _nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out,) int64 source index of every output row under PyTorch's nearest upsampling, taken
    from ``F.interpolate`` itself: equal to ``features.embed``'s for every size, whole factors or not."""
    source = torch.arange(n_in, dtype=torch.float64).view(1, 1, n_in)
    return F.interpolate(source, size=n_out, mode="nearest").view(n_out).round().long()


class ScoringGraph(nn.Module):
    """The scoring path of a fitted ``PaDiM`` as one module: pixels -> (maps, scores).

    forward: (B, H, W, 3) uint8 -> maps (B, H, W) float32, scores (B,) float32.

    Built from the model's public fitted attributes; shares the backbone (no copy) and holds the
    means (P, d), the transposed factors W^T (P, d, d) float32, the per-layer channel indices and
    the nearest-upsampling and upsample+blur matrices as buffers, which become the graph's constants.
    """

    def __init__(self, model) -> None:
        super().__init__()
        config = model.config_
        self.extractor = model.extractor_
        device = next(iter(self.extractor.parameters())).device
        height, width = config.input_size
        std = torch.tensor(config.std, dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 1, 1, 3))  # as images.to_input
        self.register_buffer("shift", (-torch.tensor(config.mean, dtype=torch.float32) / std).view(1, 1, 1, 3))

        with torch.inference_mode():  # each layer's channels and grid, from one dummy forward
            shapes = [tuple(f.shape[1:]) for f in self.extractor(torch.zeros(1, 3, height, width, device=device))]
        self.grid = tuple(model.feature_hw_)
        if shapes[0][1:] != self.grid:
            raise ExportError(f"the backbone's first layer grid {shapes[0][1:]} differs from the fitted {self.grid}")
        channel_idx = model.channel_idx_.cpu()
        projection = getattr(model, "projection_", None)
        self.projected = projection is not None
        self.n_layers, self.used, self.whole, start = len(shapes), [], [], 0
        for layer, (channels, h_l, w_l) in enumerate(shapes):
            inside = (channel_idx >= start) & (channel_idx < start + channels)
            local = channel_idx[inside] - start
            start += channels
            if len(local):  # layers with no kept channel are skipped (their map is still computed)
                self.used.append(layer)
                if len(local) == channels:
                    self.whole.append(layer)  # every channel: no gather
                self.register_buffer(f"channels_{layer}", local.clone())
                if self.projected:  # (k_l, d): this layer's rows of the projection
                    self.register_buffer(f"projection_{layer}", projection.detach().cpu()[inside].to(torch.float32).clone())
                self.register_buffer(f"rows_{layer}", _nearest_indices(h_l, self.grid[0]))
                self.register_buffer(f"cols_{layer}", _nearest_indices(w_l, self.grid[1]))
        self.register_buffer("mean", model.mean_.detach().to("cpu", torch.float32).clone())  # (P, d)
        self.register_buffer("factor_t", model.precision_factor_.detach().to("cpu", torch.float32)
                             .transpose(1, 2).contiguous())  # (P, d, d) = W^T, so rows times it give W (x - mean)
        self.register_buffer("rows", upsample_blur_matrix(self.grid[0], height, float(config.sigma),
                                                          torch.float32, torch.device("cpu")).clone())  # (H, h)
        self.register_buffer("cols_t", upsample_blur_matrix(self.grid[1], width, float(config.sigma),
                                                            torch.float32, torch.device("cpu")).T.contiguous())  # (w, W)
        self.to(device)

    def embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (P, B, d) float32 embeddings, position-major for the batched product."""
        x = (pixels.to(torch.float32) * self.scale + self.shift).permute(0, 3, 1, 2)  # (B, 3, H, W)
        feature_maps = self.extractor(x)
        parts = []
        for layer in self.used:
            part = feature_maps[layer]
            if layer not in self.whole:
                part = part.index_select(1, getattr(self, f"channels_{layer}"))  # (B, k, h_l, w_l)
            if self.projected:  # projected at the layer's own resolution (it commutes with nearest upsampling)
                part = torch.matmul(part.permute(0, 2, 3, 1), getattr(self, f"projection_{layer}")).permute(0, 3, 1, 2)
            part = part.index_select(2, getattr(self, f"rows_{layer}")).index_select(3, getattr(self, f"cols_{layer}"))
            parts.append(part)  # (B, k, h, w), or (B, d, h, w) projected
        if self.projected:
            emb = parts[0]
            for part in parts[1:]:
                emb = emb + part  # (B, d, h, w)
        else:
            emb = torch.cat(parts, dim=1)  # (B, d, h, w): sorted channel_idx order, layer by layer
        return emb.flatten(2).permute(2, 0, 1)  # (P, B, d)

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        delta = self.embeddings(pixels) - self.mean.unsqueeze(1)  # (P, B, d)
        whitened = torch.matmul(delta, self.factor_t)  # (P, B, d): W (x - mean) per row
        distances = whitened.square().sum(dim=2).sqrt().transpose(0, 1)  # (B, P)
        maps = self.rows @ distances.unflatten(1, self.grid) @ self.cols_t  # (B, H, W)
        return maps, maps.flatten(1).amax(dim=1)


# ----------------------------------------------------------------------------------------- export
def _require(module: str, hint: str):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"exporting needs the package {module!r}: {hint}") from None


def export_onnx(graph: ScoringGraph, path: Path, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> List[Path]:
    """Writes ``graph`` to ``path`` (ONNX, dynamic batch); returns the files written.

    The weights go to ``path`` + ".data" when they pass ``external_data_bytes``."""
    _require("onnx", EXPORT_INSTALL_HINT)
    _require("onnxscript", EXPORT_INSTALL_HINT)
    height, width = graph.rows.shape[0], graph.cols_t.shape[1]
    device = graph.mean.device
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    weights_bytes = sum(b.numel() * b.element_size() for b in graph.buffers()) + \
        sum(p.numel() * p.element_size() for p in graph.parameters())
    external = weights_bytes > external_data_bytes
    graph = graph.eval()
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=({0: batch},),
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
    """A ``padim.calibration.Calibration`` as JSON (float64 values round-trip exactly), or None."""
    if calibration is None:
        return None
    return {"method": calibration.method, "image_scores": [float(v) for v in calibration.image_scores],
            "pixel_levels": [float(v) for v in calibration.pixel_levels],
            "pixel_quantiles": [float(v) for v in calibration.pixel_quantiles]}


def model_metadata(model) -> dict:
    """The header a model file of ``model`` would have (config, thresholds and their sources,
    provenance) and its calibration scores (``calibration``), from its public attributes: for models
    exported from memory rather than from a file."""
    from . import modelfile

    info = {key: getattr(model, f"{key}_", None) for key in modelfile.INFO_DEFAULTS}
    return {**modelfile.INFO_DEFAULTS, **info, "package_version": __version__,
            "config": model.config_.to_dict(), "feature_hw": list(model.feature_hw_),
            "calibration": calibration_record(getattr(model, "calibration_", None))}


def file_metadata(path) -> dict:
    """A model file's header, verbatim (every field, also ones this version does not know), and its
    calibration scores (``calibration``: tensors in the file, checked by ``padim.modelfile``)."""
    from . import modelfile
    from .io import read_metadata

    return {**read_metadata(path), "calibration": calibration_record(modelfile.read(path).calibration)}


def graph_key(model_path) -> str:
    """SHA-256 of what a model file's graph is made of: the bytes of its graph tensors (mean, factor,
    channel indices), its configuration and feature grid, its backbone weights' identity, and this
    export format's version.

    Not of the whole file: thresholds, their sources and the calibration scores change without
    changing the graph (``padim test --store-oracle-thresholds`` rewrites them), and that must not
    make a cached export stale (``test_export`` checks that the graph bytes stay identical)."""
    from .io import read_header, read_metadata

    header, header_bytes = read_header(model_path)
    meta = read_metadata(model_path)
    identity = {key: meta.get(key) for key in ("config", "feature_hw", "weights_source", "weights_sha256")}
    tensors = {name: header.get(name) for name in GRAPH_TENSORS if name in header or name != "projection"}
    digest = hashlib.sha256(json.dumps({"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": identity,
                                        "tensors": tensors}, sort_keys=True).encode())
    with open(model_path, "rb") as handle:
        for name in tensors:
            start, stop = tensors[name]["data_offsets"] if tensors[name] else (0, 0)
            handle.seek(8 + header_bytes + start)
            for offset in range(start, stop, 16 << 20):
                digest.update(handle.read(min(16 << 20, stop - offset)))
    return digest.hexdigest()


def write_metadata(folder: Path, fmt: str, graph: ScoringGraph, metadata: dict, key: Optional[str],
                   files: Sequence[Path]) -> Path:
    """``padim.json``: what the graph takes and gives, and the model's header (``model``: config,
    feature_hw, thresholds, calibration fields, provenance), read by ``padim.runtime``."""
    height, width = graph.rows.shape[0], graph.cols_t.shape[1]
    record = {
        "format": EXPORT_FORMAT,
        "export_version": EXPORT_VERSION,
        "graph_format": fmt,
        "graph": GRAPH_FILES[fmt],
        "files": sorted(os.path.basename(f) for f in files),
        "graph_key": key,
        "input": {"name": INPUT_NAME, "shape": ["batch", height, width, 3], "dtype": "uint8",
                  "layout": "RGB, resized and cropped by padim.images.load_pixels"},
        "outputs": {"maps": {"shape": ["batch", height, width], "dtype": "float32"},
                    "scores": {"shape": ["batch"], "dtype": "float32"}},
        "exported_by": {"padim": __version__, "torch": torch.__version__},
        "model": metadata,
    }
    path = folder / METADATA_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def export_model(model, folder, fmt: str = "onnx", metadata: Optional[dict] = None, key: Optional[str] = None,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> Path:
    """Exports a fitted ``PaDiM`` to ``folder`` in ``fmt`` ("onnx" or "openvino"); returns the folder.

    metadata: the header to put beside the graph (default: built from the model's attributes;
    ``padim export`` passes the model file's own). The files appear whole or not at all: they are
    written to a temporary folder next to ``folder`` and moved in.
    """
    if fmt not in GRAPH_FILES:
        raise ExportError(f"export format must be one of {', '.join(GRAPH_FILES)}, got {fmt!r}")
    if not hasattr(model, "mean_"):
        from .errors import NotFittedError

        raise NotFittedError("this PaDiM model is not fitted yet: call fit() or PaDiM.load() first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph = ScoringGraph(model)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        files = export_onnx(graph, work / GRAPH_FILES["onnx"], external_data_bytes)
        if fmt == "openvino":
            files = onnx_to_openvino(files[0], work / GRAPH_FILES["openvino"])
        files.append(write_metadata(work, fmt, graph, metadata if metadata is not None else model_metadata(model),
                                    key, files))
        for stale in list(GRAPH_FILES.values()) + ["model.onnx.data", "model.bin", METADATA_FILE]:
            if (folder / stale).exists():
                (folder / stale).unlink()
        for file in files:
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder
