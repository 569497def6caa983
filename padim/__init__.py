"""padim: PaDiM anomaly detection and localization (Defard et al. 2020).

The public Python API is this module's ``__all__`` and ``padim.runtime``'s (scoring an export
without PyTorch), each name documented in docs/python-api.md; examples import from these two only.

``import padim`` imports neither PyTorch nor NumPy: every name but the errors is imported on first
use (module ``__getattr__``), so the torch-free runtime (``padim.runtime``, ``padim predict --engine
onnxruntime --export DIR``) works where torch is not installed, and ``RayFit`` needs Ray only once a
fit uses it.
"""

from padim.version import __version__  # noqa: E402,F401

from padim.errors import DataError, ModelFileError, NotFittedError, PadimError, WeightsUnavailableError  # noqa: E402

# name -> the module (under padim) that defines it
_LAZY = {
    "PaDiM": "core.estimator",
    "PadimResult": "core.estimator",
    "find_category": "data.mvtec",
    "make_synthetic_category": "data.synthetic",
    "evaluate": "jobs.evaluate",
    "FitStatistics": "core.statistics",
    "RayFit": "cluster.ray_fit",
    "loopback_environment": "cluster.connect",
    "tune_malloc_for_scoring": "files.memory",
}

__all__ = [*_LAZY, "PadimError", "DataError", "ModelFileError", "NotFittedError", "WeightsUnavailableError",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
