"""The ``padim`` command: parse, call the library, print (``padim.cli.main``)."""

from padim.cli.main import BACKBONE_NAMES, ENGINE_NAMES, PRECISION_NAMES, build_parser, main  # noqa: F401
