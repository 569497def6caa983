"""padim: PaDiM anomaly detection and localization (Defard et al. 2020)."""

__version__ = "0.1.0"

from .errors import DataError, ModelFileError, NotFittedError, PadimError, WeightsUnavailableError  # noqa: E402
from .model import PaDiM, PadimResult  # noqa: E402

__all__ = ["PaDiM", "PadimResult", "PadimError", "DataError", "ModelFileError", "NotFittedError",
           "WeightsUnavailableError", "__version__"]
