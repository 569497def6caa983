"""padim: PaDiM anomaly detection and localization (Defard et al. 2020).

``import padim`` does not import PyTorch: ``PaDiM`` and ``PadimResult`` are imported on first use
(module ``__getattr__``), so the torch-free runtime (``padim.runtime``, ``padim predict --engine
onnxruntime --export DIR``) works where torch is not installed.
"""

from padim.version import __version__  # noqa: E402,F401

from padim.errors import DataError, ModelFileError, NotFittedError, PadimError, WeightsUnavailableError  # noqa: E402

__all__ = ["PaDiM", "PadimResult", "PadimError", "DataError", "ModelFileError", "NotFittedError",
           "WeightsUnavailableError", "__version__"]

_LAZY = {"PaDiM": "core.estimator", "PadimResult": "core.estimator"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
