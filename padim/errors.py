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
