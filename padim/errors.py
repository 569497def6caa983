"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero.

Anything that is *not* a ``PadimError`` is a bug in padim and keeps its traceback.
"""


RANDOM_WEIGHTS_WARNING = "WARNING: this model uses RANDOM backbone weights (--weights random): for tests only, not a real detector"


class PadimError(Exception):
    """Base class for problems with the user's input (files, folders, options)."""


class DataError(PadimError):
    """A data folder is missing, empty, or holds an image or mask that cannot be used."""


class WeightsUnavailableError(PadimError):
    """Backbone weights cannot be had (offline, missing or wrong file)."""


class ModelFileError(PadimError):
    """A model file is missing, truncated, corrupted, or not a padim model."""


class NotFittedError(PadimError, AttributeError):
    """The model was asked to score before ``fit`` (or ``load``). An AttributeError too, as in
    scikit-learn, so that ``hasattr(model, "mean_")`` is False before fit."""


def one_line(exc: BaseException, last: bool = False, typed: bool = True, limit: int = 300) -> str:
    """An exception as one line for a user: its first non-empty line, or with ``last`` its last (where
    OpenVINO and ONNX Runtime say what failed, after where in their sources the check was), whitespace
    collapsed and clipped to ``limit`` characters; prefixed with its type when ``typed`` and it is not
    a ``PadimError`` (whose messages are written for users already). The one helper every surface uses
    to keep a file's, an engine's or a cluster's error to one line."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    text = (lines[-1] if last else lines[0])[:limit] if lines else ""
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}" if typed and not isinstance(exc, PadimError) else text
