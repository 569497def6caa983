"""Scoring an export without PyTorch: the public name of ``padim.deploy.exported``.

    from padim.runtime import ExportedModel
    model = ExportedModel("bottle-onnx", engine="onnxruntime")
"""

from padim.deploy.exported import (  # noqa: F401
    ENGINES, PRECISIONS, EngineError, ExportedModel, RuntimeResult, read_export)
from padim.pipeline.resolution import map_at as to_original_resolution  # noqa: F401
