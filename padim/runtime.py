"""Scoring an export without PyTorch: the public names of ``padim.deploy.exported`` (documented in
docs/python-api.md).

    from padim.runtime import ExportedModel
    model = ExportedModel("bottle-onnx", engine="onnxruntime")
"""

from padim.deploy.exported import (  # noqa: F401
    ENGINES, PRECISIONS, EngineError, ExportedModel, RuntimeResult, read_export)
from padim.pipeline.resolution import map_at as to_original_resolution  # noqa: F401

__all__ = ["ExportedModel", "RuntimeResult", "EngineError", "read_export", "to_original_resolution", "ENGINES",
           "PRECISIONS"]
