"""The package version: a leaf module every layer may read (the top-level package imports everything)."""

__version__ = "0.1.0"
