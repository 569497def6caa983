"""Scoring an export without PyTorch: the public names of ``padim.pipeline.exported`` (documented in
docs/python-api.md).

    from padim.runtime import ExportedModel
    model = ExportedModel("bottle-onnx", engine="onnxruntime")
"""

from padim.pipeline.exported import (  # noqa: F401
    ENGINES, PRECISIONS, EngineError, ExportedModel, RuntimeResult, read_export, to_original_resolution)

__all__ = ["ExportedModel", "RuntimeResult", "EngineError", "read_export", "to_original_resolution", "ENGINES",
           "PRECISIONS"]
